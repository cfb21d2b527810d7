"""MultiDDS (Wang et al. 2020), as the paper's Table 2 runs it: on the MoS scorer and update.

reward(i) = cos(grad_theta L(train batch of dataset i), grad_theta L(dev batches of all datasets)):
datasets whose gradient points where the dev loss falls are drawn more. The gradients come from
the reward step (signals.gradient_cosines): at most two gradient-sized buffers, optionally over a
parameter subset (mixing.grad_params, a regular expression over names like 'layers/3/mlp/up_proj').
"""

from __future__ import annotations

import dataclasses

from mos_jax.mixing import base
from mos_jax.mixing.strategies import ScorerStrategy


@base.register('multidds')
@dataclasses.dataclass(frozen=True)
class MultiDDS(ScorerStrategy):
  grad_params: str = ''  # regex of the differentiated parameters ('' = all)

  @property
  def signals(self):
    return frozenset({'grad_cos'})

  @classmethod
  def from_config(cls, mixing_config, names, prior):
    base.no_target(mixing_config, 'multidds')
    return cls(name='multidds', names=names, prior=prior, min_prob=float(mixing_config.min_prob),
               grad_params=str(mixing_config.grad_params))

  def rewards(self, signals):
    return signals['grad_cos']
