"""Mixing strategies side by side (the paper's Table 2 and Figures 2-3) on one model and data.

`plan` lays out one ordinary training run per strategy x seed under DIR/<strategy>/seed<k>;
`run_all` trains the unfinished ones, each in its own process (a crash loses only that run, and a
rerun resumes it); `evaluate_all` scores finished runs on `mos_jax.evaluate` tasks (their
DIR/<strategy>/seed<k>/eval/<step>.json); `collect` reads the finished run folders and writes
DIR/results.md, DIR/results.csv, DIR/mixtures.png and DIR/convergence.png and returns the
one-line verdict.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import shlex
import subprocess
import sys
import time

import numpy as np

from mos_jax.workdir import metrics as metrics_lib

# name -> config overrides: every setting that tells a strategy's rows apart, so `--list` and the
# run commands name it. Dynamic strategies keep the recipe's other mixing settings (prior,
# update_every, scorer lr, inner steps): the paper's Table 2 runs them on the same scorer. The
# rivals run without MoS's EMA, as their authors' code does (these rows override a recipe's
# mixing.rival_ema=True: smoothed rivals would be a row of their own).
STRATEGIES: dict[str, dict[str, object]] = {
    'prop': {'mixing.strategy': 'static', 'mixing.prior_temperature': 1.0},
    'temp': {'mixing.strategy': 'static', 'mixing.prior_temperature': 10.0},
    'uni': {'mixing.strategy': 'static', 'mixing.prior_temperature': float('inf')},
    'multidds': {'mixing.strategy': 'multidds', 'mixing.rival_ema': False},
    'multiuat': {'mixing.strategy': 'multiuat', 'mixing.rival_ema': False},
    'odm': {'mixing.strategy': 'odm'},
    'doremi': {'mixing.strategy': 'doremi'},
    'mos_cossim': {'mixing.strategy': 'mos', 'mixing.reward': 'cossim', 'mixing.ema': False},
    'mos_cossim_ema': {'mixing.strategy': 'mos', 'mixing.reward': 'cossim', 'mixing.ema': True},
    'mos_diff': {'mixing.strategy': 'mos', 'mixing.reward': 'diff', 'mixing.ema': False},
    'mos_diff_ema': {'mixing.strategy': 'mos', 'mixing.reward': 'diff', 'mixing.ema': True},
}


def is_static(name: str) -> bool:
  return STRATEGIES[name]['mixing.strategy'] == 'static'


def _value(v) -> str:
  if isinstance(v, float) and math.isinf(v):
    return 'inf'
  return str(v)


def describe() -> str:
  """`--list`: every strategy name with the settings it runs with (its config overrides; the
  rest of mixing.* comes from the recipe)."""
  width = max(len(n) for n in STRATEGIES)
  lines = [f'{n:<{width}}  ' + ' '.join(f'--config.{k}={_value(v)}' for k, v in o.items())
           for n, o in STRATEGIES.items()]
  return '\n'.join(lines + ['(other mixing.* settings: the recipe\'s, the same for every row)'])


def parse_strategies(text: str) -> list[str]:
  names = [s.strip() for s in text.split(',') if s.strip()]
  unknown = [s for s in names if s not in STRATEGIES]
  if unknown or not names:
    raise ValueError(f'--strategies: unknown {unknown or "(none given)"}; choose from '
                     f'{",".join(STRATEGIES)} (see --list).')
  return names


@dataclasses.dataclass(frozen=True)
class RunSpec:
  strategy: str
  seed: int
  workdir: str
  argv: tuple[str, ...]  # the `python -m mos_jax.train ...` command

  def command(self) -> str:
    return ' '.join(shlex.quote(a) for a in self.argv)


def run_dir(workdir: str, strategy: str, seed: int) -> str:
  return os.path.join(workdir, strategy, f'seed{seed}')


def split_argv(argv) -> tuple[str, list[str]]:
  """The `--config` recipe spec and the `--config.KEY=VALUE` overrides of a command line, to pass
  on to every training run (`--config.KEY VALUE` is joined into one argument)."""
  spec, overrides, i = None, [], 0
  while i < len(argv):
    arg = argv[i]
    bare = arg.lstrip('-')
    if bare == 'config' and i + 1 < len(argv):
      spec, i = argv[i + 1], i + 2
      continue
    if bare.startswith('config='):
      spec = bare.split('=', 1)[1]
    elif bare.startswith('noconfig.') or (bare.startswith('config.') and '=' in bare):
      overrides.append('--' + bare)
    elif bare.startswith('config.') and i + 1 < len(argv) and not argv[i + 1].startswith('-'):
      overrides.append(f'--{bare}={argv[i + 1]}')
      i += 1
    elif bare.startswith('config.'):
      overrides.append('--' + bare)
    i += 1
  if spec is None:
    raise ValueError('--config is required (a recipe such as configs/demo.py).')
  return spec, overrides


def plan(config_spec: str, overrides, strategies, seeds, workdir: str) -> list[RunSpec]:
  """One run per seed x strategy (seed-major, so a partial sweep covers every strategy once).

  `overrides` are the user's `--config.KEY=VALUE` arguments; the strategy's own overrides and
  the seed come after them and win.
  """
  runs = []
  for seed in seeds:
    for name in strategies:
      folder = run_dir(workdir, name, seed)
      argv = ['python', '-m', 'mos_jax.train', '--config', config_spec, '--workdir', folder,
              *overrides, *(f'--config.{k}={_value(v)}' for k, v in STRATEGIES[name].items()),
              f'--config.seed={seed}', '--config.train.progress_bar=False']
      runs.append(RunSpec(name, seed, folder, tuple(argv)))
  return runs


def read_run(folder: str) -> list[dict]:
  path = os.path.join(folder, 'metrics.jsonl')
  return metrics_lib.read_metrics(path) if os.path.exists(path) else []


def is_finished(folder: str, steps: int, names) -> bool:
  """The run logged its final dev evaluation (step == train.steps)."""
  rows = [r for r in read_run(folder) if r['step'] == steps]
  return any(all(f'eval/{n}/loss' in r for n in names) for r in rows)


def run_all(runs: list[RunSpec], steps: int, names, log=print) -> list[RunSpec]:
  """Trains every unfinished run in its own process; returns the runs that failed."""
  failed = []
  for i, spec in enumerate(runs):
    if is_finished(spec.workdir, steps, names):
      log(f'[{i + 1}/{len(runs)}] {spec.strategy} seed {spec.seed}: finished before, skipped')
      continue
    os.makedirs(spec.workdir, exist_ok=True)
    start = time.perf_counter()
    with open(os.path.join(spec.workdir, 'console.log'), 'a') as out:
      done = subprocess.run((sys.executable,) + spec.argv[1:], stdout=out, stderr=subprocess.STDOUT, check=False)
    took = time.perf_counter() - start
    if done.returncode != 0 or not is_finished(spec.workdir, steps, names):
      failed.append(spec)
      log(f'[{i + 1}/{len(runs)}] {spec.strategy} seed {spec.seed}: FAILED (exit '
          f'{done.returncode}, see {spec.workdir}/console.log and train.log)')
    else:
      log(f'[{i + 1}/{len(runs)}] {spec.strategy} seed {spec.seed}: done in {took:.0f} s')
  return failed


def eval_path(folder: str, steps: int) -> str:
  return os.path.join(folder, 'eval', f'{steps}.json')


def task_scores(folder: str, steps: int) -> dict[str, float]:
  """The final checkpoint's `mos_jax.evaluate` numbers: lm-eval metrics as '<task>/<metric>'
  (standard errors left out) and our summary keys (mu_MU, skills/..., mu_BOTH, ...)."""
  path = eval_path(folder, steps)
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    record = json.load(f)
  out = {}
  for task, metrics in record.get('lm_eval', {}).get('results', {}).items():
    for key, value in metrics.items():
      if isinstance(value, (int, float)) and not isinstance(value, bool) and '_stderr' not in key:
        out[f'{task}/{key.replace(",none", "")}'] = float(value)
  out.update({k: float(v) for k, v in record.get('summary', {}).items()
              if isinstance(v, (int, float))})
  return out


def evaluate_all(runs: list[RunSpec], steps: int, names, tasks, extra=(), log=print):
  """Runs `python -m mos_jax.evaluate --tasks ...` on every finished run whose eval file lacks a
  task's scores (each in its own process; a failure is reported and skipped)."""
  for i, spec in enumerate(runs):
    if not is_finished(spec.workdir, steps, names):
      continue
    record = {}
    if os.path.isfile(eval_path(spec.workdir, steps)):
      with open(eval_path(spec.workdir, steps)) as f:
        record = json.load(f)
    done_tasks = set(record.get('tasks', []))
    if set(tasks) <= done_tasks:
      continue
    train = spec.argv[spec.argv.index('--config'):]  # --config C --workdir W and the overrides.
    argv = [sys.executable, '-m', 'mos_jax.evaluate', *train, '--tasks', ','.join(tasks),
            *extra]
    with open(os.path.join(spec.workdir, 'console.log'), 'a') as out:
      done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
      log(f'[{i + 1}/{len(runs)}] {spec.strategy} seed {spec.seed}: evaluation FAILED (exit '
          f'{done.returncode}, see {spec.workdir}/console.log)')
      continue
    with open(eval_path(spec.workdir, steps)) as f:
      record = json.load(f)
    record['tasks'] = sorted(done_tasks | set(tasks))
    with open(eval_path(spec.workdir, steps), 'w') as f:
      json.dump(record, f, indent=2, default=str)
    log(f'[{i + 1}/{len(runs)}] {spec.strategy} seed {spec.seed}: evaluated {",".join(tasks)}')


