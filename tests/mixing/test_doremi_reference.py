"""DoReMi with a reference model: the reference's per-token loss enters the domain weights exactly as
in Xie et al. 2023, Algorithm 1 (and the authors' doremi/trainer.py): per-token clipped excess loss
averaged over each domain's tokens, exponentiated-gradient step, normalisation, smoothing with the
uniform distribution; a domain without tokens keeps its previous excess. Checked against a float64
numpy computation from the models' full logits (not the chunked LM head the reward step uses)."""

import jax
import numpy as np
from flax import nnx

from mos_jax import models
from mos_jax.config import base_config
from mos_jax.mixing import make_strategy
from mos_jax.steps import reward as reward_lib
from mos_jax.steps.state import merge

N, B, L, V = 3, 2, 12, 32  # datasets, rows per dataset, tokens, vocab
ETA, C = 2.0, 0.1


def _params(seed):
  model = models.Decoder(models.get_preset('tiny', vocab_size=V), rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(model, nnx.Param)
  return graphdef, nnx.to_pure_dict(params)


def _batch(rng, empty=None):
  """[B * N] example-major rows (row j * N + i is dataset i's row j); partly trained rows; dataset
  `empty` trains no token."""
  tokens = rng.integers(0, V, (B * N, L)).astype(np.int32)
  mask = (rng.random((B * N, L)) < 0.7).astype(np.float32)
  ids = np.tile(np.arange(N, dtype=np.int32), B)
  if empty is not None:
    mask[ids == empty] = 0.0
  return {'tokens': tokens, 'targets': np.roll(tokens, -1, 1), 'loss_mask': mask,
          'positions': np.broadcast_to(np.arange(L, dtype=np.int32), (B * N, L)).copy(),
          'segment_ids': np.ones((B * N, L), np.int32), 'dataset_ids': ids}


def _token_nll(graphdef, params, batch):
  """float64 per-token NLL [rows, L] from the full logits."""
  out = merge(graphdef, params)(batch['tokens'], positions=batch['positions'],
                                segment_ids=batch['segment_ids'])
  logits = np.asarray(getattr(out, 'logits', out), np.float64)
  logits = logits - logits.max(-1, keepdims=True)
  log_z = np.log(np.exp(logits).sum(-1))
  target = np.take_along_axis(logits, batch['targets'][..., None], -1)[..., 0]
  return log_z - target


def _algorithm1(alpha, lam_prev, nll, ref, batch):
  """One DoReMi update in numpy: (new alpha, lambda)."""
  excess = np.maximum(nll - ref, 0.0) * batch['loss_mask']  # clipped per token
  lam = lam_prev.copy()
  for i in range(N):
    rows = batch['dataset_ids'] == i
    tokens = batch['loss_mask'][rows].sum()
    if tokens > 0:  # A domain absent from the batch keeps its previous score.
      lam[i] = excess[rows].sum() / tokens
  a = alpha * np.exp(ETA * lam)
  a = a / a.sum()
  return (1 - C) * a + C / N, lam


def test_reference_loss_enters_the_weights_as_in_algorithm_1(tmp_path):
  graphdef, theta = _params(0)
  _, ref = _params(1)
  mixing_config = base_config().mixing
  mixing_config.update({'strategy': 'doremi', 'doremi_eta': ETA, 'doremi_smoothing': C,
                        'prior_temperature': 1.0})
  mixing_config.doremi.reference = str(tmp_path / 'uni')
  sizes = [10, 30, 60]
  strategy = make_strategy(mixing_config, ['a', 'b', 'c'], sizes)
  assert strategy.signals == {'ref_excess'} and strategy.reference_run == str(tmp_path / 'uni')
  signals = jax.jit(lambda p, r, b: reward_lib.signal_step(
      p, r, {'train': b}, graphdef=graphdef, num_datasets=N, signals=strategy.signals,
      micro_rows=2))
  update = jax.jit(strategy.make_update(mixing_config))
  state = strategy.init_state(mixing_config, sizes, None)

  alpha, lam = np.asarray(sizes, np.float64) / sum(sizes), np.zeros(N)  # q_1: proportional
  rng = np.random.default_rng(0)
  for empty in (None, 1):  # The second update's batch has no trained token of dataset b.
    batch = _batch(rng, empty)
    nll, ref_nll = _token_nll(graphdef, theta, batch), _token_nll(graphdef, ref, batch)
    alpha, lam_new = _algorithm1(alpha, lam, nll, ref_nll, batch)
    state, info = update(state, signals(theta, ref, batch))
    np.testing.assert_allclose(info['reward'], lam_new, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(strategy.probs(state), alpha, rtol=2e-4)
    if empty is None:
      # The clip is per token: clipping each example's mean instead gives another lambda.
      per_example = [np.mean([max(((nll - ref_nll)[r] * batch['loss_mask'][r]).sum()
                                  / batch['loss_mask'][r].sum(), 0.0)
                              for r in np.flatnonzero(batch['dataset_ids'] == i)])
                     for i in range(N)]
      assert np.abs(np.asarray(per_example) - lam_new).max() > 1e-3
      assert (lam_new > 0).all()
    else:
      assert lam_new[1] == lam[1]  # kept from the first update
    lam = lam_new
  assert int(state.updates) == 2
