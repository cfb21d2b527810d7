"""Rewards on packed rows: every per-example signal is per packed example (segment).

References: the same examples one per row (the unpacked path, itself checked against hand
computations in test_mixing_rewards / test_mixing_rivals / test_steps_memory), the per-row code
as it was before segments (for bit equality on unpacked rows), and hand-built theta_0 arrays.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mos_jax.models import loss as loss_lib
from mos_jax import models
from mos_jax.steps import reference_cache
from mos_jax.steps import sft
from mos_jax.data import pipeline
from mos_jax.mixing import rewards
from mos_jax.steps import reward as reward_lib

VOCAB, LENGTH, NAMES = 48, 24, ('a', 'b')
# Examples per dataset and how they pack into 2 rows of LENGTH tokens (lengths in positions).
LENGTHS = {'a': [5, 9, 7, 11, 6, 4], 'b': [12, 8, 3, 10, 9, 5]}
PACKS = {'a': [[0, 1, 2], [3, 4, 5]], 'b': [[0, 1, 2], [3, 4, 5]]}


def _examples(rng):
  out = {}
  for name, lengths in LENGTHS.items():
    out[name] = []
    for i, n in enumerate(lengths):
      trained = np.zeros(n + 1, bool)
      trained[1 + n // 3:] = True  # A prompt, then a trained response.
      out[name].append({'ids': rng.integers(1, VOCAB, n + 1).astype(np.int32),
                        'trained': trained, 'example_id': 10 + 3 * i})
  return out


def _batch(examples, packed: bool):
  """Example-major [rows * N] reward rows of both datasets, packed or one example per row."""
  per_dataset = {}
  for d, name in enumerate(NAMES):
    rows = [pipeline.to_row(e) for e in examples[name]]
    if packed:
      rows = [pipeline.pack_rows([rows[i] for i in group]) for group in PACKS[name]]
    batch = pipeline.stack(rows, LENGTH, 0)
    del batch['lengths']
    batch['dataset_ids'] = np.full(len(rows), d, np.int32)
    # pylint: disable-next=protected-access
    per_dataset[name] = pipeline._with_token_example_ids(batch, rows)
  return reward_lib.stack_reward_batches(per_dataset, NAMES)


@pytest.fixture(scope='module')
def setup():
  config = models.get_preset('tiny', vocab_size=VOCAB)
  assert jnp.dtype(config.dtype) == jnp.float32
  split = lambda seed: nnx.split(models.Decoder(config, rngs=nnx.Rngs(seed)), nnx.Param)
  graphdef, params = split(0)
  theta0 = nnx.to_pure_dict(split(1)[1])
  examples = _examples(np.random.default_rng(0))
  # A theta_0 table per dataset, indexed by example id (ids 10, 13, ... are the examples').
  tables = {n: np.random.default_rng(d + 5).uniform(1.0, 4.0, 40).astype(np.float32)
            for d, n in enumerate(NAMES)}
  return graphdef, nnx.to_pure_dict(params), theta0, examples, tables


def _reward(setup, batch, micro_rows=0, device_reference=False):
  graphdef, params, theta0, _, _ = setup
  fn = jax.jit(functools.partial(reward_lib.reward_step, graphdef=graphdef, num_datasets=len(NAMES),
                                 micro_rows=micro_rows))
  return jax.device_get(fn(params, theta0 if device_reference else None, batch))


def _examples_in_order(values, valid):
  """[N, slots] per-segment values -> [N, examples]: the valid slots, in row then segment order."""
  values, valid = np.asarray(values), np.asarray(valid)
  return np.stack([values[i][valid[i]] for i in range(values.shape[0])])


def test_packed_rows_hold_the_examples_of_the_unpacked_ones(setup):
  examples = setup[3]
  packed, unpacked = _batch(examples, True), _batch(examples, False)
  assert packed['tokens'].shape == (4, LENGTH) and unpacked['tokens'].shape == (12, LENGTH)
  assert packed['segment_ids'].max() == 3 and unpacked['segment_ids'].max() == 1
  assert np.all(packed['example_ids'] == -1)


@pytest.mark.parametrize('micro_rows', [0, 2])
def test_packed_rewards_equal_unpacked(setup, micro_rows):
  *_, examples, tables = setup
  packed, unpacked = _batch(examples, True), _batch(examples, False)
  for batch in (packed, unpacked):
    batch['nll0'] = reference_cache.lookup(tables, NAMES, batch)
  got = _reward(setup, packed, micro_rows)
  want = _reward(setup, unpacked)
  assert got['nll'].shape == (2, 2 * LENGTH) and want['nll'].shape == (2, 6 * LENGTH)
  assert got['valid'].sum() == want['valid'].sum() == 12  # Every example, once.
  # COSSIM (Eq. 7): the mean over the dataset's examples of each one's mean hidden state.
  np.testing.assert_allclose(got['embeddings'], want['embeddings'], rtol=1e-5, atol=1e-6)
  for key in ('nll', 'nll0'):
    np.testing.assert_allclose(_examples_in_order(got[key], got['valid']),
                               _examples_in_order(want[key], want['valid']), rtol=1e-5)
  # The cached theta_0 NLL of each example, read back exactly.
  np.testing.assert_array_equal(
      _examples_in_order(got['nll0'], got['valid']),
      np.stack([tables[n][[e['example_id'] for e in examples[n]]] for n in NAMES]))
  # DIFF (Eq. 10) and COSSIM (Eq. 8) rewards.
  np.testing.assert_allclose(rewards.diff(got['nll'], got['nll0'], got['valid']),
                             rewards.diff(want['nll'], want['nll0'], want['valid']), rtol=1e-5)
  np.testing.assert_allclose(rewards.cossim(got['embeddings']), rewards.cossim(want['embeddings']),
                             rtol=1e-5)


def test_packed_device_reference_equals_unpacked(setup):
  examples = setup[3]
  got = _reward(setup, _batch(examples, True), device_reference=True)
  want = _reward(setup, _batch(examples, False), device_reference=True)
  np.testing.assert_allclose(_examples_in_order(got['nll0'], got['valid']),
                             _examples_in_order(want['nll0'], want['valid']), rtol=1e-5)


def test_packed_dev_uncertainty_equals_unpacked(setup):
  graphdef, params, _, examples, _ = setup
  step = jax.jit(functools.partial(reward_lib.signal_step, graphdef=graphdef, num_datasets=2,
                                   signals=frozenset({'dev_entropy', 'dev_nll'})))
  got = jax.device_get(step(params, None, {'dev': _batch(examples, True)}))
  want = jax.device_get(step(params, None, {'dev': _batch(examples, False)}))
  # MultiUAT's reward: token-weighted over each dataset's dev tokens [N], packed or not.
  np.testing.assert_array_equal(got['dev_tokens'], want['dev_tokens'])
  for key in ('dev_entropy', 'dev_nll'):
    assert got[key].shape == (2,)
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5)


def _per_row_reward(graphdef, params, theta0, batch, num_datasets):
  """The reward step as it was before segments: one example per row (kept here as a reference)."""
  def example_nll(p):
    nll, hidden = sft.forward_nll(graphdef, p, batch)
    total, count = loss_lib.masked_sums(nll, batch['loss_mask'])
    return total / jnp.maximum(count, 1.0), count > 0, hidden
  per_dataset = lambda x: x.reshape((-1, num_datasets) + x.shape[1:]).swapaxes(0, 1)
  nll, valid, hidden = example_nll(params)
  mask = (batch['segment_ids'] > 0).astype(jnp.float32)
  count = mask.sum(axis=1)
  row = jnp.einsum('BLD,BL->BD', hidden.astype(jnp.float32), mask)
  row = row / jnp.maximum(count, 1.0)[:, None]
  ok = per_dataset((count > 0).astype(jnp.float32))[..., None]  # [N, b, 1]
  embeddings = jnp.sum(per_dataset(row) * ok, axis=1) / jnp.maximum(jnp.sum(ok, axis=1), 1.0)
  return {'nll': per_dataset(nll), 'valid': per_dataset(valid), 'embeddings': embeddings,
          'nll0': per_dataset(example_nll(theta0)[0])}


def test_unpacked_rows_give_the_per_row_values_bit_for_bit(setup):
  graphdef, params, theta0, examples, _ = setup
  batch = _batch(examples, False)
  got = _reward(setup, batch, device_reference=True)
  want = jax.device_get(jax.jit(functools.partial(_per_row_reward, graphdef, num_datasets=2))(
      params, theta0, batch))
  np.testing.assert_array_equal(got['embeddings'], want['embeddings'])
  first = lambda x: np.asarray(x).reshape(2, 6, LENGTH)[..., 0]  # Segment 1 of every row.
  for key in ('nll', 'valid', 'nll0'):
    np.testing.assert_array_equal(first(got[key]), want[key])
    rest = np.asarray(got[key]).reshape(2, 6, LENGTH)[..., 1:]
    assert not rest.any()  # No second segment anywhere.
  # The rewards sum over more (empty) slots; equal up to the order of the additions.
  np.testing.assert_allclose(rewards.diff(got['nll'], got['nll0'], got['valid']),
                             rewards.diff(want['nll'], want['nll0'], want['valid']), rtol=1e-6)


def test_lookup_gives_each_tokens_example_nll(setup):
  *_, examples, tables = setup
  packed = _batch(examples, True)
  want = np.zeros(packed['tokens'].shape, np.float32)
  for r in range(packed['tokens'].shape[0]):
    name = NAMES[packed['dataset_ids'][r]]
    group = PACKS[name][r // len(NAMES)]
    t = 0
    for i in group:
      n = LENGTHS[name][i]
      want[r, t:t + n] = tables[name][examples[name][i]['example_id']]
      t += n  # The rest of the row is padding: 0.
  np.testing.assert_array_equal(reference_cache.lookup(tables, NAMES, packed), want)
  # Unpacked rows without token ids: each row's example id on its real tokens.
  unpacked = _batch(examples, False)
  del unpacked['token_example_ids']
  with_ids = _batch(examples, False)
  np.testing.assert_array_equal(reference_cache.lookup(tables, NAMES, unpacked),
                                reference_cache.lookup(tables, NAMES, with_ids))
  del packed['token_example_ids']
  with pytest.raises(ValueError, match='token_example_ids'):
    reference_cache.lookup(tables, NAMES, packed)
