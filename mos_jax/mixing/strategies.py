"""One interface over the mixing strategies, so the training loop never branches on their names.

| strategy | scorer   | reward        | notes                                            |
|----------|----------|---------------|--------------------------------------------------|
| static   | frozen   | none          | q_tau: tau 1 proportional, 10 temperature, inf uniform |
| mos      | updated  | cossim / diff | EMA optional                                     |
| mospec   | updated  | cossim / diff | cossim -> cos(z_i, z_target); diff -> target x factor |
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax

from mos_jax.mixing import rewards as rewards_lib
from mos_jax.mixing.prior import prior_probs

STRATEGIES = ('static', 'mos', 'mospec')
REWARDS = ('cossim', 'diff')


@dataclasses.dataclass(frozen=True)
class Strategy:
  """What a strategy needs from the training loop. Hashable, so it can be closed over in a jit."""
  name: str  # 'static', 'mos' or 'mospec'
  names: tuple[str, ...]  # dataset names, in config order
  prior: tuple[float, ...]  # q_tau: the static mixture, and the scorer's start
  updates_scorer: bool  # False: the mixture stays at the prior and no reward is computed
  reward: str | None  # 'cossim', 'diff' or None (static)
  ema: bool  # smooth rewards with Eq. 11
  target_index: int | None  # mospec's target dataset
  target_factor: float  # mospec + diff: the target's reward multiplier

  @property
  def needs_embeddings(self) -> bool:
    """COSSIM needs the pooled last hidden state of each reward batch."""
    return self.reward == 'cossim'

  @property
  def needs_reference(self) -> bool:
    """DIFF needs theta_0's per-example NLLs (cached or from an on-device copy)."""
    return self.reward == 'diff'


def make_strategy(mixing_config, names: Sequence[str], sizes: Sequence[int]) -> Strategy:
  """Validates `config.mixing` against the datasets and builds the strategy."""
  names = tuple(names)
  if len(names) != len(sizes):
    raise ValueError(f'{len(names)} dataset names but {len(sizes)} sizes: {names}, {list(sizes)}.')
  name = mixing_config.strategy
  if name not in STRATEGIES:
    raise ValueError(f'mixing.strategy={name!r} is unknown; choose one of {STRATEGIES}.')
  prior = tuple(float(p) for p in prior_probs(sizes, mixing_config.prior_temperature))
  target = mixing_config.target
  if name == 'static':
    return Strategy(name=name, names=names, prior=prior, updates_scorer=False, reward=None,
                    ema=False, target_index=None, target_factor=1.0)
  if mixing_config.reward not in REWARDS:
    raise ValueError(f'mixing.reward={mixing_config.reward!r} is unknown; choose one of {REWARDS}.')
  target_index = None
  if name == 'mospec':
    if not target:
      raise ValueError(f'mixing.strategy=mospec needs mixing.target, one of {list(names)}.')
    if target not in names:
      raise ValueError(f'mixing.target={target!r} is not a dataset; the datasets are {list(names)}.')
    target_index = names.index(target)
  elif target:
    raise ValueError(f'mixing.target={target!r} is only used by mixing.strategy=mospec, '
                     f'but the strategy is {name!r}.')
  return Strategy(name=name, names=names, prior=prior, updates_scorer=True,
                  reward=mixing_config.reward, ema=bool(mixing_config.ema),
                  target_index=target_index, target_factor=float(mixing_config.target_factor))


def compute_rewards(strategy: Strategy, embeddings: jax.Array | None = None,
                    nll: jax.Array | None = None, nll0: jax.Array | None = None,
                    valid: jax.Array | None = None) -> jax.Array:
  """Raw rewards [N] from the reward step's outputs: embeddings [N, D] (COSSIM) or per-example
  mean NLLs nll, nll0 and valid [N, B] (DIFF). Jittable with `strategy` closed over."""
  if strategy.reward == 'cossim':
    if embeddings is None:
      raise ValueError('the cossim reward needs embeddings [N, D].')
    return rewards_lib.cossim(embeddings, strategy.target_index)
  if strategy.reward == 'diff':
    if nll is None or nll0 is None or valid is None:
      raise ValueError('the diff reward needs nll, nll0 and valid [N, B].')
    return rewards_lib.diff(nll, nll0, valid, strategy.target_index, strategy.target_factor)
  raise ValueError(f'strategy {strategy.name!r} computes no rewards (updates_scorer is False).')
