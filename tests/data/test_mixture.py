"""The mixture loader: draw frequencies, live probability changes, host shards, reward streams,
and save/restore through grain.checkpoint + an Orbax CheckpointManager."""

import collections

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mos_jax.data import build_data
from mos_jax.data import check_probabilities
from test_data_common import char_tokenizer, pr, small_config, write_jsonl

SIZES = {'a': 40, 'b': 30, 'c': 24}


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp('mix')
  tok_dir = char_tokenizer(str(root / 'tok'))
  paths = {name: write_jsonl(str(root / f'{name}.jsonl'),
                             [pr(f'{name}{i}', name * (1 + i % 5)) for i in range(n)])
           for name, n in SIZES.items()}
  return tok_dir, paths


def _config(files, **kw):
  tok_dir, paths = files
  names = kw.pop('names', sorted(paths))
  return small_config(tok_dir, {n: paths[n] for n in names}, **kw)


def _chi2(counts, probs, total):
  expected = np.asarray(probs) * total
  return float(((np.asarray(counts) - expected) ** 2 / expected).sum())


def test_batch_draws_follow_probabilities(files):
  data = build_data(_config(files, batch_size=2))
  p = [0.2, 0.3, 0.5]
  data.train.set_probabilities(p)
  counts = np.zeros(3)
  for _ in range(2000):
    ids = next(data.train)['dataset_ids']
    assert len(set(ids.tolist())) == 1  # One dataset per batch (Algorithm 1).
    counts[ids[0]] += 1
  # 99.9% quantile of chi-square with 2 degrees of freedom is 13.8.
  assert _chi2(counts, p, 2000) < 13.8, counts
  data.close()


def test_example_draws_follow_probabilities(files):
  data = build_data(_config(files, batch_size=8, mix_per='example'))
  p = [0.6, 0.1, 0.3]
  data.train.set_probabilities(p)
  counts = np.zeros(3)
  for _ in range(300):
    counts += np.bincount(next(data.train)['dataset_ids'], minlength=3)
  assert _chi2(counts, p, 2400) < 13.8, counts
  data.close()


def test_probability_change_takes_effect_at_next_draw(files):
  data = build_data(_config(files))
  for target in (2, 0, 1, 2):
    p = np.zeros(3)
    p[target] = 1.0
    data.train.set_probabilities(p)
    assert next(data.train)['dataset_ids'].tolist() == [target] * 4
  data.close()


@pytest.mark.parametrize('p, message', [
    ([np.nan, 0.5, 0.5], 'finite'), ([-0.1, 0.6, 0.5], 'non-negative'),
    ([0.0, 0.0, 0.0], 'sum to zero'), ([0.5, 0.5], 'expected 3 probabilities')])
def test_bad_probabilities_are_refused(p, message):
  with pytest.raises(ValueError, match=message):
    check_probabilities(p, 3)


def test_reward_batches_do_not_disturb_training_order(files):
  plain, probed = build_data(_config(files)), build_data(_config(files))
  for step in range(12):
    if step % 3 == 0:
      rewards = probed.train.reward_batches()
      assert sorted(rewards) == sorted(SIZES)
      for k, name in enumerate(probed.names):
        assert rewards[name]['dataset_ids'].tolist() == [k, k]
        assert rewards[name]['tokens'].shape == (2, 64)
    a, b = next(plain.train), next(probed.train)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  plain.close()
  probed.close()


def _concat(parts):
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@pytest.mark.parametrize('hosts', [2, 4])
@pytest.mark.parametrize('kw', [
    dict(packing=True, max_len=48),
    dict(packing=True, max_len=64, buckets=(32, 48)),
    dict(packing=True, max_len=48, mix_per='example'),
    dict(mix_per='example', buckets=(25, 27)),
    dict()], ids=['packed', 'packed-buckets', 'packed-per-example', 'per-example-buckets',
                  'unpacked'])
