"""The scorer's training state and its REINFORCE update (Algorithm 1, line 11).

`make_update_fn(config.mixing)` closes over the static settings and returns a pure
`(state, raw_rewards) -> (state, info)` that the caller jits once, apart from the train step.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import optax

from mos_jax.mixing import rewards as rewards_lib
from mos_jax.mixing import scorer
from mos_jax.mixing.prior import prior_probs


@flax.struct.dataclass
class MixingState:
  params: Any  # scorer psi (see scorer.init)
  opt_state: Any  # optax.adam state of psi; kept across updates, as the released code does
  prev_reward: jax.Array  # [N] smoothed reward of the previous update (EMA memory), starts at 1
  last_reward: jax.Array  # [N] raw reward given to the latest update (0 before any)
  updates: jax.Array  # int32 [] scorer updates so far


def init_mixing_state(mixing_config, sizes: Sequence[int], key: jax.Array) -> MixingState:
  """Scorer at q_tau (tau = mixing.prior_temperature), fresh Adam state, EMA memory at 1."""
  prior = prior_probs(sizes, mixing_config.prior_temperature)
  params = scorer.init(len(prior), prior, int(mixing_config.scorer_hidden), key)
  n = len(prior)
  return MixingState(
      params=params,
      opt_state=optax.adam(float(mixing_config.scorer_lr)).init(params),
      prev_reward=jnp.ones((n,), jnp.float32),
      last_reward=jnp.zeros((n,), jnp.float32),
      updates=jnp.zeros((), jnp.int32),
  )


def update_mixing(state: MixingState, raw_rewards: jax.Array, *, inner_steps: int, lr: float,
                  ema: bool, alpha: float, normalize: bool, min_prob: float = 0.0
                  ) -> tuple[MixingState, dict[str, jax.Array]]:
  """Raw reward [N] -> EMA (if on) -> standardise (if on) -> `inner_steps` Adam steps on Eq. 6.

  The EMA memory keeps the smoothed, unstandardised reward. `info` holds `reward` (smoothed),
  `raw_reward`, `loss` (Eq. 6 before the steps) and `probs` (new, with the min_prob floor).
  """
  raw = jnp.asarray(raw_rewards, jnp.float32)
  smoothed = rewards_lib.ema(state.prev_reward, raw, alpha) if ema else raw
  used = rewards_lib.normalize(smoothed) if normalize else smoothed
  tx = optax.adam(lr)
  grad_fn = jax.grad(scorer.loss)

  def step(_, carry):
    params, opt_state = carry
    updates, opt_state = tx.update(grad_fn(params, used), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  # Many small steps per update: one Adam step of lr 1e-4 would barely move p.
  params, opt_state = jax.lax.fori_loop(0, inner_steps, step, (state.params, state.opt_state))
  new_state = state.replace(params=params, opt_state=opt_state, prev_reward=smoothed,
                            last_reward=raw, updates=state.updates + 1)
  info = {'reward': smoothed, 'raw_reward': raw, 'loss': scorer.loss(state.params, used),
          'probs': scorer.probs(params, min_prob)}
  return new_state, info


def make_update_fn(mixing_config, ema: bool | None = None):
  """The pure update for `config.mixing`; the static strategy gets one that changes nothing.

  `ema`: whether rewards are smoothed (Eq. 11); None reads mixing.ema. Strategies pass their own
  (MultiDDS and MultiUAT take mixing.rival_ema: their reference code has no moving average).
  """
  min_prob = float(mixing_config.min_prob)
  if int(mixing_config.inner_steps) < 1:
    raise ValueError(f'mixing.inner_steps must be >= 1, got {mixing_config.inner_steps}.')
  if not 0.0 < float(mixing_config.ema_alpha) <= 1.0:
    raise ValueError(f'mixing.ema_alpha must be in (0, 1], got {mixing_config.ema_alpha}.')
  if float(mixing_config.scorer_lr) <= 0:
    raise ValueError(f'mixing.scorer_lr must be > 0, got {mixing_config.scorer_lr}.')
  if mixing_config.strategy == 'static':
    def frozen(state: MixingState, raw_rewards: jax.Array):
      del raw_rewards
      return state, {'reward': state.prev_reward, 'raw_reward': state.last_reward,
                     'loss': jnp.zeros((), jnp.float32),
                     'probs': scorer.probs(state.params, min_prob)}
    return frozen
  return functools.partial(
      update_mixing,
      inner_steps=int(mixing_config.inner_steps),
      lr=float(mixing_config.scorer_lr),
      ema=bool(mixing_config.ema if ema is None else ema),
      alpha=float(mixing_config.ema_alpha),
      normalize=bool(mixing_config.normalize_rewards),
      min_prob=min_prob,
  )
