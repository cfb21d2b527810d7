"""MultiDDS (Wang et al. 2020, "Balancing Training for Multilingual Neural Machine Translation"),
as the paper's Table 2 runs it: on the MoS scorer and update.

reward(i) = (1/N) sum_j cos(grad_theta L(train batch of i), grad_theta L(dev batch of j)):
datasets whose gradient points where the dev losses fall are drawn more, and every dev set counts
equally, however long its answers (one cosine against the gradient of the summed dev losses would
follow the datasets with the most dev tokens).

Read in the authors' code (github.com/cindyxinyiwang/multiDDS, fairseq/trainer.py,
`update_language_sampler_multilin`, and fairseq/optim/fairseq_optimizer.py, `get_grad_sim`): for
each dev set j its gradient is saved, each train set's gradient is compared with it by cosine
(dot / (|g| |d| + 1e-10)), and with `--utility-type ave` the reward is the mean of those cosines
over j; the rewards go to the data actor's REINFORCE steps as they are, with no moving average
(so here no EMA unless mixing.rival_ema). train.py takes that path under `--data-actor-multilin`,
which the repository's job_scripts/*/multidds_s.sh pass; its job_scripts/*/multidds.sh do not and
run `update_language_sampler` instead, whose cosine is against the dev gradients accumulated over
all dev sets after a small look-ahead step (the sum this file used to compute). Other
differences: their loop draws a fresh train batch of i for every dev set j, we use one per dataset
for all j; the gradients come from the reward step (steps.reward.gradient_cosines: at most two
gradient-sized buffers, optionally over a parameter subset, mixing.grad_params, a regular
expression over names like 'layers/3/mlp/up_proj').
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
  def from_config(cls, mixing_config, names, prior, train_steps=None):
    base.no_target(mixing_config, 'multidds')
    return cls(name='multidds', names=names, prior=prior, min_prob=float(mixing_config.min_prob),
               ema=bool(mixing_config.rival_ema), grad_params=str(mixing_config.grad_params))

  def rewards(self, signals):
    return signals['grad_cos']
