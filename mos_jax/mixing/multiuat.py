"""MultiUAT (Wu et al. 2021), as the paper's Table 2 runs it: on the MoS scorer and update.

reward(i) = the model's uncertainty on a dev batch of dataset i: the mean over its examples of the
mean predictive token entropy over response tokens (mixing.uncertainty='entropy', default), or of
the mean token NLL ('nll'). Datasets the model is unsure about are drawn more. (The Monte-Carlo
dropout variants of the original need dropout, which the backbone does not have.)
"""

from __future__ import annotations

import dataclasses

from mos_jax.mixing import base
from mos_jax.mixing.strategies import ScorerStrategy

MEASURES = ('entropy', 'nll')


@base.register('multiuat')
@dataclasses.dataclass(frozen=True)
class MultiUAT(ScorerStrategy):
  measure: str = 'entropy'  # 'entropy' or 'nll'

  @property
  def signals(self):
    return frozenset({f'dev_{self.measure}'})

  @classmethod
  def from_config(cls, mixing_config, names, prior):
    base.no_target(mixing_config, 'multiuat')
    if mixing_config.uncertainty not in MEASURES:
      raise ValueError(f'mixing.uncertainty={mixing_config.uncertainty!r} is unknown; choose one '
                       f'of {MEASURES}.')
    return cls(name='multiuat', names=names, prior=prior, min_prob=float(mixing_config.min_prob),
               measure=mixing_config.uncertainty)

  def rewards(self, signals):
    return base.masked_mean(signals[f'dev_{self.measure}'], signals['dev_valid'])