@dataclasses.dataclass
class RunResult:
  final: dict[str, float]  # dataset -> final dev loss
  curve: dict[int, float]  # eval step -> mean dev loss over datasets
  mixture: dict[str, tuple[list[int], list[float]]]  # dataset -> (steps, p)
  train_s: float  # seconds spent in training steps (evaluation and checkpoints left out)
  tasks: dict[str, float] = dataclasses.field(default_factory=dict)  # task_scores of the run


def summarize_run(rows: list[dict], names, steps: int) -> RunResult:
  curve, final = {}, {}
  for r in rows:
    if all(f'eval/{n}/loss' in r for n in names):
      curve[r['step']] = float(np.mean([r[f'eval/{n}/loss'] for n in names]))
      if r['step'] == steps:
        final = {n: float(r[f'eval/{n}/loss']) for n in names}
  mixture = {n: ([r['step'] for r in rows if f'mixture/{n}' in r],
                 [r[f'mixture/{n}'] for r in rows if f'mixture/{n}' in r]) for n in names}
  train_s, previous = 0.0, 0
  for r in rows:  # perf/step_s is the mean over the steps since the previous metrics line.
    if 'perf/step_s' in r:
      train_s += r['perf/step_s'] * (r['step'] - previous)
      previous = r['step']
  return RunResult(final, curve, mixture, train_s)


