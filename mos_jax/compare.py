"""Run mixing strategies side by side and report (the paper's Table 2, Figures 2-3).

  python -m mos_jax.compare --config configs/demo.py --workdir runs/compare \
      --strategies prop,temp,uni,multidds,multiuat,odm,doremi,mos_cossim,mos_cossim_ema,mos_diff,mos_diff_ema \
      --seeds 3 [--config.KEY=VALUE ...]

One training run per strategy x seed in WORKDIR/<strategy>/seed<k> (finished runs are not
repeated; a crashed one resumes on the next call). --list prints the strategies and their
overrides, --print-commands one `python -m mos_jax.train` line per run (for an array job),
--collect only writes the report from the finished folders: WORKDIR/results.md, results.csv,
mixtures.png, convergence.png, and the verdict printed last.

Strategies are picked on dev loss and judged on a held-out test split (a dataset without one gets
one as large as its dev split, held out of its training file; WORKDIR/splits.json records them):
paired t-intervals over seeds, Holm-corrected over the learned strategies, and no verdict from
fewer than 3 seeds.
"""

import sys

from absl import flags

from mos_jax.infra import cli
from mos_jax.experiments import comparison

_WORKDIR = flags.DEFINE_string('workdir', None, 'Folder of the runs and the report.')
_STRATEGIES = flags.DEFINE_string('strategies', ','.join(comparison.STRATEGIES),
                                  'Comma-separated strategy names (see --list).')
_SEEDS = flags.DEFINE_integer('seeds', comparison.MIN_SEEDS,
                              'Seeds per strategy: config.seed, config.seed + 1, ... (a verdict '
                              f'needs {comparison.MIN_SEEDS} at least).')
_LIST = flags.DEFINE_bool('list', False, 'Print the strategies with their overrides and exit.')
_PRINT = flags.DEFINE_bool('print-commands', False, 'Print one train command per run and exit.')
_COLLECT = flags.DEFINE_bool('collect', False, 'Only build the report from finished folders.')
_TASKS = flags.DEFINE_list('tasks', [], 'mos_jax.evaluate tasks scored on every finished run '
                           '(e.g. skills,paper_mmlu): further columns of the table.')
_LIMIT = flags.DEFINE_integer('limit', 0, 'With --tasks: examples per task (0 = all).')
_FEWSHOT = flags.DEFINE_integer('num_fewshot', None, 'With --tasks: few-shot examples.')
_CONFIG = cli.define_config_flag()


def main(argv):
  del argv
  if _LIST.value:
    print(comparison.describe())
    return
  config = _CONFIG.value
  if not _WORKDIR.value:
    raise ValueError('--workdir is required.')
  if _SEEDS.value < 1:
    raise ValueError(f'--seeds={_SEEDS.value}: must be at least 1 ({comparison.MIN_SEEDS} for a '
                     f'verdict).')
  strategies = comparison.parse_strategies(_STRATEGIES.value)
  seeds = [config.seed + k for k in range(_SEEDS.value)]
  spec, overrides = comparison.split_argv(sys.argv[1:])
  # Before any run: the test split (refused if it overlaps train or dev), the same for all runs.
  log = (lambda m: print(m, file=sys.stderr)) if _PRINT.value else print  # stdout: commands only
  overrides += comparison.check_splits(config, _WORKDIR.value, log)
  runs = comparison.plan(spec, overrides, strategies, seeds, _WORKDIR.value)
  if _PRINT.value:
    print('\n'.join(r.command() for r in runs))
    return
  names = list(config.data.datasets.keys())
  steps = int(config.train.steps)
  if not _COLLECT.value:
    comparison.run_all(runs, steps, names)
    if _TASKS.value:
      extra = [f'--limit={_LIMIT.value}'] + (
          [f'--num_fewshot={_FEWSHOT.value}'] if _FEWSHOT.value is not None else [])
      comparison.evaluate_all(runs, steps, names, _TASKS.value, extra)
  header = f'Config: `{spec} {" ".join(overrides)}`; seeds {seeds}.'
  report = comparison.collect(_WORKDIR.value, strategies, seeds, names, steps, header)
  for name, seed in report['missing']:
    print(f'missing: {name} seed {seed} (unfinished or failed)')
  print(f'wrote {_WORKDIR.value}/results.md, results.csv, mixtures.png, convergence.png')
  print(report['verdict'])


if __name__ == '__main__':
  cli.run(main, 'compare')
