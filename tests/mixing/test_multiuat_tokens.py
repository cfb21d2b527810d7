"""MultiUAT's uncertainty, token-weighted over each dataset's dev batch as the authors' code
computes it (sum(entropy * mask) / sum(mask)), against hand numbers and a float64 forward."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mos_jax import models
from mos_jax.mixing import rewards
from mos_jax.steps import reward as reward_lib
from mos_jax.steps import state as state_lib

N, ROWS, LENGTH, VOCAB = 2, 2, 10, 32


def test_token_weighted_mean_by_hand():
  # Dataset 0: a row of 1 trained token with entropy 3 and one of 4 tokens summing to 10:
  # 13 / 5 = 2.6 (a mean of per-example means would say (3 + 2.5) / 2 = 2.75).
  # Dataset 1: no trained token at all -> 0, not NaN.
  got = rewards.token_weighted_mean(jnp.array([[3.0, 10.0], [0.0, 0.0]]),
                                    jnp.array([[1.0, 4.0], [0.0, 0.0]]))
  np.testing.assert_allclose(np.asarray(got), [2.6, 0.0], rtol=1e-6)


def test_dev_uncertainty_equals_a_float64_hand_computation():
  model = models.Decoder(models.get_preset('tiny', vocab_size=VOCAB), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(params)
  rng = np.random.default_rng(5)
  rows = N * ROWS
  tokens = rng.integers(0, VOCAB, (rows, LENGTH)).astype(np.int32)
  mask = np.zeros((rows, LENGTH), np.float32)
  for row, trained in enumerate([1, 9, 8, 3]):  # Example-major: rows 0, 2 are dataset 0's.
    mask[row, LENGTH - trained:] = 1.0
  batch = {'tokens': tokens, 'targets': np.roll(tokens, -1, 1), 'loss_mask': mask,
           'positions': np.broadcast_to(np.arange(LENGTH, dtype=np.int32), (rows, LENGTH)).copy(),
           'segment_ids': np.ones((rows, LENGTH), np.int32),
           'dataset_ids': np.tile(np.arange(N, dtype=np.int32), ROWS)}
  got = reward_lib.signal_step(params, None, {'dev': batch}, graphdef=graphdef, num_datasets=N,
                               signals=frozenset({'dev_entropy', 'dev_nll'}))

  logits = np.asarray(state_lib.merge(graphdef, params)(
      tokens, positions=batch['positions'], segment_ids=batch['segment_ids']).logits, np.float64)
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  entropy = -(np.exp(logp) * logp).sum(-1)  # [rows, L]
  nll = -np.take_along_axis(logp, batch['targets'][..., None], -1)[..., 0]
  for i in range(N):
    m = mask[i::N]
    np.testing.assert_allclose(float(got['dev_entropy'][i]),
                               (entropy[i::N] * m).sum() / m.sum(), rtol=1e-5)
    np.testing.assert_allclose(float(got['dev_nll'][i]), (nll[i::N] * m).sum() / m.sum(),
                               rtol=1e-5)
    assert float(got['dev_tokens'][i]) == m.sum()
  # Dataset 0's rows hold 1 and 8 trained tokens: the mean of per-row means is another number
  # (by far more than the tolerance above, for both measures).
  m = mask[0::N]
  for name, values in (('dev_entropy', entropy), ('dev_nll', nll)):
    per_row = ((values[0::N] * m).sum(1) / m.sum(1)).mean()
    assert abs(per_row - float(got[name][0])) > 1e-4, name