def _steps_to(curve: dict[int, float], target: float) -> int | None:
  for step in sorted(curve):
    if curve[step] <= target + 1e-12:
      return step
  return None


def _mean_std(values) -> tuple[float, float]:
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def _ranks(values: dict[str, float]) -> dict[str, int]:
  """1 for the lowest value, 2 for the second lowest (ties share), others 0."""
  order = sorted(set(values.values()))
  return {k: (order.index(v) + 1 if order.index(v) < 2 else 0) for k, v in values.items()}


def _mark(text: str, rank: int) -> str:
  return f'**{text}**' if rank == 1 else f'<u>{text}</u>' if rank == 2 else text


def collect(workdir: str, strategies, seeds, names, steps: int, header: str = '') -> dict:
  """Reads every run folder, writes the report files and returns the numbers and the verdict."""
  results, missing = {}, []
  for name in strategies:
    for seed in seeds:
      folder = run_dir(workdir, name, seed)
      if is_finished(folder, steps, names):
        results[(name, seed)] = summarize_run(read_run(folder), names, steps)
        results[(name, seed)].tasks = task_scores(folder, steps)
      else:
        missing.append((name, seed))
  present = [n for n in strategies if any((n, s) in results for s in seeds)]
  table = {}
  for name in present:
    runs = [results[(name, s)] for s in seeds if (name, s) in results]
    row = {'seeds': len(runs)}
    for n in names:
      row[n] = _mean_std([r.final[n] for r in runs])
    row['mean'] = _mean_std([np.mean([r.final[n] for n in names]) for r in runs])
    common = sorted(set.intersection(*(set(r.curve) for r in runs)))
    row['curve'] = {s: float(np.mean([r.curve[s] for r in runs])) for s in common}
    row['train_s'] = _mean_std([r.train_s for r in runs])
    row['tasks'] = {k: _mean_std([r.tasks[k] for r in runs if k in r.tasks])
                    for k in sorted(set().union(*(r.tasks for r in runs)))}
    row['per_seed_mean'] = {s: float(np.mean([results[(name, s)].final[n] for n in names]))
                            for s in seeds if (name, s) in results}
    table[name] = row

  statics = [n for n in present if is_static(n)]
  learned = [n for n in present if not is_static(n)]
  best_static = min(statics, key=lambda n: table[n]['mean'][0]) if statics else None
  target = table[best_static]['mean'][0] if best_static else None
  static_step_s = (np.mean([table[n]['train_s'][0] for n in statics]) / steps) if statics else None
  for row in table.values():
    row['steps_to_target'] = _steps_to(row['curve'], target) if target is not None else None
  base_steps = table[best_static]['steps_to_target'] if best_static else None
  for row in table.values():
    row['speedup'] = (base_steps / row['steps_to_target']
                      if base_steps and row['steps_to_target'] else None)
    row['overhead'] = (row['train_s'][0] / steps / static_step_s - 1.0) if static_step_s else None

  task_columns = sorted(set().union(*(row['tasks'] for row in table.values())))
  verdict = _verdict(table, learned, best_static, seeds)
  _write_md(os.path.join(workdir, 'results.md'), table, names, missing, best_static, target,
            verdict, header, steps, task_columns)
  _write_csv(os.path.join(workdir, 'results.csv'), table, names, task_columns)
  _plot_mixtures(os.path.join(workdir, 'mixtures.png'), present, results, seeds, names)
  _plot_convergence(os.path.join(workdir, 'convergence.png'), table, target)
  return {'table': table, 'missing': missing, 'best_static': best_static, 'verdict': verdict}


