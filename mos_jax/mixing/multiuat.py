"""MultiUAT (Wu et al. 2021, "Uncertainty-Aware Balancing for Multilingual and Multi-Domain
Neural Machine Translation Training"), as the paper's Table 2 runs it: on the MoS scorer and update.

reward(i) = the model's uncertainty on a dev batch of dataset i, token-weighted over the whole
batch: the sum over its trained (response) tokens of the predictive entropy divided by their
number (mixing.uncertainty='entropy', default), or the same of the token NLL ('nll'). A mean of
per-example means would weigh a short answer's tokens more. Datasets the model is unsure about
are drawn more.

Read in the authors' fairseq code (task `multiuat_multilingual_translation`, from a stored copy
whose repository name the search index did not give): `update_sample_probability` takes one dev
sample per dataset; `compute_enttp_monta_carlo` (reward 'enttp') is
sum(entropy * target_mask) / sum(target_mask) over the batch, averaged over K forwards with
dropout on; `compute_xentropy` ('xentropy') is the criterion's loss / ntokens with dropout off;
the rewards go to the data actor's REINFORCE steps as they are, with no moving average (so here
no EMA unless mixing.rival_ema). Differences: no Monte-Carlo passes (K = 1; the backbone has no
dropout), and 'nll' is the plain token NLL where their criterion may add label smoothing.
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
  def from_config(cls, mixing_config, names, prior, train_steps=None):
    base.no_target(mixing_config, 'multiuat')
    if mixing_config.uncertainty not in MEASURES:
      raise ValueError(f'mixing.uncertainty={mixing_config.uncertainty!r} is unknown; choose one '
                       f'of {MEASURES}.')
    return cls(name='multiuat', names=names, prior=prior, min_prob=float(mixing_config.min_prob),
               ema=bool(mixing_config.rival_ema), measure=mixing_config.uncertainty)

  def rewards(self, signals):
    return signals[f'dev_{self.measure}']  # Already token-weighted per dataset [N].
