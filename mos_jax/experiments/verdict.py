"""The verdict of a comparison: paired t-intervals against the best static strategy, Holm-Bonferroni
corrected over the learned strategies.

The best static and the best learned strategy are picked on mean dev loss; each learned
strategy's per-seed mean test loss minus the best static's on the same seed gives a paired
t-interval; `beats` or `loses to` only when that corrected interval excludes 0, and nothing below
MIN_SEEDS paired seeds.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import stats

ALPHA = 0.05  # Family-wise error rate of the verdict: its intervals are 95% ones.


MIN_SEEDS = 3  # Fewer paired seeds than this: no verdict ("too few seeds to tell").


def mean_se(values) -> tuple[float, float]:
  """Mean and standard error of the mean (0 for one value: nothing to estimate it from)."""
  values = np.asarray(values, np.float64)
  if not len(values):
    return float('nan'), float('nan')
  se = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0
  return float(values.mean()), se


@dataclasses.dataclass(frozen=True)
class Paired:
  """Per-seed differences of one learned strategy against the best static, tested against `null`
  (0 for a loss difference, 1 for a speed-up) in Holm's step-down family."""
  n: int  # paired seeds
  mean: float
  se: float
  p: float  # two-sided t-test p-value, uncorrected (1 below MIN_SEEDS)
  p_holm: float  # Holm-adjusted p-value
  confidence: float  # level of this strategy's own interval (0.95 / (m - step) under Holm)
  lo: float  # the Holm-corrected interval: together the intervals hold with 95% confidence
  hi: float
  significant: bool  # the corrected interval excludes the null (Holm rejects)


def paired_tests(diffs: dict[str, list[float]], null: float = 0.0,
                 alpha: float = ALPHA) -> dict[str, Paired]:
  """Paired t-tests of every strategy's differences, Holm-Bonferroni corrected over all of them.

  Holm sorts the p-values and tests the k-th smallest (k = 0, 1, ...) at alpha / (m - k), stopping
  at the first it cannot reject; strategy k's interval is the t-interval at 1 - alpha / (m - j)
  with j = min(k, stop), so an interval excludes the null exactly when Holm rejects it.
  """
  raw = {}
  for name, values in diffs.items():
    values = np.asarray(values, np.float64)
    n = len(values)
    mean, se = mean_se(values)
    if n < MIN_SEEDS:
      p = 1.0
    elif se == 0.0:  # Every seed gave the same difference.
      p = 1.0 if mean == null else 0.0
    else:
      p = float(2 * stats.t.sf(abs(mean - null) / se, n - 1))
    raw[name] = (n, mean, se, p)
  m = len(raw)
  order = sorted(raw, key=lambda k: raw[k][3])
  stop = next((k for k, name in enumerate(order) if not raw[name][3] < alpha / (m - k)), m)
  out, running = {}, 0.0
  for k, name in enumerate(order):
    n, mean, se, p = raw[name]
    running = max(running, min(1.0, (m - k) * p))
    level = alpha / (m - min(k, stop))
    half = float(stats.t.ppf(1 - level / 2, n - 1)) * se if n >= 2 else float('inf')
    lo, hi = (mean - half, mean + half) if n >= MIN_SEEDS else (float('nan'), float('nan'))
    out[name] = Paired(n, mean, se, p, running, 1 - level, lo, hi, n >= MIN_SEEDS and k < stop)
  return {name: out[name] for name in diffs}


def _word(test: Paired) -> str:
  if test.n < MIN_SEEDS:
    return f'too few seeds to tell (n={test.n})'
  if not test.significant:
    return 'ties'
  return 'beats' if test.mean < 0 else 'loses to'


def verdict(dev_mean: dict[str, float], per_seed_test: dict[str, dict[int, float]], statics,
            learned) -> tuple[str, list[str], dict[str, Paired]]:
  """The verdict line, one line per learned strategy, and their paired tests.

  dev_mean: strategy -> mean dev loss over seeds (picks the best static and the best learned);
  per_seed_test: strategy -> {seed: mean test loss over datasets}.
  """
  statics = [s for s in statics if s in dev_mean]
  learned = [s for s in learned if s in dev_mean]
  if not learned or not statics:
    return ('verdict: need at least one finished static and one finished learned strategy.', [],
            {})
  static = min(statics, key=lambda n: dev_mean[n])
  best = min(learned, key=lambda n: dev_mean[n])
  base = per_seed_test[static]
  diffs = {n: [per_seed_test[n][s] - base[s] for s in sorted(per_seed_test[n]) if s in base]
           for n in learned}
  tests = paired_tests(diffs)
  lines = [_line(n, static, tests[n], len(learned)) for n in learned]
  t = tests[best]
  head = f'verdict: best learned {best} vs best static {static} (both picked on dev)'
  if t.n < MIN_SEEDS:
    line = (f'{head}: too few seeds to tell (n={t.n}); mean test loss difference '
            f'{t.mean:+.4f}; run --seeds {MIN_SEEDS} or more')
  else:
    line = (f'verdict: best learned {best} {_word(t)} best static {static} (both picked on dev) '
            f'on mean test loss: difference {t.mean:+.4f}, 95% CI [{t.lo:+.4f}, {t.hi:+.4f}] '
            f'(paired t over n={t.n} seeds, Holm-corrected over {len(learned)} learned '
            f'strategies: {100 * t.confidence:.1f}% for this one alone, p={t.p_holm:.3g}; lower '
            f'is better)')
  return line, lines, tests


def _line(name: str, static: str, t: Paired, m: int) -> str:
  if t.n < MIN_SEEDS:
    return (f'{name}: too few seeds to tell (n={t.n}) against {static}; mean test loss '
            f'difference {t.mean:+.4f}')
  return (f'{name} {_word(t)} {static}: mean test loss difference {t.mean:+.4f} ± {t.se:.4f} '
          f'(SE), 95% CI [{t.lo:+.4f}, {t.hi:+.4f}] (Holm over {m}: '
          f'{100 * t.confidence:.1f}% alone), p={t.p:.3g}, Holm p={t.p_holm:.3g}, n={t.n}')
