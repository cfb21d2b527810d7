"""COSSIM, DIFF, EMA and normalisation against references written as plain numpy loops."""

import math

import jax.numpy as jnp
import numpy as np

from mos_jax.mixing import rewards

RNG = np.random.default_rng(0)


def _pool_by_hand(hidden, segment_ids):
  examples = []
  for b in range(hidden.shape[0]):
    for k in range(1, int(segment_ids[b].max(initial=0)) + 1):
      tokens = [hidden[b, t] for t in range(hidden.shape[1]) if segment_ids[b, t] == k]
      if tokens:
        examples.append(sum(tokens) / len(tokens))
  return sum(examples) / len(examples)


def test_pooled_embedding_matches_loops():
  hidden = RNG.normal(size=(4, 5, 3)).astype(np.float32)
  # Row 1 packs three examples; row 2 is all padding and counts for nothing.
  segments = np.array([[1, 1, 1, 0, 0], [1, 1, 2, 3, 3], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]],
                      np.int32)
  z = rewards.pooled_embedding(jnp.asarray(hidden), jnp.asarray(segments))
  np.testing.assert_allclose(z, _pool_by_hand(hidden, segments), rtol=1e-5)
  unpacked = (segments > 0).astype(np.int32)  # The same tokens as one example per row.
  z_rows = rewards.pooled_embedding(jnp.asarray(hidden), jnp.asarray(unpacked))
  np.testing.assert_allclose(z_rows, _pool_by_hand(hidden, unpacked), rtol=1e-5)


def test_pooled_embedding_empty_batch_is_finite():
  z = rewards.pooled_embedding(jnp.ones((2, 3, 4)), jnp.zeros((2, 3), jnp.int32))
  assert np.all(np.isfinite(z)) and np.all(np.asarray(z) == 0)


def _cos(a, b):
  return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_cossim_matches_loops():
  z = RNG.normal(size=(4, 6))
  expected = [sum(_cos(z[i], z[n]) for n in range(4)) / 4 for i in range(4)]
  np.testing.assert_allclose(rewards.cossim(jnp.asarray(z, jnp.float32)), expected, rtol=1e-5)


def test_cossim_small_example_by_hand():
  z = jnp.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
  s = 1 / math.sqrt(2)
  expected = [(1 + 0 + s) / 3, (0 + 1 + s) / 3, (s + s + 1) / 3]
  np.testing.assert_allclose(rewards.cossim(z), expected, rtol=1e-6)


def test_cossim_mospec_is_similarity_to_target():
  z = RNG.normal(size=(3, 5))
  expected = [_cos(z[i], z[1]) for i in range(3)]
  got = rewards.cossim(jnp.asarray(z, jnp.float32), target=1)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  np.testing.assert_allclose(got[1], 1.0, rtol=1e-6)


def test_cossim_zero_embedding_is_finite():
  r = rewards.cossim(jnp.array([[0.0, 0.0], [1.0, 0.0]]))
  assert np.all(np.isfinite(r))


def _diff_by_hand(nll, nll0, valid):
  out = []
  for i in range(nll.shape[0]):
    ratios = [math.exp(nll[i, b]) / math.exp(nll0[i, b]) for b in range(nll.shape[1]) if valid[i, b]]
    out.append(sum(ratios) / len(ratios))
  return np.array(out)


def test_diff_matches_loops():
  nll = RNG.uniform(0.5, 3.0, size=(3, 4))
  nll0 = RNG.uniform(0.5, 3.0, size=(3, 4))
  valid = np.array([[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 1]], bool)
  got = rewards.diff(jnp.asarray(nll, jnp.float32), jnp.asarray(nll0, jnp.float32), jnp.asarray(valid))
  np.testing.assert_allclose(got, _diff_by_hand(nll, nll0, valid), rtol=1e-5)


def test_diff_is_one_when_model_unchanged():
  nll = jnp.asarray(RNG.uniform(0.5, 3.0, size=(3, 4)), jnp.float32)
  r = rewards.diff(nll, nll, jnp.ones((3, 4)))
  np.testing.assert_array_equal(r, np.ones(3, np.float32))


def test_diff_ignores_garbage_in_padded_rows_and_empty_datasets_are_neutral():
  nll = jnp.array([[1.0, jnp.inf], [jnp.nan, 2.0]])
  nll0 = jnp.array([[0.5, 0.0], [1.0, 2.0]])
  valid = jnp.array([[1, 0], [0, 0]])
  np.testing.assert_allclose(rewards.diff(nll, nll0, valid), [math.exp(0.5), 1.0], rtol=1e-6)


def test_diff_mospec_multiplies_target():
  nll = RNG.uniform(0.5, 3.0, size=(3, 2))
  nll0 = RNG.uniform(0.5, 3.0, size=(3, 2))
  valid = np.ones((3, 2), bool)
  base = _diff_by_hand(nll, nll0, valid)
  got = rewards.diff(jnp.asarray(nll, jnp.float32), jnp.asarray(nll0, jnp.float32),
                     jnp.asarray(valid), target=2, factor=2.0)
  np.testing.assert_allclose(got, [base[0], base[1], 2 * base[2]], rtol=1e-5)


def test_example_nll_is_mean_over_response_tokens():
  from mos_jax.models import loss
  token_nll = jnp.array([[1.0, 2.0, 3.0, 7.0], [4.0, 5.0, 6.0, 8.0]])
  mask = jnp.array([[0, 1, 1, 0], [0, 0, 0, 0]], jnp.float32)
  segments = jnp.array([[1, 1, 1, 0], [1, 1, 1, 1]], jnp.int32)
  nll, has = loss.per_segment_mean(token_nll, segments, mask)
  np.testing.assert_allclose(nll[:, 0], [2.5, 0.0])  # Segment 1 of each row at index 0.
  np.testing.assert_array_equal(has, [[True, False, False, False], [False] * 4])
  # Packed: segments 1, 2, 3 of one row; segment 2 trains nothing.
  nll, has = loss.per_segment_mean(jnp.array([[1.0, 2.0, 3.0, 5.0]]),
                                   jnp.array([[1, 2, 3, 3]]), jnp.array([[1.0, 0.0, 1.0, 1.0]]))
  np.testing.assert_allclose(nll, [[1.0, 0.0, 4.0, 0.0]])
  np.testing.assert_array_equal(has, [[True, False, True, False]])


def test_ema_two_updates_by_hand():
  prev = jnp.ones(2)
  r1 = rewards.ema(prev, jnp.array([3.0, 0.0]), 0.9)
  np.testing.assert_allclose(r1, [0.9 * 3 + 0.1 * 1, 0.1], rtol=1e-6)  # [2.8, 0.1]
  r2 = rewards.ema(r1, jnp.array([1.0, 2.0]), 0.9)
  np.testing.assert_allclose(r2, [0.9 + 0.28, 1.8 + 0.01], rtol=1e-6)  # [1.18, 1.81]


def test_normalize_standardises_across_datasets():
  r = np.array([1.0, 2.0, 4.0])
  expected = (r - r.mean()) / r.std()
  np.testing.assert_allclose(rewards.normalize(jnp.asarray(r, jnp.float32)), expected, rtol=1e-5)
  np.testing.assert_allclose(rewards.normalize(jnp.full(3, 7.0)), np.zeros(3), atol=1e-6)
