"""Mixing strategies side by side (the paper's Table 2 and Figures 2-3) on one model and data.

`plan` lays out one ordinary training run per strategy x seed under DIR/<strategy>/seed<k>;
`run_all` trains the unfinished ones, each in its own process (a crash loses only that run, and a
rerun resumes it); `evaluate_all` scores finished runs on `mos_jax.evaluate` tasks (their
DIR/<strategy>/seed<k>/eval/<step>.json); `collect` reads the finished run folders and writes
DIR/results.md, DIR/results.csv, DIR/mixtures.png and DIR/convergence.png and returns the
one-line verdict.

The verdict (experiments/verdict.py): paired t-intervals of per-seed test loss against the best
static strategy, Holm-Bonferroni corrected; the files it writes: experiments/report.py.
`check_splits` builds the data once before any run: the test split every run is scored on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import subprocess
import sys
import time

import numpy as np

from mos_jax.experiments import reference_runs
from mos_jax.experiments import report
from mos_jax.experiments.verdict import MIN_SEEDS, mean_se, paired_tests, verdict
from mos_jax.workdir import metrics as metrics_lib

SPLITS_FILE = 'splits.json'  # DIR/splits.json: the splits every run of DIR was scored on.

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
  return '\n'.join(lines + reference_runs.describe()
                   + ['(other mixing.* settings: the recipe\'s, the same for every row)'])


def parse_strategies(text: str) -> list[str]:
  names = [s.strip() for s in text.split(',') if s.strip()]
  unknown = [s for s in names if s not in STRATEGIES]
  if unknown or not names:
    raise ValueError(f'--strategies: unknown {unknown or "(none given)"}; choose from '
                     f'{",".join(STRATEGIES)} (see --list).')
  twice = sorted({s for s in names if names.count(s) > 1})
  if twice:
    raise ValueError(f'--strategies: {",".join(twice)} given twice; name each strategy once.')
  return names


def check_splits(config, workdir: str, log=print) -> list[str]:
  """Before any run: builds the data once (a test split that shares an example with train or dev
  is refused there), holds a test split as large as the dev split out of the training file of
  every dataset that has none (returned: the overrides every run gets), and writes
  DIR/splits.json, or refuses when DIR's runs were scored on other splits."""
  import copy  # pylint: disable=g-import-not-at-top
  from mos_jax.data import bundle as bundle_lib  # pylint: disable=g-import-not-at-top
  config = copy.deepcopy(config)
  config.data.num_workers = 0  # Nothing is iterated: no worker processes.
  data = bundle_lib.build_data(config)
  data.close()
  extra = []
  for name in data.names:
    if data.stats[name]['test_examples'] == 0:
      count = data.stats[name]['dev_examples']
      extra.append(f'--config.data.datasets.{name}.test_examples={count}')
      config.data.datasets[name].test_examples = count
      log(f'dataset {name!r} has no test split: {count} examples (as many as its dev split) are '
          f'held out of its training file for it, in every run ({extra[-1]})')
  if extra:
    data = bundle_lib.build_data(config)
    data.close()
  splits = {n: {'train_examples': data.stats[n]['train_examples'],
                'dev_examples': data.stats[n]['dev_examples'],
                'test_examples': data.stats[n]['test_examples'],
                'test_from': config.data.datasets[n].get('test_path', '') or 'training file',
                'train_fingerprint': data.fingerprint(n),
                'test_fingerprint': data.test_fingerprint(n)} for n in data.names}
  path = os.path.join(workdir, SPLITS_FILE)
  if os.path.isfile(path):
    with open(path) as f:
      saved = json.load(f)
    for name in sorted(set(saved) | set(splits)):
      old, new = saved.get(name, {}), splits.get(name, {})
      for key in ('test_fingerprint', 'train_fingerprint'):
        if old.get(key) != new.get(key):
          raise ValueError(f'{path}: the {key.split("_")[0]} split of dataset {name!r} differs '
                           f'from the one the runs in {workdir} were scored on; old and new runs '
                           f'do not mix: restore the data settings or use a new --workdir.')
  else:
    started = [d for d in (os.listdir(workdir) if os.path.isdir(workdir) else [])
               if d in STRATEGIES and os.path.isdir(os.path.join(workdir, d))]
    if started:
      raise ValueError(f'{workdir}: holds runs ({", ".join(sorted(started))}) from before test '
                       f'splits (no {SPLITS_FILE}); old and new runs do not mix: use a new '
                       f'--workdir.')
    os.makedirs(workdir, exist_ok=True)
    with open(path, 'w') as f:
      json.dump(splits, f, indent=2)
  for name, m in splits.items():
    log(f'{name}: {m["train_examples"]} train, {m["dev_examples"]} dev, {m["test_examples"]} '
        f'test examples (test from {m["test_from"]})')
  return extra


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

  `overrides` are the user's `--config.KEY=VALUE` arguments; the strategy's own overrides, its
  reference run's folder (doremi: the uni run of the seed, planned before it) and the seed come
  after them and win.
  """
  runs = []
  for seed in seeds:
    for name in reference_runs.run_order(strategies):
      folder = run_dir(workdir, name, seed)
      argv = ['python', '-m', 'mos_jax.train', '--config', config_spec, '--workdir', folder,
              *overrides, *(f'--config.{k}={_value(v)}' for k, v in STRATEGIES[name].items()),
              *reference_runs.overrides(name, lambda ref, s=seed: run_dir(workdir, ref, s)),
              f'--config.seed={seed}', '--config.train.progress_bar=False']
      runs.append(RunSpec(name, seed, folder, tuple(argv)))
  return runs


def read_run(folder: str) -> list[dict]:
  path = os.path.join(folder, 'metrics.jsonl')
  return metrics_lib.read_metrics(path) if os.path.exists(path) else []


def is_finished(folder: str, steps: int, names) -> bool:
  """The run logged its final dev and test evaluation (step == train.steps)."""
  rows = [r for r in read_run(folder) if r['step'] == steps]
  return any(all(f'eval/{n}/loss' in r and f'test/{n}/loss' in r for n in names) for r in rows)


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
  test: dict[str, float] = dataclasses.field(default_factory=dict)  # dataset -> final test loss


def summarize_run(rows: list[dict], names, steps: int) -> RunResult:
  curve, final, test = {}, {}, {}
  for r in rows:
    if all(f'eval/{n}/loss' in r for n in names):
      curve[r['step']] = float(np.mean([r[f'eval/{n}/loss'] for n in names]))
      if r['step'] == steps:
        final = {n: float(r[f'eval/{n}/loss']) for n in names}
    if r['step'] == steps and all(f'test/{n}/loss' in r for n in names):
      test = {n: float(r[f'test/{n}/loss']) for n in names}
  mixture = {n: ([r['step'] for r in rows if f'mixture/{n}' in r],
                 [r[f'mixture/{n}'] for r in rows if f'mixture/{n}' in r]) for n in names}
  train_s, previous = 0.0, 0
  for r in rows:  # perf/step_s is the mean over the steps since the previous metrics line.
    if 'perf/step_s' in r:
      train_s += r['perf/step_s'] * (r['step'] - previous)
      previous = r['step']
  return RunResult(final, curve, mixture, train_s, test=test)


def steps_to(curve: dict[int, float], target: float) -> int | None:
  for step in sorted(curve):
    if curve[step] <= target + 1e-12:
      return step
  return None


def _speedups(results, name: str, static: str, seeds, steps: int) -> list[float]:
  """Per paired seed: steps the best static needs to reach its own final mean dev loss over the
  steps `name` needs to reach it (seeds where `name` never reaches it are left out)."""
  out = []
  for s in seeds:
    if (name, s) not in results or (static, s) not in results:
      continue
    base = results[(static, s)]
    target = float(np.mean(list(base.final.values())))
    mine, theirs = steps_to(results[(name, s)].curve, target), steps_to(base.curve, target)
    if mine and theirs:
      out.append(theirs / mine)
  return out


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
      row[n] = mean_se([r.test[n] for r in runs])
      row[f'dev/{n}'] = mean_se([r.final[n] for r in runs])
    row['mean'] = mean_se([np.mean([r.test[n] for n in names]) for r in runs])
    row['dev'] = mean_se([np.mean([r.final[n] for n in names]) for r in runs])
    common = sorted(set.intersection(*(set(r.curve) for r in runs)))
    row['curve'] = {s: float(np.mean([r.curve[s] for r in runs])) for s in common}
    row['train_s'] = mean_se([r.train_s for r in runs])
    row['tasks'] = {k: mean_se([r.tasks[k] for r in runs if k in r.tasks])
                    for k in sorted(set().union(*(r.tasks for r in runs)))}
    row['per_seed_test'] = {s: float(np.mean([results[(name, s)].test[n] for n in names]))
                            for s in seeds if (name, s) in results}
    table[name] = row

  statics = [n for n in present if is_static(n)]
  learned = [n for n in present if not is_static(n)]
  line, lines, tests = verdict({n: table[n]['dev'][0] for n in present},
                               {n: table[n]['per_seed_test'] for n in present}, statics, learned)
  best_static = min(statics, key=lambda n: table[n]['dev'][0]) if statics else None
  target = table[best_static]['dev'][0] if best_static else None
  static_step_s = (np.mean([table[n]['train_s'][0] for n in statics]) / steps) if statics else None
  for row in table.values():
    row['steps_to_target'] = steps_to(row['curve'], target) if target is not None else None
  base_steps = table[best_static]['steps_to_target'] if best_static else None
  for row in table.values():
    row['speedup'] = (base_steps / row['steps_to_target']
                      if base_steps and row['steps_to_target'] else None)
    row['overhead'] = (row['train_s'][0] / steps / static_step_s - 1.0) if static_step_s else None
  speed_tests = {}
  if best_static:
    speed_tests = paired_tests({n: _speedups(results, n, best_static, seeds, steps)
                                for n in learned}, null=1.0)
    for n, t in speed_tests.items():
      reached = len(_speedups(results, n, best_static, seeds, steps))
      paired = sum((n, s) in results and (best_static, s) in results for s in seeds)
      if t.n < MIN_SEEDS:
        lines.append(f'{n} speed-up to {best_static}\'s final dev loss: too few seeds to tell '
                     f'(n={t.n}; reached in {reached} of {paired} paired seeds)')
      else:
        word = ('faster than' if t.mean > 1 else 'slower than') if t.significant else 'ties'
        lines.append(f'{n} speed-up to {best_static}\'s final dev loss: {t.mean:.2f}x, 95% CI '
                     f'[{t.lo:.2f}x, {t.hi:.2f}x] (Holm over {len(learned)}), {word} '
                     f'{best_static}, n={t.n} (reached in {reached} of {paired} paired seeds)')

  task_columns = sorted(set().union(*(row['tasks'] for row in table.values())))
  report.write_md(os.path.join(workdir, 'results.md'), table, names, missing, best_static,
                  target, line, header, steps, task_columns, lines)
  report.write_csv(os.path.join(workdir, 'results.csv'), table, names, task_columns, tests,
                   speed_tests)
  report.plot_mixtures(os.path.join(workdir, 'mixtures.png'), present, results, seeds, names)
  report.plot_convergence(os.path.join(workdir, 'convergence.png'), table, target,
                          [n for n in table if is_static(n)])
  return {'table': table, 'missing': missing, 'best_static': best_static, 'verdict': line,
          'lines': lines, 'tests': tests, 'speedups': speed_tests}