def _verdict(table, learned, best_static, seeds) -> str:
  if not learned or best_static is None:
    return 'verdict: need at least one finished static and one finished learned strategy.'
  best = min(learned, key=lambda n: table[n]['mean'][0])
  paired = [s for s in seeds if s in table[best]['per_seed_mean']
            and s in table[best_static]['per_seed_mean']]
  diffs = [table[best]['per_seed_mean'][s] - table[best_static]['per_seed_mean'][s]
           for s in paired]
  diff, spread = _mean_std(diffs)
  if abs(diff) <= spread:
    word = 'is within the seed spread of'
  else:
    word = 'beats' if diff < 0 else 'loses to'
  return (f'verdict: best learned {best} ({table[best]["mean"][0]:.4f}) {word} best static '
          f'{best_static} ({table[best_static]["mean"][0]:.4f}): mean dev loss difference '
          f'{diff:+.4f} ± {spread:.4f} (std over {len(paired)} paired seeds; lower is better)')


def _fmt(mean_std) -> str:
  return f'{mean_std[0]:.4f} ± {mean_std[1]:.4f}'


def _write_md(path, table, names, missing, best_static, target, verdict, header, steps,
              task_columns=()):
  cols = list(names) + ['mean']
  ranks = {c: _ranks({k: row[c][0] for k, row in table.items()}) for c in cols}
  lines = ['# Mixing strategies compared', '']
  if header:
    lines += [header, '']
  lines += [f'Final dev loss (token-weighted, step {steps}) per dataset and their mean (the '
            f'analogue of the paper\'s mu), mean ± std over seeds; **best**, <u>second best</u>. '
            f'"steps to static" = first evaluation step at which the strategy\'s seed-averaged mean '
            f'dev loss reaches the best static baseline\'s final one '
            f'({best_static}: {target:.4f}); speed-up = that of {best_static} / this one. '
            f'Train s = seconds in training steps per run (evaluation and checkpoints left out); '
            f'overhead = time per step against the static runs\' mean.'
            if best_static else 'No static baseline finished: no steps-to-static column.', '']
  if task_columns:
    lines += ['Task columns: `python -m mos_jax.evaluate` scores of the final checkpoint (lm-eval '
              'metrics as task/metric, our summaries such as mu_MU), mean ± std over seeds.', '']
  head = ['strategy', 'seeds', *names, 'mean', 'steps to static', 'speed-up', 'train s',
          'overhead', *task_columns]
  lines += ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for name, row in table.items():
    cells = [name, str(row['seeds'])]
    cells += [_mark(_fmt(row[c]), ranks[c][name]) for c in cols]
    cells.append(str(row['steps_to_target']) if row['steps_to_target'] else 'not reached')
    cells.append(f'{row["speedup"]:.2f}x' if row['speedup'] else '-')
    cells.append(f'{row["train_s"][0]:.1f}')
    cells.append(f'{100 * row["overhead"]:+.0f}%' if row['overhead'] is not None else '-')
    cells += [_fmt(row['tasks'][c]) if c in row['tasks'] else '-' for c in task_columns]
    lines.append('| ' + ' | '.join(cells) + ' |')
  lines.append('')
  if missing:
    lines += ['Missing (unfinished or failed): ' + ', '.join(f'{n} seed {s}' for n, s in missing),
              '']
  lines += [verdict, '']
  with open(path, 'w') as f:
    f.write('\n'.join(lines))


