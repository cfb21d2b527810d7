"""compare's verdict on hand-made numbers: paired t-intervals, Holm-Bonferroni, too few seeds."""

import math

import numpy as np
import pytest
from scipy import stats

from mos_jax.experiments import comparison
from mos_jax.experiments import verdict as verdict_lib


def _verdict(per_seed, dev=None):
  """per_seed: strategy -> per-seed mean test loss; dev: strategy -> mean dev loss (default:
  the mean test loss, so the best on dev is the best on test)."""
  dev = dev or {n: float(np.mean(v)) for n, v in per_seed.items()}
  statics = [n for n in per_seed if comparison.is_static(n)]
  learned = [n for n in per_seed if not comparison.is_static(n)]
  return verdict_lib.verdict(dev, {n: dict(enumerate(v)) for n, v in per_seed.items()}, statics,
                            learned)


def _interval(line):
  lo, hi = line.split('95% CI [')[1].split(']')[0].split(', ')
  return float(lo), float(hi)


def test_one_seed_is_too_few_never_beats():
  line, lines, tests = _verdict({'uni': [2.0], 'mos_diff': [1.0]})
  assert line.startswith('verdict:') and 'too few seeds to tell (n=1)' in line
  assert 'beats' not in line and 'loses' not in line
  assert 'too few seeds to tell (n=1)' in lines[0] and not tests['mos_diff'].significant
  # Two seeds, however far apart, are still too few.
  line, _, _ = _verdict({'uni': [2.0, 2.1], 'mos_diff': [1.0, 1.1]})
  assert 'too few seeds to tell (n=2)' in line and 'beats' not in line


def test_three_seeds_clearly_better_beats_with_the_t_interval():
  diffs = np.array([-0.05, -0.045, -0.055])  # -0.05 ± 0.005 (std)
  base = np.array([2.0, 2.2, 1.9])
  line, _, tests = _verdict({'uni': list(base), 'mos_diff': list(base + diffs)})
  assert line.startswith('verdict: best learned mos_diff beats best static uni')
  assert 'n=3' in line
  se = 0.005 / math.sqrt(3)
  half = stats.t.ppf(0.975, 2) * se  # One learned strategy: no correction.
  lo, hi = _interval(line)
  assert lo == pytest.approx(-0.05 - half, abs=1e-4) and hi == pytest.approx(-0.05 + half, abs=1e-4)
  t = tests['mos_diff']
  assert t.se == pytest.approx(se) and t.p == pytest.approx(2 * stats.t.sf(0.05 / se, 2))


def test_mixed_signs_tie_and_worse_loses():
  base = [2.0, 2.0, 2.0]
  line, _, tests = _verdict({'uni': base, 'mos_diff': [1.9, 2.1, 1.95]})
  assert 'mos_diff ties best static uni' in line
  lo, hi = _interval(line)
  assert lo < 0 < hi and not tests['mos_diff'].significant
  line, _, _ = _verdict({'uni': base, 'mos_diff': [2.1, 2.12, 2.08]})
  assert 'mos_diff loses to best static uni' in line
  assert _interval(line)[0] > 0


def test_borderline_win_flips_to_a_tie_under_holm():
  base = np.array([2.0, 2.0, 2.0])
  border = list(base + [-0.0655, -0.05, -0.0345])  # p between 0.025 and 0.05
  p = stats.ttest_1samp(np.array(border) - base, 0).pvalue
  assert 0.025 < p < 0.05
  alone, _, _ = _verdict({'uni': list(base), 'mos_diff': border})
  assert 'mos_diff beats best static uni' in alone
  # A second learned strategy that goes nowhere: Holm tests the borderline one at 0.025.
  line, lines, tests = _verdict({'uni': list(base), 'mos_diff': border,
                                 'odm': list(base + [0.1, -0.1, 0.02])})
  assert 'mos_diff ties best static uni' in line
  assert tests['mos_diff'].p == pytest.approx(p) and tests['mos_diff'].p_holm == pytest.approx(2 * p)
  assert tests['mos_diff'].confidence == pytest.approx(0.975)
  lo, hi = _interval(line)
  assert lo < 0 < hi  # The corrected interval is the wider 97.5% one and holds 0.
  assert len(lines) == 2 and any(s.startswith('odm ties uni') for s in lines)


def test_best_is_picked_on_dev_and_the_best_static_is_the_baseline():
  # prop is best on dev (the baseline); mos_cossim is best learned on dev though worse on test.
  per_seed = {'prop': [2.0, 2.1, 2.05], 'uni': [1.5, 1.6, 1.55],
              'mos_cossim': [2.2, 2.31, 2.24], 'mos_diff': [1.0, 1.1, 1.05]}
  dev = {'prop': 1.0, 'uni': 3.0, 'mos_cossim': 0.5, 'mos_diff': 4.0}
  line, _, tests = _verdict(per_seed, dev)
  assert 'best learned mos_cossim loses to best static prop' in line
  assert tests['mos_diff'].mean == pytest.approx(-1.0)  # Against prop, not uni.


def test_holm_intervals_agree_with_holm_rejections():
  rng = np.random.default_rng(0)
  for _ in range(200):
    m = int(rng.integers(1, 6))
    diffs = {f's{k}': list(rng.normal(rng.normal(0, 0.05), 0.03, size=int(rng.integers(3, 6))))
             for k in range(m)}
    tests = verdict_lib.paired_tests(diffs)
    for t in tests.values():
      assert t.significant == (t.p_holm < verdict_lib.ALPHA) == (not t.lo <= 0 <= t.hi)


def test_duplicate_strategy_is_refused():
  with pytest.raises(ValueError, match='uni given twice'):
    comparison.parse_strategies('uni,mos_diff,uni')
