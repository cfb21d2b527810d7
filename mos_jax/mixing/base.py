"""The strategy interface: what a mixing strategy declares and what the training loop calls.

A strategy declares the *signals* it needs (names in `SIGNALS`); the reward step
(`mos_jax.steps.sft.reward.signal_step`) computes exactly those in one jit every
`mixing.update_every` steps, and `make_update` turns them into a new mixing state. A strategy may
also move its state after every train step from that step's own metrics (`after_train_step`,
jitted into the train step). The loop only calls these methods: it never looks at a strategy's
name. Strategies register themselves by name with `@register`; `make_strategy` finds every module
of this package, so adding a strategy is one new file here (see the README's recipe).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

# Every signal the reward step can compute. N datasets, D hidden; per-example signals are per
# packed example (segment): [N, b * L] for b rows of L tokens per dataset, with a valid mask that
# marks the slots holding an example with trained tokens (steps.reward.segments_per_dataset).
SIGNALS = {
    'embeddings': 'pooled last hidden state of each train reward batch, theta [N, D]',
    'nll': 'per-example mean token NLL on the train reward batches, theta [N, b * L] (+ valid)',
    'nll0': 'the same under theta_0 (cached or from an on-device copy) [N, b * L]',
    'ref_excess': 'per-token clipped excess loss max(l_theta - l_ref, 0) over the trained tokens '
                  'of each train reward batch, token-weighted, l_ref from the reference run\'s '
                  'model (Strategy.reference_run) [N] (+ ref_tokens [N])',
    'dev_entropy': 'predictive token entropy over the trained tokens of a dev batch of each '
                   'dataset, token-weighted (sum / tokens) [N] (+ dev_tokens [N])',
    'dev_nll': 'token NLL over the same tokens, token-weighted [N] (+ dev_tokens [N])',
    'grad_cos': 'mean over dev sets j of cos(grad of dataset i train reward batch, grad of dev '
                'batch j) [N]',
}
# Which reward batches each signal reads.
TRAIN_BATCH_SIGNALS = frozenset({'embeddings', 'nll', 'nll0', 'ref_excess', 'grad_cos'})
DEV_BATCH_SIGNALS = frozenset({'dev_entropy', 'dev_nll', 'grad_cos'})

_REGISTRY: dict[str, Callable] = {}


def register(*names: str):
  """Class decorator: `from_config(mixing_config, names, prior, train_steps)` builds the strategy
  `name` (prior: q_tau over the datasets; train_steps: this run's train.steps, or None where it is
  not known, e.g. in tests of the update rule alone)."""
  def wrap(cls):
    for name in names:
      if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f'mixing strategy {name!r} is registered twice.')
      _REGISTRY[name] = cls
    return cls
  return wrap


def registry() -> dict[str, Callable]:
  return dict(_REGISTRY)


def no_target(mixing_config, name: str) -> None:
  """mixing.target belongs to mospec; any other strategy refuses it rather than ignore it."""
  if mixing_config.target:
    raise ValueError(f'mixing.target={mixing_config.target!r} is only used by '
                     f'mixing.strategy=mospec, but the strategy is {name!r}.')


@dataclasses.dataclass(frozen=True)
class Strategy:
  """Base class. Frozen and hashable, so a jit can close over it; its state is a pytree that
  lives in `TrainState.mixing` (checkpointed with the model, so a resumed run continues it)."""
  name: str  # the mixing.strategy value
  names: tuple[str, ...]  # dataset names, in config order
  prior: tuple[float, ...]  # q_tau of mixing.prior_temperature: the starting mixture

  @property
  def signals(self) -> frozenset[str]:
    """Signals of the periodic reward step; empty = no reward step."""
    return frozenset()

  @property
  def updates_scorer(self) -> bool:
    """True when the loop runs the reward step and `make_update` every mixing.update_every steps."""
    return bool(self.signals)

  @property
  def per_step(self) -> bool:
    """True when `after_train_step` moves the mixture (the loader then re-reads it every step)."""
    return False

  def moves_after(self, step: int) -> bool:
    """True when the mixture may change after train step `step` (1-based) through
    `after_train_step`: the loader then re-reads p before the next draw (and prefetching waits
    for it). Reward-step updates are the loop's own business (mixing.update_every)."""
    del step
    return self.per_step

  @property
  def needs_embeddings(self) -> bool:
    return 'embeddings' in self.signals

  @property
  def needs_reference(self) -> bool:
    """theta_0's per-example NLLs (cached or from an on-device copy)."""
    return 'nll0' in self.signals

  @property
  def reference_run(self) -> str:
    """A finished run folder whose final model the reward step compares against ('' = none): its
    parameters are restored beside theta and passed to the reward step as the reference."""
    return ''

  def init_state(self, mixing_config, sizes, key: jax.Array) -> Any:
    raise NotImplementedError

  def probs(self, state) -> jax.Array:
    """Sampling probabilities [N] handed to the loader. Pure, jittable."""
    raise NotImplementedError

  def make_update(self, mixing_config) -> Callable:
    """Pure `(state, signals) -> (state, info)`; info has `reward`, `raw_reward` [N] (logged as
    reward/<name>, reward_raw/<name>) and `probs` [N]. Called after the reward step."""
    raise NotImplementedError(f'strategy {self.name!r} has no reward step.')

  def after_train_step(self, state, metrics: dict) -> Any:
    """Pure: the state after a train step with `metrics` (steps.sft.train_step's). Default: as is."""
    del metrics
    return state

  def step_rewards(self, state) -> jax.Array | None:
    """Per-step strategies: the current reward estimate [N] logged with each metrics line."""
    del state
    return None


def masked_mean(x: jax.Array, valid: jax.Array, default: float = 0.0) -> jax.Array:
  """Mean over the last axis of `x` [N, B] where `valid`; `default` for a row with none -> [N]."""
  valid = valid.astype(jnp.float32)
  x = jnp.where(valid > 0, x.astype(jnp.float32), 0.0)  # padding rows may hold inf/NaN
  count = jnp.sum(valid, axis=-1)
  return jnp.where(count > 0, jnp.sum(x * valid, axis=-1) / jnp.maximum(count, 1.0), default)
