"""The static sampling prior q_tau of Eq. 3: the baselines' mixture and the scorer's start."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def prior_probs(sizes: Sequence[int], temperature: float) -> np.ndarray:
  """q_tau(i) = q(i)^(1/tau) / sum_n q(n)^(1/tau) with q(i) = M_i / sum_n M_n.

  tau = 1 is proportional sampling, tau = 10 the paper's temperature baseline, tau = inf uniform.
  Returns float64 probabilities [N] in the order of `sizes`.
  """
  sizes = list(sizes)
  if not sizes:
    raise ValueError('prior_probs: need at least one dataset size, got none.')
  for i, m in enumerate(sizes):
    if isinstance(m, bool) or not float(m).is_integer() or m <= 0:
      raise ValueError(f'prior_probs: dataset sizes must be positive integers, got {m!r} at index '
                       f'{i} (sizes={sizes}). An empty dataset cannot be mixed.')
  temperature = float(temperature)
  if math.isnan(temperature) or temperature <= 0:
    raise ValueError(f'prior_probs: temperature must be > 0 (1 proportional, 10, inf uniform), '
                     f'got {temperature}.')
  log_q = np.log(np.asarray(sizes, np.float64))
  # Work in log space: q^(1/tau) underflows for large datasets and small tau otherwise.
  scaled = log_q / temperature  # 0 everywhere for tau = inf
  scaled -= scaled.max()
  p = np.exp(scaled)
  return p / p.sum()