def test_hosts_split_the_one_host_global_batch(files, kw, hosts):
  """Every host's batch is its slice of the global batch one host reads alone (training and
  reward batches, across epochs and a probability change), and a position saved by one host
  restores on any number of hosts."""
  kw = dict(batch_size=8, reward_batch_size=4, **kw)
  single = build_data(_config(files, **kw))
  many = [build_data(_config(files, **kw), p, hosts) for p in range(hosts)]
  for step in range(40):
    if step == 20:
      for d in [single] + many:
        d.train.set_probabilities([0.2, 0.2, 0.6])
    if step == 30:  # One host's position, restored on every host of the larger set.
      state = single.train.get_state()
      for d in many:
        d.train.set_state(state)
    whole = [next(single.train)] + [single.train.reward_batches()[n] for n in single.names]
    parts = [[next(d.train)] + [d.train.reward_batches()[n] for n in d.names] for d in many]
    for k, batch in enumerate(whole):
      joined = _concat([p[k] for p in parts])
      assert sorted(joined) == sorted(batch)
      for key in batch:
        np.testing.assert_array_equal(joined[key], batch[key], err_msg=f'{step} {k} {key}')
  for d in [single] + many:
    d.close()


def test_a_packed_epoch_holds_every_example_once(files):
  data = build_data(_config(files, names=['c'], packing=True, max_len=64, batch_size=1))
  rows = data.train.rows_per_epoch()[0]
  assert rows < SIZES['c']  # Rows are 23 to 28 positions: two fit in 64.
  tokens = [next(data.train) for _ in range(rows)]
  per_row = [len(set(b['segment_ids'][0][b['segment_ids'][0] > 0].tolist())) for b in tokens]
  assert sum(per_row) == SIZES['c'] and max(per_row) == 2
  data.close()


def test_two_hosts_read_disjoint_examples_within_an_epoch(files):
  hosts = [build_data(_config(files, names=['a'], batch_size=4), i, 2) for i in range(2)]
  seen = [set(), set()]
  for _ in range(SIZES['a'] // 4):  # One epoch of dataset a.
    for h, data in enumerate(hosts):
      seen[h].update(next(data.train)['example_ids'].tolist())
  assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(SIZES['a']))
  for h in hosts:
    h.close()


def test_each_epoch_is_a_new_permutation(files):
  data = build_data(_config(files, names=['c'], batch_size=4))
  order = np.concatenate([next(data.train)['example_ids'] for _ in range(12)])  # two epochs
  first, second = order[:24], order[24:]
  assert sorted(first) == sorted(second) == list(range(24))
  assert first.tolist() != second.tolist()
  data.close()


def _run(data, steps, reward_every=3):
  out = []
  for step in range(steps):
    if step % reward_every == 0:
      out.append(data.train.reward_batches())
    out.append(next(data.train))
  return out


