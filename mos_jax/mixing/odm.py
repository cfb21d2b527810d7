"""ODM, online data mixing (Albalak et al. 2023): an EXP3 bandit over datasets.

After every train step, from that step's own metrics (no extra forward): the dataset i just drawn
gets the importance-weighted reward L_i / pi(i), smoothed R_i <- alpha R_i + (1 - alpha) L_i / pi(i),
where L_i is the batch's token-mean loss on dataset i (every dataset present, with per-example
mixing). The next draw uses, with K datasets and t steps taken,
  eps_t = min(1/K, sqrt(ln K / (K t))),  eps_0 = 1/K,
  pi(i) = (1 - K eps_{t+1}) softmax(eps_t R)_i + eps_{t+1}.
Non-finite (skipped) steps leave the state alone.
"""

from __future__ import annotations

import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp

from mos_jax.mixing import base


@flax.struct.dataclass
class ODMState:
  reward: jax.Array  # [N] smoothed importance-weighted loss R (starts at 0)
  probs: jax.Array  # [N] pi for the next draw
  steps: jax.Array  # int32 [] train steps seen (t)


def exploration(t, k: int):
  """eps_t = min(1/K, sqrt(ln K / (K t))); eps_0 = 1/K."""
  t = jnp.asarray(t, jnp.float32)
  return jnp.where(t > 0, jnp.minimum(1.0 / k, jnp.sqrt(math.log(k) / (k * jnp.maximum(t, 1.0)))),
                   1.0 / k)


def policy(reward, t, k: int):
  """pi for the draw after t steps: (1 - K eps_{t+1}) softmax(eps_t R) + eps_{t+1}."""
  eps_next = exploration(t + 1, k)
  return (1.0 - k * eps_next) * jax.nn.softmax(exploration(t, k) * reward) + eps_next


@base.register('odm')
@dataclasses.dataclass(frozen=True)
class ODM(base.Strategy):
  alpha: float = 0.9  # smoothing of the reward

  @property
  def per_step(self):
    return True

  @classmethod
  def from_config(cls, mixing_config, names, prior, train_steps=None):
    base.no_target(mixing_config, 'odm')
    alpha = float(mixing_config.odm_alpha)
    if not 0.0 <= alpha < 1.0:
      raise ValueError(f'mixing.odm_alpha must be in [0, 1), got {alpha}.')
    return cls(name='odm', names=names, prior=prior, alpha=alpha)

  def init_state(self, mixing_config, sizes, key):
    del mixing_config, key
    k = len(sizes)
    reward = jnp.zeros((k,), jnp.float32)
    return ODMState(reward=reward, probs=policy(reward, 0, k), steps=jnp.zeros((), jnp.int32))

  def probs(self, state):
    return state.probs

  def after_train_step(self, state, metrics):
    k = len(self.names)
    tokens = metrics['dataset_tokens']  # [N]
    loss = metrics['dataset_nll'] / jnp.maximum(tokens, 1.0)  # [N] token-mean loss per dataset
    drawn = (tokens > 0) & metrics['finite']
    new = self.alpha * state.reward + (1.0 - self.alpha) * loss / state.probs
    reward = jnp.where(drawn, new, state.reward).astype(jnp.float32)
    t = state.steps + metrics['finite'].astype(jnp.int32)
    return ODMState(reward=reward, probs=policy(reward, t, k).astype(jnp.float32), steps=t)

  def step_rewards(self, state):
    return state.reward
