"""compare end to end on the demo, where the verdict could be wrong: a learned strategy stuck at a
deliberately bad prior must not be reported as beating uni; and its refusals of bad input."""

import os
import subprocess
import sys

import pytest

from demo_run import REPO
from mos_jax.experiments import comparison
from mos_jax.experiments import report as report_lib
from mos_jax.infra import cli

_CONFIG = os.path.join(REPO, 'configs', 'demo.py')


def _overrides(data_dir, entries, steps):
  out = [f'--config.data.demo_dir={data_dir}', f'--config.data.tokenizer={data_dir}/tokenizer',
         f'--config.train.steps={steps}', '--config.train.eval_every=0',
         f'--config.train.log_every={steps}', '--config.train.eval_batches=1',
         '--config.train.checkpoint_every=0', '--config.train.async_checkpoints=False']
  return out + [f'--config.data.datasets.{n}.path={e.path}' for n, e in entries.items()]


def test_a_bad_prior_is_not_reported_as_beating_uni(tmp_path, monkeypatch):
  from mos_jax import training
  from mos_jax.data import demo_skills
  data_dir = tmp_path / 'demo_data'
  entries = demo_skills.config_entries(str(data_dir))
  names, steps, seeds = list(entries), 16, [0, 1, 2]
  # Learned in name only: the scorer starts at tau = 0.25 (about 97% nlp, the others starved:
  # the largest dataset weighted ~100x the next) and its learning rate keeps it there.
  monkeypatch.setitem(comparison.STRATEGIES, 'bad_prior', {
      'mixing.strategy': 'mos', 'mixing.reward': 'cossim', 'mixing.ema': False,
      'mixing.prior_temperature': 0.25, 'mixing.scorer_lr': 1e-9, 'mixing.update_every': 1000})
  overrides = _overrides(data_dir, entries, steps)
  workdir = str(tmp_path / 'cmp')
  config = cli.load_config(_CONFIG, overrides)
  logged = []
  assert comparison.check_splits(config, workdir, logged.append) == []  # The demo has test splits.
  assert any('100 test examples' in line for line in logged)
  runs = comparison.plan(_CONFIG, overrides, ['uni', 'bad_prior'], seeds, workdir)
  for spec in runs:  # In this process (compiled once), as `run_all` would in children.
    argv = list(spec.argv)
    run = training.build(cli.load_config(_CONFIG, argv[argv.index('--workdir') + 2:]),
                         spec.workdir)
    training.train(run)
  report = comparison.collect(workdir, ['uni', 'bad_prior'], seeds, names, steps)
  table, verdict = report['table'], report['verdict']
  assert table['bad_prior']['mean'][0] > table['uni']['mean'][0]  # The prior is bad on test.
  assert verdict.startswith('verdict: best learned bad_prior') and 'n=3' in verdict
  assert '95% CI [' in verdict and 'beats' not in verdict
  md = open(os.path.join(workdir, 'results.md')).read()
  assert report_lib.METHOD in md and '- bad_prior ' in md and verdict in md
  # Every seed's table number is the run's own test loss (the final metrics line).
  t = report['tests']['bad_prior']
  assert t.n == 3 and t.mean == pytest.approx(table['bad_prior']['mean'][0]
                                              - table['uni']['mean'][0])

  # A resumed compare on another test split refuses to mix old and new runs.
  config.data.datasets.math.test_examples = 90
  with pytest.raises(ValueError, match="test split of dataset 'math' differs"):
    comparison.check_splits(config, workdir, logged.append)


def test_refusals_before_any_run(tmp_path):
  from mos_jax.data import demo_skills
  data_dir = tmp_path / 'demo_data'
  entries = demo_skills.config_entries(str(data_dir))
  # A workdir with runs from before test splits (no splits.json) is not mixed with new ones.
  old = tmp_path / 'old'
  (old / 'uni' / 'seed0').mkdir(parents=True)
  config = cli.load_config(_CONFIG, _overrides(data_dir, entries, 4))
  with pytest.raises(ValueError, match='from before test splits'):
    comparison.check_splits(config, str(old), lambda _: None)
  # A dataset without a test split gets one as large as its dev split, held out of its file.
  config.data.datasets.facts.test_examples = 0
  logged = []
  extra = comparison.check_splits(config, str(tmp_path / 'new'), logged.append)
  assert extra == ['--config.data.datasets.facts.test_examples=40']
  assert any("'facts' has no test split" in line for line in logged)

  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': REPO}
  base = [sys.executable, '-m', 'mos_jax.compare', '--config', _CONFIG,
          '--workdir', str(tmp_path / 'w'), *_overrides(data_dir, entries, 4)]
  for args, message in ((['--seeds', '0'], '--seeds=0: must be at least 1'),
                        (['--strategies', 'uni,odm,uni'], 'uni given twice')):
    done = subprocess.run(base + args, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0 and message in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / 'w').exists()  # Refused before any run (or split) was made.
