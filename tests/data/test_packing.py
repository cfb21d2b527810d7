"""Packed dev batches: every dev example exactly once, intact, on one host or several (all hosts
yield the same number of same-shaped batches); the loader's real-token fraction."""

import numpy as np
import pytest

from mos_jax import config as config_lib
from mos_jax.data import build_data
from mos_jax.data import inspect as inspect_lib
from test_data_common import char_tokenizer, pr, small_config, write_jsonl


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp('pack')
  tok_dir = char_tokenizer(str(root / 'tok'))
  path = write_jsonl(str(root / 'a.jsonl'), [pr(f'q{i}', 'x' * (1 + i % 7)) for i in range(60)])
  return tok_dir, path


def _config(files, packing):
  tok_dir, path = files
  return small_config(tok_dir, {'a': config_lib.dataset(path, dev_examples=23)}, max_len=64,
                      packing=packing, eval_batch_size=4)


def _segments(batches):
  """(tokens, loss_mask) of every real segment in the batches."""
  out = []
  for b in batches:
    for row in range(len(b['tokens'])):
      seg = b['segment_ids'][row]
      for s in range(1, seg.max() + 1):
        where = seg == s
        if b['loss_mask'][row, where].sum() == 0:
          continue  # Filler rows of the last batch.
        np.testing.assert_array_equal(b['positions'][row, where], np.arange(where.sum()))
        out.append((tuple(b['tokens'][row, where].tolist()), tuple(b['loss_mask'][row, where].tolist())))
  return sorted(out)


@pytest.mark.parametrize('hosts', [1, 2])
def test_packed_dev_batches_hold_every_example_once(files, hosts):
  plain = build_data(_config(files, False))
  want = _segments(plain.dev_batches('a'))
  assert len(want) == 23
  got, counts = [], []
  for p in range(hosts):
    data = build_data(_config(files, True), p, hosts)
    batches = list(data.dev_batches('a'))
    assert all(b['tokens'].shape == (4 // hosts, 64) for b in batches)
    counts.append(len(batches))
    got += _segments(batches)
    data.close()
  assert sorted(got) == want
  assert len(set(counts)) == 1  # Every host runs the same number of eval steps.
  assert counts[0] < len(list(plain.dev_batches('a')))  # Packing needs fewer batches.
  plain.close()


def test_inspect_reports_the_real_token_fraction(files):
  fractions = {}
  for packing in (False, True):
    data = build_data(_config(files, packing))
    fractions[packing] = inspect_lib.real_token_fractions(data, batches=3)['a']
    assert f'{100 * fractions[packing]:.1f}' in inspect_lib.report(data, fractions={'a': fractions[packing]})
    data.close()
  assert 0 < fractions[False] < 0.5 < fractions[True] <= 1.0


def test_inspect_reports_examples_per_packed_row(files):
  for packing in (False, True):
    config = _config(files, packing)
    config.train.batch_size = 1
    data = build_data(config)
    per_row = inspect_lib.examples_per_row(data)['a']
    rows = []  # One pass of rows, one per batch, by hand: the segments each holds.
    while sum(rows) < data.sizes[0]:
      rows.append(int(next(data.train)['segment_ids'].max()))
    assert sum(rows) == data.sizes[0]
    assert per_row == pytest.approx(data.sizes[0] / len(rows))
    assert (per_row == 1.0) != packing
    assert f'{per_row:.2f}' in inspect_lib.report(data, per_row={'a': per_row})
    data.close()


@pytest.mark.parametrize('hosts', [1, 2])
def test_packed_full_pass_names_each_tokens_example(files, hosts):
  """The theta_0 pass: token_example_ids give every train example's tokens back, exactly once."""
  seen = {}
  for p in range(hosts):
    data = build_data(_config(files, True), p, hosts)
    for b in data.full_pass_batches('a', 4):
      assert b['token_example_ids'].shape == b['tokens'].shape == (4 // hosts, 64)
      for e in np.unique(b['token_example_ids']):
        if e < 0:
          continue
        assert e not in seen
        where = b['token_example_ids'] == e
        seen[e] = b['tokens'][where].tolist()
    want = {i: data.example('a', i)['ids'][:-1].tolist() for i in range(data.sizes[0])}
    data.close()
  assert seen == want


@pytest.mark.parametrize('packing', [False, True])
def test_dev_batches_agree_on_buckets_across_hosts(files, packing):
  config = _config(files, packing)
  config.data.buckets = (16, 24, 40)
  hosts = [build_data(config, p, 2) for p in range(2)]
  dev = [list(data.dev_batches('a')) for data in hosts]
  assert len(dev[0]) == len(dev[1])
  for pair in zip(*dev):
    longest = max(int((b['segment_ids'] > 0).sum(axis=1).max()) for b in pair)
    assert {b['tokens'].shape[1] for b in pair} == {min(w for w in (16, 24, 40, 64) if w >= longest)}
  assert sorted(_segments(dev[0]) + _segments(dev[1])) == _segments(
      build_data(_config(files, False)).dev_batches('a'))
  for data in hosts:
    data.close()