def _assert_same(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    if 'tokens' not in x:  # reward batches: {name: batch}
      assert sorted(x) == sorted(y)
      _assert_same([x[k] for k in sorted(x)], [y[k] for k in sorted(y)])
      continue
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def _save_then_restore(config, tmp_path, k=5, more=8):
  """Runs k steps, saves with Orbax, runs `more`; a fresh pipeline restored must match."""
  data = build_data(config)
  data.train.set_probabilities([0.5, 0.2, 0.3][:len(data.names)])
  _run(data, k)
  mngr = ocp.CheckpointManager(str(tmp_path / 'ckpt'))
  mngr.save(k, args=ocp.args.Composite(loader=grain.checkpoint.CheckpointSave(data.train)))
  expected = _run(data, more)  # Advance at once: an async save must not see these steps.
  mngr.wait_until_finished()
  probs = data.train.probabilities
  data.close()

  fresh = build_data(config)
  mngr.restore(k, args=ocp.args.Composite(loader=grain.checkpoint.CheckpointRestore(fresh.train)))
  np.testing.assert_allclose(fresh.train.probabilities, probs)
  assert fresh.train.step == k
  _assert_same(_run(fresh, more), expected)
  fresh.close()
  mngr.close()


def test_save_and_restore_through_orbax(files, tmp_path):
  _save_then_restore(_config(files, mix_per='example'), tmp_path)


def test_save_and_restore_with_packing(files, tmp_path):
  _save_then_restore(_config(files, packing=True, max_len=48), tmp_path)


@pytest.mark.slow
def test_save_and_restore_with_two_workers(files, tmp_path):
  # One dataset keeps the worker start-up (seconds per process) affordable.
  _save_then_restore(_config(files, names=['a'], num_workers=2), tmp_path, k=4, more=5)


def test_packed_rows_keep_examples_apart(files):
  data = build_data(_config(files, packing=True, max_len=48))
  for _ in range(10):
    b = next(data.train)
    assert (b['example_ids'] == -1).all()
    for row in range(4):
      seg, pos = b['segment_ids'][row], b['positions'][row]
      real = seg > 0
      assert real.sum() > 0 and seg.max() >= 1
      starts = np.nonzero(real & (pos == 0))[0]
      assert len(starts) == seg.max()  # Each segment restarts its positions at 0.
      for s in range(1, seg.max() + 1):
        where = np.nonzero(seg == s)[0]
        np.testing.assert_array_equal(pos[where], np.arange(len(where)))
        assert b['loss_mask'][row, where].sum() > 0
        # targets[t] is tokens[t + 1] within a segment.
        np.testing.assert_array_equal(b['targets'][row, where[:-1]], b['tokens'][row, where[1:]])
      assert (b['loss_mask'][row][~real] == 0).all()
  data.close()


def test_buckets_pad_to_the_smallest_fit(files):
  # Rows here are 23 to 28 positions long.
  data = build_data(_config(files, buckets=(25, 27), max_len=64, batch_size=2))
  lengths = set()
  for _ in range(20):
    b = next(data.train)
    longest = int(b['segment_ids'].sum(axis=1).max())
    width = b['tokens'].shape[1]
    lengths.add(width)
    assert width == min([w for w in (25, 27, 64) if w >= longest])
  assert lengths == {25, 27, 64}
  data.close()


def test_buckets_agree_across_hosts(files):
  """Two hosts crop every batch (training, reward, dev) to the bucket of both hosts' longest row
  (reward batches: of every dataset's, since the reward step stacks them)."""
  kw = dict(buckets=(25, 27), max_len=64, batch_size=2, reward_batch_size=2)
  hosts = [build_data(_config(files, **kw), p, 2) for p in range(2)]
  widths, after_restore = set(), []
  for step in range(30):
    if step == 10:  # The agreement survives a save/restore of each host's loader.
      for data in hosts:
        state = data.train.get_state()
        data.train.set_state(state)
    pair = [next(data.train) for data in hosts]
    rewards = [data.train.reward_batches() for data in hosts]
    # Reward batches of every dataset are stacked into one: one width for all of them.
    for batches in [pair, [b for r in rewards for b in r.values()]]:
      longest = max(int(b['segment_ids'].sum(axis=1).max()) for b in batches)
      width = {b['tokens'].shape[1] for b in batches}
      assert width == {min(w for w in (25, 27, 64) if w >= longest)}
      widths |= width
  assert widths == {25, 27, 64}
  dev = [list(data.dev_batches('a')) for data in hosts]
  assert [b['tokens'].shape for b in dev[0]] == [b['tokens'].shape for b in dev[1]]
  for data in hosts:
    data.close()


def test_fingerprint_tracks_tokenized_data(files):
  one, two = build_data(_config(files)), build_data(_config(files))
  other = build_data(_config(files, max_len=26))
  assert one.fingerprint('a') == two.fingerprint('a')
  assert one.fingerprint('a') != one.fingerprint('b')
  assert one.fingerprint('a') != other.fingerprint('a')
  for d in (one, two, other):
    d.close()
  with pytest.raises(ValueError, match="dataset 'a': 0 training examples left"):
    build_data(_config(files, max_len=20))
