"""The paper's strategies (static, MoS, MoSpec), the scorer family they share, and `make_strategy`.

| strategy | state                | signals              | update                                  |
|----------|----------------------|----------------------|-----------------------------------------|
| static   | scorer, frozen       | none                 | none: q_tau (tau 1 prop., 10 temp., inf uniform) |
|  from_run| step counter         | none                 | none: another run's final p (replay.py)  |
| replay   | step counter         | none                 | another run's logged p, step by step     |
| mos      | scorer psi + Adam    | embeddings / nll,nll0| cossim / diff reward, EMA, REINFORCE (Eq. 6) |
| mospec   | scorer psi + Adam    | embeddings / nll,nll0| cos(z_i, z_target) / target's diff x factor |
| multidds | scorer psi + Adam    | grad_cos             | see multidds.py (no EMA by default)      |
| multiuat | scorer psi + Adam    | dev_entropy / dev_nll| see multiuat.py (no EMA by default)      |
| odm      | EXP3 rewards         | (train-step metrics) | see odm.py                               |
| doremi   | domain weights       | ref_excess           | see doremi.py (a reference run's model)  |
| excess_theta0 | domain weights  | nll, nll0            | see doremi.py (theta_0 as the reference) |
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil
from typing import Sequence

import jax

from mos_jax.mixing import base
from mos_jax.mixing import rewards as rewards_lib
from mos_jax.mixing import replay
from mos_jax.mixing import scorer
from mos_jax.mixing.base import Strategy
from mos_jax.mixing.prior import prior_probs
from mos_jax.mixing.state import init_mixing_state
from mos_jax.mixing.state import make_update_fn

REWARDS = ('cossim', 'diff')


@dataclasses.dataclass(frozen=True)
class ScorerStrategy(Strategy):
  """Strategies on the scorer psi and its REINFORCE update (state.py): the paper's Table 2 runs
  every dynamic baseline this way. Subclasses say which signals they need and how they become a
  raw reward [N] (`rewards`); the EMA, normalisation and Adam steps are shared."""
  min_prob: float = 0.0  # mixing.min_prob floor of the sampling probabilities
  ema: bool = False  # smooth rewards with Eq. 11 (MoS: mixing.ema; rivals: mixing.rival_ema)

  def init_state(self, mixing_config, sizes, key):
    return init_mixing_state(mixing_config, sizes, key)

  def probs(self, state):
    return scorer.probs(state.params, self.min_prob)

  def rewards(self, signals: dict) -> jax.Array:
    raise ValueError(f'strategy {self.name!r} computes no rewards (updates_scorer is False).')

  def make_update(self, mixing_config):
    update = make_update_fn(mixing_config, ema=self.ema)
    return lambda state, signals: update(state, self.rewards(signals))


@base.register('static')
@dataclasses.dataclass(frozen=True)
class Static(ScorerStrategy):
  """The prior q_tau, never updated (the scorer stays where it starts)."""
  reward: str | None = None
  target_index: int | None = None
  target_factor: float = 1.0

  @classmethod
  def from_config(cls, mixing_config, names, prior, train_steps=None):
    source = replay.source_folder(mixing_config, 'static', 'from_run')
    if source:  # Another run's final p, held fixed.
      return replay.Replay.from_run(mixing_config, names, prior, source, train_steps,
                                    final_only=True)
    return cls(name='static', names=names, prior=prior, min_prob=float(mixing_config.min_prob))


@base.register('mos', 'mospec')
@dataclasses.dataclass(frozen=True)
class MoS(ScorerStrategy):
  """MoS (Sec. 3) and MoSpec (Sec. 5): COSSIM or DIFF rewards on the scorer."""
  reward: str | None = 'diff'  # 'cossim' or 'diff'
  ema: bool = True  # smooth rewards with Eq. 11
  target_index: int | None = None  # mospec's target dataset
  target_factor: float = 2.0  # mospec + diff: the target's reward multiplier

  @property
  def signals(self):
    return frozenset({'embeddings'} if self.reward == 'cossim' else {'nll', 'nll0'})

  @classmethod
  def from_config(cls, mixing_config, names, prior, train_steps=None):
    name, target = mixing_config.strategy, mixing_config.target
    if mixing_config.reward not in REWARDS:
      raise ValueError(f'mixing.reward={mixing_config.reward!r} is unknown; choose one of '
                       f'{REWARDS}.')
    target_index = None
    if name == 'mospec':
      if not target:
        raise ValueError(f'mixing.strategy=mospec needs mixing.target, one of {list(names)}.')
      if target not in names:
        raise ValueError(f'mixing.target={target!r} is not a dataset; the datasets are '
                         f'{list(names)}.')
      target_index = names.index(target)
    else:
      base.no_target(mixing_config, name)
    return cls(name=name, names=names, prior=prior, min_prob=float(mixing_config.min_prob),
               reward=mixing_config.reward, ema=bool(mixing_config.ema),
               target_index=target_index, target_factor=float(mixing_config.target_factor))

  def rewards(self, signals):
    if self.reward == 'cossim':
      if signals.get('embeddings') is None:
        raise ValueError('the cossim reward needs embeddings [N, D].')
      return rewards_lib.cossim(signals['embeddings'], self.target_index)
    if any(signals.get(k) is None for k in ('nll', 'nll0', 'valid')):
      raise ValueError('the diff reward needs nll, nll0 and valid [N, B].')
    return rewards_lib.diff(signals['nll'], signals['nll0'], signals['valid'], self.target_index,
                            self.target_factor)


def _load_all_strategies() -> None:
  """Imports every module of mos_jax.mixing, so each strategy file registers itself."""
  for info in pkgutil.iter_modules([os.path.dirname(__file__)]):
    importlib.import_module(f'{__package__}.{info.name}')


def strategy_names() -> tuple[str, ...]:
  _load_all_strategies()
  return tuple(sorted(base.registry()))


def make_strategy(mixing_config, names: Sequence[str], sizes: Sequence[int],
                  train_steps: int | None = None) -> Strategy:
  """Validates `config.mixing` against the datasets and builds the strategy it names.

  `train_steps`: the run's train.steps (replay rescales another run's mixture to it).
  """
  names = tuple(names)
  if len(names) != len(sizes):
    raise ValueError(f'{len(names)} dataset names but {len(sizes)} sizes: {names}, {list(sizes)}.')
  known = strategy_names()
  name = mixing_config.strategy
  if name not in known:
    raise ValueError(f'mixing.strategy={name!r} is unknown; choose one of {known}.')
  prior = tuple(float(p) for p in prior_probs(sizes, mixing_config.prior_temperature))
  return base.registry()[name].from_config(mixing_config, names, prior, train_steps)


def compute_rewards(strategy: Strategy, embeddings: jax.Array | None = None,
                    nll: jax.Array | None = None, nll0: jax.Array | None = None,
                    valid: jax.Array | None = None) -> jax.Array:
  """Raw rewards [N] of a scorer strategy from embeddings [N, D] (COSSIM) or per-example mean
  NLLs nll, nll0 and valid [N, B] (DIFF). Jittable with `strategy` closed over."""
  if not isinstance(strategy, ScorerStrategy) or not strategy.updates_scorer:
    raise ValueError(f'strategy {strategy.name!r} computes no rewards (updates_scorer is False).')
  return strategy.rewards({'embeddings': embeddings, 'nll': nll, 'nll0': nll0, 'valid': valid})
