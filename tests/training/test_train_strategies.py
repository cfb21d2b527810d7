"""MultiDDS, MultiUAT, ODM and DoReMi train through the same loop, log their mixture and rewards,
and resume exactly after a crash (their state is in the checkpoint)."""

import os

import jax
import numpy as np
import pytest

from mos_jax.workdir import metrics as metrics_lib
from mos_jax import training
from demo_run import demo_config, resume_after_crash


def _lines(workdir):
  rows = metrics_lib.read_metrics(os.path.join(workdir, 'metrics.jsonl'))
  return [{k: v for k, v in r.items() if not k.startswith('perf/')} for r in rows]


@pytest.mark.parametrize('strategy', ['multidds', 'multiuat', 'odm', 'excess_theta0'])
def test_strategy_trains_and_resumes_exactly(tmp_path, strategy):
  config = demo_config(tmp_path, train__steps=6, train__checkpoint_every=3, train__log_every=1,
                       train__eval_every=0, train__eval_batches=1)
  config.mixing.strategy = strategy
  config.mixing.update_every = 2
  if strategy == 'excess_theta0':
    config.mixing.diff_reference = 'cache'  # The theta_0 NLL cache that MoS's DIFF uses.
    config.mixing.prior_temperature = 1.0  # Starts proportional: the smoothing towards uniform
    config.mixing.doremi_smoothing = 0.5  # moves it visibly even when the excess loss is 0.
  straight = str(tmp_path / 'straight')
  run = training.build(config, straight)
  training.train(run)
  final = jax.tree.leaves(jax.device_get(run.state))
  names = run.data.names

  resumed = str(tmp_path / 'resumed')
  final_resumed = resume_after_crash(config, resumed, after_batches=4, start_step=3)
  assert _lines(straight) == _lines(resumed)
  for a, b in zip(final, final_resumed):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  lines = _lines(straight)
  assert all(f'mixture/{n}' in line for line in lines for n in names)
  rewarded = [line for line in lines if f'reward/{names[0]}' in line]
  # Reward steps after steps 1, 3, 5; ODM logs its reward on every line.
  assert [line['step'] for line in rewarded] == ([1, 2, 3, 4, 5, 6] if strategy == 'odm'
                                                 else [1, 3, 5])
  mixture = np.array([lines[-1][f'mixture/{n}'] for n in names])
  np.testing.assert_allclose(mixture.sum(), 1.0, rtol=1e-5)
  start = np.array([lines[0][f'mixture/{n}'] for n in names])
  assert np.abs(mixture - start).max() > 1e-6, (start, mixture)  # The mixture moved.