def _write_csv(path, table, names, task_columns=()):
  head = ['strategy', 'seeds']
  for c in list(names) + ['mean']:
    head += [f'{c}_dev_loss', f'{c}_dev_loss_std']
  head += ['steps_to_static', 'speedup', 'train_s', 'train_s_std', 'overhead']
  for c in task_columns:
    head += [c, f'{c}_std']
  with open(path, 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(head)
    for name, row in table.items():
      cells = [name, row['seeds']]
      for c in list(names) + ['mean']:
        cells += [repr(row[c][0]), repr(row[c][1])]
      cells += [row['steps_to_target'] or '', row['speedup'] or '', repr(row['train_s'][0]),
                repr(row['train_s'][1]), '' if row['overhead'] is None else repr(row['overhead'])]
      for c in task_columns:
        cells += [repr(row['tasks'][c][0]), repr(row['tasks'][c][1])] if c in row['tasks'] else ['', '']
      w.writerow(cells)


def _plot_mixtures(path, present, results, seeds, names):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  if not present:
    return
  cols = min(4, len(present))
  rows = -(-len(present) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False,
                           sharey=True)
  for ax in axes.flat[len(present):]:
    ax.set_visible(False)
  for ax, name in zip(axes.flat, present):
    seed = next(s for s in seeds if (name, s) in results)  # the first finished seed
    for n in names:
      ax.plot(*results[(name, seed)].mixture[n], label=n)
    ax.set_title(f'{name} (seed {seed})', fontsize=9)
    ax.set_ylim(0, 1)
  axes.flat[0].legend(fontsize=7)
  fig.supxlabel('step')
  fig.supylabel('sampling probability')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _plot_convergence(path, table, target):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  if not table:
    return
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  colors = plt.get_cmap('tab20').colors  # 11 strategies: more than the default 10 colors
  for i, (name, row) in enumerate(table.items()):
    steps = sorted(row['curve'])
    ax.plot(steps, [row['curve'][s] for s in steps], label=name, color=colors[i % len(colors)],
            linestyle='--' if is_static(name) else '-')
  if target is not None:
    ax.axhline(target, color='grey', linewidth=0.8, linestyle=':')
  ax.set_xlabel('step')
  ax.set_ylabel('mean dev loss over datasets')
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
