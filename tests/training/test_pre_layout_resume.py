"""A run folder written before the package layout (tests/fixtures/pre_layout_run, made by commit
552a2a4's flat mos_jax with tests/fixtures/make_pre_layout_run.py) resumes with today's code and
ends with the metrics that the old code's uninterrupted run logged."""

import copy
import json
import os
import shutil
import sys

import numpy as np
import pytest

from mos_jax import training
from mos_jax.infra import cli
from mos_jax.infra import errors

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                'fixtures'))
import make_pre_layout_run  # noqa: E402  # pylint: disable=g-import-not-at-top,wrong-import-position

FIXTURE = os.path.join(os.path.dirname(make_pre_layout_run.__file__), 'pre_layout_run')


def _lines(path):
  with open(path) as f:
    return {r['step']: r for r in map(json.loads, f)}


def test_old_layout_checkpoint_resumes_to_the_old_runs_metrics(tmp_path):
  reference = _lines(os.path.join(FIXTURE, 'metrics.jsonl'))
  workdir = tmp_path / 'run'
  shutil.copytree(os.path.join(FIXTURE, 'checkpoints'), workdir / 'checkpoints')
  with open(workdir / 'metrics.jsonl', 'w') as f:  # What the old run had logged by step 2.
    f.writelines(json.dumps(reference[s]) + '\n' for s in sorted(reference) if s <= 2)

  repo = os.path.dirname(os.path.dirname(os.path.dirname(FIXTURE)))
  config = make_pre_layout_run.config(cli.load_config, repo, str(tmp_path / 'demo_data'))
  for entry in config.data.datasets.values():  # It predates test splits: resumes without one.
    entry.test_examples = 0
  # Its probabilities counted packed rows: it resumes as mixing.unit='row' only, and says so.
  with pytest.raises(errors.UserError, match=r'before mixing.unit existed.*mixing.unit=row'):
    training.build(copy.deepcopy(config), str(workdir))
  config.mixing.unit = 'row'
  run = training.build(config, str(workdir))
  assert run.start_step == 2
  training.train(run)

  resumed = _lines(str(workdir / 'metrics.jsonl'))
  for step in (3, 4):
    want, got = reference[step], resumed[step]
    keys = [k for k in want if k.startswith(('train/loss', 'mixture/', 'reward/'))]
    assert 'train/loss' in keys and any(k.startswith('reward/') for k in keys) == (step == 3)
    np.testing.assert_allclose([got[k] for k in keys], [want[k] for k in keys], rtol=1e-5,
                               err_msg=f'step {step}')
