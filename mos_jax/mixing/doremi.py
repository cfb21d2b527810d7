"""DoReMi's online domain weights (Xie et al. 2023, "DoReMi: Optimizing Data Mixtures Speeds Up
Language Model Pretraining", NeurIPS 2023, Algorithm 1), against a reference model.

`doremi`: the reference is another, finished run (`mixing.doremi.reference=DIR`; DoReMi's is a
model trained on the uniform mixture, so `compare` points it at the `uni` run of the same data and
seed), whose final parameters sit frozen beside theta. Every mixing.update_every steps, on one train
reward batch B_i of every dataset i (signal 'ref_excess', steps/reward.py), Algorithm 1 line 3:
  lambda_i = sum_{x in B_i} sum_j max(l_theta,j(x) - l_ref,j(x), 0) / sum_{x in B_i} |x|
(the per-token excess loss, clipped at 0 per token, averaged over the batch's trained tokens),
then lines 4-5, the exponentiated-gradient step and the smoothing with the uniform u = 1/k:
  a'_i = a_i exp(eta lambda_i) / sum_j a_j exp(eta lambda_j),   a <- (1 - c) a' + c / k.
As in the authors' code (github.com/sangmichaelxie/doremi, doremi/trainer.py,
`DoReMiTrainer.update_domain_weights`: `torch.clip(scores, min=0).mean()` over a domain's tokens,
`softmax(log(w) + reweight_eta * scores)`, `(1 - reweight_eps) * w + reweight_eps / k`; defaults
eta 1, c 1e-3), a dataset without trained tokens in the batch keeps its previous lambda. The weights
are the sampling distribution (starting at q_tau; DoReMi's uniform start is tau = inf).

`excess_theta0`: the same update with theta_0 as the reference, on the per-example mean NLLs that
MoS's DIFF uses (signals nll, nll0; the theta_0 cache holds one NLL per example, so the clip is per
example): lambda_i = mean over dataset i's examples of max(l_theta(x) - l_theta0(x), 0). Fine-tuning
mostly lowers every loss below theta_0's, so lambda is mostly 0 and the weights drift only by the
smoothing; this was `doremi` before the reference run existed.
"""

from __future__ import annotations

import dataclasses
import os

import flax.struct
import jax
import jax.numpy as jnp

from mos_jax.mixing import base
from mos_jax.mixing.replay import source_folder


@flax.struct.dataclass
class DoReMiState:
  weights: jax.Array  # [N] domain weights a (the sampling probabilities)
  last_reward: jax.Array  # [N] lambda of the latest update (0 before any)
  updates: jax.Array  # int32 [] updates so far


def excess_loss(nll, nll0, valid):
  """Mean over valid examples of max(nll - nll0, 0): per-example NLLs [N, B] -> [N]."""
  return base.masked_mean(jnp.maximum(nll - nll0, 0.0), valid)


def eg_step(weights, excess, eta: float, smoothing: float):
  """One exponentiated-gradient step, then (1 - c) a' + c / N."""
  new = jax.nn.softmax(jnp.log(weights) + eta * excess)
  return (1.0 - smoothing) * new + smoothing / weights.shape[0]


@base.register('doremi', 'excess_theta0')
@dataclasses.dataclass(frozen=True)
class DoReMi(base.Strategy):
  eta: float = 1.0
  smoothing: float = 1e-3
  reference: str = ''  # doremi: the reference run folder; excess_theta0: '' (theta_0)

  @property
  def signals(self):
    return frozenset({'ref_excess'} if self.reference else {'nll', 'nll0'})

  @property
  def reference_run(self) -> str:
    return self.reference

  @classmethod
  def from_config(cls, mixing_config, names, prior, train_steps=None):
    name = mixing_config.strategy
    base.no_target(mixing_config, name)
    eta, c = float(mixing_config.doremi_eta), float(mixing_config.doremi_smoothing)
    if eta <= 0:
      raise ValueError(f'mixing.doremi_eta must be > 0, got {eta}.')
    if not 0.0 <= c <= 1.0:
      raise ValueError(f'mixing.doremi_smoothing must be in [0, 1], got {c}.')
    reference = source_folder(mixing_config, 'doremi', 'reference')
    if name == 'doremi' and not reference:
      raise ValueError('mixing.strategy=doremi needs mixing.doremi.reference=DIR, a finished run '
                       'of the same data and model (e.g. the uni run of the same seed) whose final '
                       'checkpoint is the reference model; theta_0 as the reference is '
                       'mixing.strategy=excess_theta0')
    if name == 'excess_theta0':
      reference = ''  # theta_0 (config/check.py refuses a reference set for it).
    if reference:
      reference = os.path.abspath(os.path.expanduser(reference))
    return cls(name=name, names=names, prior=prior, eta=eta, smoothing=c, reference=reference)

  def init_state(self, mixing_config, sizes, key):
    del mixing_config, sizes, key
    n = len(self.prior)
    return DoReMiState(weights=jnp.asarray(self.prior, jnp.float32),
                       last_reward=jnp.zeros((n,), jnp.float32), updates=jnp.zeros((), jnp.int32))

  def probs(self, state):
    return state.weights

  def make_update(self, mixing_config):
    del mixing_config

    def update(state, signals):
      if self.reference:  # A dataset without trained tokens keeps its previous lambda.
        excess = jnp.where(signals['ref_tokens'] > 0, signals['ref_excess'], state.last_reward)
      else:
        excess = excess_loss(signals['nll'], signals['nll0'], signals['valid'])
      weights = eg_step(state.weights, excess, self.eta, self.smoothing)
      new = DoReMiState(weights=weights, last_reward=excess, updates=state.updates + 1)
      return new, {'reward': excess, 'raw_reward': excess, 'probs': weights}
    return update
