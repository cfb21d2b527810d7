"""MultiDDS's reward against its authors' way of computing it: one gradient per dev set, one
cosine per (train set, dev set) pair, then the mean over dev sets (their `ave` utility), in
float64 from separately computed gradients."""

import jax
import numpy as np
import pytest
from flax import nnx

from mos_jax import models
from mos_jax.steps import reward as reward_lib
from mos_jax.steps import sft

N, ROWS, LENGTH, VOCAB = 3, 2, 24, 32


def _batch(rng, trained):
  """Example-major rows (row r * N + i is row r of dataset i); trained[i][r] = the number of
  trained (answer) tokens of that row, at its end."""
  rows = N * ROWS
  tokens = rng.integers(0, VOCAB, (rows, LENGTH)).astype(np.int32)
  mask = np.zeros((rows, LENGTH), np.float32)
  for i in range(N):
    for r in range(ROWS):
      mask[r * N + i, LENGTH - trained[i][r]:] = 1.0
  return {'tokens': tokens, 'targets': np.roll(tokens, -1, 1), 'loss_mask': mask,
          'positions': np.broadcast_to(np.arange(LENGTH, dtype=np.int32), (rows, LENGTH)).copy(),
          'segment_ids': np.ones((rows, LENGTH), np.int32),
          'dataset_ids': np.tile(np.arange(N, dtype=np.int32), ROWS)}


def _flat_grad(graphdef, params, batch, mask):
  """float64 gradient of the batch's token-summed loss, over the masked leaves."""
  g = jax.grad(lambda p: sft.sum_loss(p, graphdef, batch, N)[0])(params)
  return np.concatenate([np.asarray(x, np.float64).ravel()
                         for x, m in zip(jax.tree.leaves(g), mask) if m])


def _dataset(batch, i):
  return {k: v[i::N] for k, v in batch.items()}


@pytest.mark.parametrize('pattern', ['', 'mlp'])
def test_mean_of_per_dev_set_cosines_as_the_reference(pattern):
  model = models.Decoder(models.get_preset('tiny', vocab_size=VOCAB), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(params)
  rng = np.random.default_rng(7)
  train = _batch(rng, [[6, 9], [3, 12], [8, 5]])
  # Dev answers of very different lengths: dataset 0's dominate a sum of token-summed losses.
  dev = _batch(rng, [[24, 24], [1, 1], [2, 1]])
  for k in train:  # Dataset 1 trains on its own dev rows: cos(g_1, d_1) = 1.
    train[k][1::N] = dev[k][1::N]
  mask = reward_lib.gradient_mask(params, pattern)
  got = np.asarray(jax.jit(lambda p, t, d: reward_lib.gradient_cosines(
      p, t, d, graphdef=graphdef, num_datasets=N, mask=mask))(params, train, dev))

  g = [_flat_grad(graphdef, params, _dataset(train, i), mask) for i in range(N)]
  d = [_flat_grad(graphdef, params, _dataset(dev, j), mask) for j in range(N)]
  # get_grad_sim: dot / (sqrt(|g|^2 |d|^2) + 1e-10); utility 'ave': mean over dev sets j.
  cos = np.array([[gi @ dj / (np.sqrt((gi @ gi) * (dj @ dj)) + 1e-10) for gi in g] for dj in d])
  want = cos.mean(axis=0)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)

  assert want[1] > 1 / N - 0.1  # Its own dev set counts 1 / N, whatever its length.
  # The former reward, one cosine against the gradient of all dev losses summed, follows
  # dataset 0's long dev answers and gives dataset 1 much less: the test tells the two apart.
  total = sum(d)
  old = np.array([gi @ total / np.linalg.norm(gi) / np.linalg.norm(total) for gi in g])
  assert old[1] < want[1] - 0.1, (old, want)


def test_a_dev_set_without_trained_tokens_adds_zero_and_still_counts():
  model = models.Decoder(models.get_preset('tiny', vocab_size=VOCAB), rngs=nnx.Rngs(1))
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(params)
  rng = np.random.default_rng(3)
  train = _batch(rng, [[6, 9], [3, 12], [8, 5]])
  dev = _batch(rng, [[4, 4], [0, 0], [5, 2]])  # Dataset 1's dev batch trains nothing.
  mask = reward_lib.gradient_mask(params, '')
  got = np.asarray(reward_lib.gradient_cosines(params, train, dev, graphdef=graphdef,
                                               num_datasets=N, mask=mask))
  g = [_flat_grad(graphdef, params, _dataset(train, i), mask) for i in range(N)]
  d = [_flat_grad(graphdef, params, _dataset(dev, j), mask) for j in (0, 2)]
  want = [sum(gi @ dj / np.linalg.norm(gi) / np.linalg.norm(dj) for dj in d) / N for gi in g]
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
