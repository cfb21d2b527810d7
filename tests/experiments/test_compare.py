"""python -m mos_jax.compare: the plan, the end-to-end report against the run folders, --collect."""

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from mos_jax.experiments import comparison
from mos_jax.experiments import report
from mos_jax.workdir import metrics as metrics_lib
from demo_run import REPO


def test_split_argv_and_plan():
  spec, overrides = comparison.split_argv(
      ['--config', 'configs/demo.py', '--workdir', 'w', '--config.train.steps=4',
       '--config.train.lr', '0.1', '--noconfig.mixing.ema', '--seeds=2'])
  assert spec == 'configs/demo.py'
  assert overrides == ['--config.train.steps=4', '--config.train.lr=0.1', '--noconfig.mixing.ema']
  runs = comparison.plan(spec, overrides, ['uni', 'mos_diff'], [0, 1], 'w')
  assert [(r.strategy, r.seed) for r in runs] == [('uni', 0), ('mos_diff', 0), ('uni', 1),
                                                  ('mos_diff', 1)]
  cmd = runs[1].command()
  assert cmd.startswith('python -m mos_jax.train --config configs/demo.py --workdir w/mos_diff/seed0')
  # The strategy's own overrides and the seed come after the user's, so they win.
  assert cmd.index('--config.train.lr=0.1') < cmd.index('--config.mixing.reward=diff')
  assert '--config.seed=0' in cmd
  assert '--config.mixing.prior_temperature=inf' in runs[0].command()
  with pytest.raises(ValueError, match='unknown'):
    comparison.parse_strategies('uni,dds')
  listing = comparison.describe()
  assert all(name in listing for name in comparison.STRATEGIES)


def test_doremi_is_pointed_at_the_uni_run_of_its_seed_trained_before_it():
  runs = comparison.plan('configs/demo.py', [], ['mos_diff', 'doremi'], [0, 1], 'w')
  # uni is not asked for: it is still trained first in each seed (as doremi's reference).
  assert [(r.strategy, r.seed) for r in runs] == [
      ('mos_diff', 0), ('uni', 0), ('doremi', 0), ('mos_diff', 1), ('uni', 1), ('doremi', 1)]
  for seed in (0, 1):
    doremi = next(r for r in runs if r.strategy == 'doremi' and r.seed == seed)
    assert f'--config.mixing.doremi.reference=w/uni/seed{seed}' in doremi.argv
    assert '--config.mixing.strategy=doremi' in doremi.argv
  # Asked for after doremi, uni still runs once per seed, before it.
  runs = comparison.plan('configs/demo.py', [], ['doremi', 'uni'], [3], 'w')
  assert [r.strategy for r in runs] == ['uni', 'doremi']
  assert not any('doremi.reference' in a for a in runs[0].argv)
  assert 'doremi reads --config.mixing.doremi.reference' in comparison.describe()


def test_ranks_and_steps_to_target():
  assert report.rank_order({'a': 2.0, 'b': 1.0, 'c': 3.0, 'd': 1.0}) == {
      'a': 2, 'b': 1, 'c': 0, 'd': 1}
  assert comparison.steps_to({0: 5.0, 2: 4.0, 4: 3.0}, 4.0) == 2
  assert comparison.steps_to({0: 5.0, 2: 4.5}, 4.0) is None


def _final_losses(folder, names, steps):
  rows = metrics_lib.read_metrics(os.path.join(folder, 'metrics.jsonl'))
  last = [r for r in rows if r['step'] == steps and f'eval/{names[0]}/loss' in r][-1]
  return [last[f'eval/{n}/loss'] for n in names]


def test_compare_end_to_end_and_collect(tmp_path):
  from mos_jax.data import demo_skills
  data_dir = tmp_path / 'demo_data'
  entries = demo_skills.config_entries(str(data_dir))
  names = list(entries)
  workdir = tmp_path / 'cmp'
  base = [sys.executable, '-m', 'mos_jax.compare', '--config', f'{REPO}/configs/demo.py',
          '--workdir', str(workdir), '--strategies', 'odm,uni',  # learned first
          f'--config.data.demo_dir={data_dir}', f'--config.data.tokenizer={data_dir}/tokenizer',
          '--config.train.steps=4', '--config.train.eval_every=2', '--config.train.log_every=2',
          '--config.train.eval_batches=1', '--config.train.checkpoint_every=0',
          '--config.train.async_checkpoints=False']
  base += [f'--config.data.datasets.{n}.path={e.path}' for n, e in entries.items()]
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': REPO}
  done = subprocess.run(base + ['--seeds', '1'], cwd=tmp_path, env=env, capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
  assert done.stdout.strip().splitlines()[-1].startswith('verdict: best learned odm')
  for name in ('results.md', 'results.csv', 'mixtures.png', 'convergence.png'):
    assert (workdir / name).stat().st_size > 0, name

  # The table holds the run folders' numbers.
  with open(workdir / 'results.csv') as f:
    rows = {r['strategy']: r for r in csv.DictReader(f)}
  assert set(rows) == {'uni', 'odm'}
  for strategy in ('uni', 'odm'):
    final = _final_losses(workdir / strategy / 'seed0', names, 4)
    table = [float(rows[strategy][f'{n}_dev_loss']) for n in names]
    np.testing.assert_allclose(table, final, rtol=1e-12)
    np.testing.assert_allclose(float(rows[strategy]['mean_dev_loss']), np.mean(final),
                               rtol=1e-12)
  md = (workdir / 'results.md').read_text()
  assert '| uni | 1 |' in md and '| odm | 1 |' in md and '**' in md

  # Finished runs are not repeated; --tasks scores them and adds the scores as columns.
  again = subprocess.run(base + ['--seeds', '1', '--tasks', 'skills', '--limit', '8'],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
  assert again.stdout.count('finished before, skipped') == 2
  assert again.stdout.count('evaluated skills') == 2
  with open(workdir / 'results.csv') as f:
    rows = {r['strategy']: r for r in csv.DictReader(f)}
  for strategy in ('uni', 'odm'):
    with open(workdir / strategy / 'seed0' / 'eval' / '4.json') as f:
      summary = json.load(f)['summary']
    skills = {k: v for k, v in summary.items() if k.startswith('skills/')}
    assert skills
    for key, value in skills.items():
      assert float(rows[strategy][key]) == pytest.approx(value, rel=1e-12), key
  assert 'skills/' in (workdir / 'results.md').read_text()

  # --collect with seed 1: uni's run finished, odm's stopped half way: reported as missing.
  shutil.copytree(workdir / 'uni' / 'seed0', workdir / 'uni' / 'seed1')
  partial = workdir / 'odm' / 'seed1'
  partial.mkdir(parents=True)
  lines = (workdir / 'odm' / 'seed0' / 'metrics.jsonl').read_text().splitlines()
  (partial / 'metrics.jsonl').write_text('\n'.join(lines[:-1]) + '\n')
  collected = subprocess.run(base + ['--seeds', '2', '--collect'], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)
  assert collected.returncode == 0, collected.stderr[-3000:]
  assert 'missing: odm seed 1' in collected.stdout
  assert 'missing: uni' not in collected.stdout
  assert 'Missing (unfinished or failed): odm seed 1' in (workdir / 'results.md').read_text()
  assert not os.path.exists(partial / 'checkpoints')  # --collect trained nothing
  assert '| uni | 2 |' in (workdir / 'results.md').read_text()
