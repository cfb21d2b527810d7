"""DoReMi-style online weights (Xie et al. 2023) with theta_0 as the reference model.

Every mixing.update_every steps, on the train reward batches (the same batches and theta_0 NLLs as
MoS's DIFF, so the theta_0 cache is reused): the per-dataset excess loss
  lambda_i = mean over dataset i's examples x of max(l_theta(x) - l_theta0(x), 0),
with l(x) an example's mean token NLL (DoReMi clips per token; the theta_0 cache holds one NLL per
example, so here the clip is per example),
then the exponentiated-gradient step with step size eta, smoothed towards uniform by c:
  a'_i = a_i exp(eta lambda_i) / sum_j a_j exp(eta lambda_j),   a <- (1 - c) a' + c / N.
Sampling uses a (starting at q_tau). Note: fine-tuning from theta_0 mostly lowers the loss, so the
excess is often 0 (only examples the model got worse at count: forgetting) and the weights then
drift only by the smoothing; DoReMi's original reference is a separately trained model.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from mos_jax.mixing import base


@flax.struct.dataclass
class DoReMiState:
  weights: jax.Array  # [N] domain weights a (the sampling probabilities)
  last_reward: jax.Array  # [N] excess loss of the latest update (0 before any)
  updates: jax.Array  # int32 [] updates so far


def excess_loss(nll, nll0, valid):
  """Mean over valid examples of max(nll - nll0, 0): per-example NLLs [N, B] -> [N]."""
  return base.masked_mean(jnp.maximum(nll - nll0, 0.0), valid)


def eg_step(weights, excess, eta: float, smoothing: float):
  """One exponentiated-gradient step, then (1 - c) a' + c / N."""
  new = jax.nn.softmax(jnp.log(weights) + eta * excess)
  return (1.0 - smoothing) * new + smoothing / weights.shape[0]


@base.register('doremi')
@dataclasses.dataclass(frozen=True)
class DoReMi(base.Strategy):
  eta: float = 1.0
  smoothing: float = 1e-3

  @property
  def signals(self):
    return frozenset({'nll', 'nll0'})

  @classmethod
  def from_config(cls, mixing_config, names, prior):
    base.no_target(mixing_config, 'doremi')
    eta, c = float(mixing_config.doremi_eta), float(mixing_config.doremi_smoothing)
    if eta <= 0:
      raise ValueError(f'mixing.doremi_eta must be > 0, got {eta}.')
    if not 0.0 <= c <= 1.0:
      raise ValueError(f'mixing.doremi_smoothing must be in [0, 1], got {c}.')
    return cls(name='doremi', names=names, prior=prior, eta=eta, smoothing=c)

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
      excess = excess_loss(signals['nll'], signals['nll0'], signals['valid'])
      weights = eg_step(state.weights, excess, self.eta, self.smoothing)
      new = DoReMiState(weights=weights, last_reward=excess, updates=state.updates + 1)
      return new, {'reward': excess, 'raw_reward': excess, 'probs': weights}
    return update
