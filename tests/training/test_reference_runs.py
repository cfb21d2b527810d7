"""Runs that read another run: replay follows a logged mixture (and reproduces its draws step by
step), static.from_run holds its final p, DoReMi compares against a finished uni run's model and
refuses one trained on other data."""

import copy
import os

import jax
import numpy as np
import pytest

from mos_jax import training
from mos_jax.workdir import metrics as metrics_lib
from mos_jax.workdir import restore
from demo_run import demo_config, resume_after_crash, set_mixing

KEYS = ('mixture/', 'mixture_rows/', 'data/examples/')


@pytest.fixture(scope='module')
def root(tmp_path_factory):
  return tmp_path_factory.mktemp('reference_runs')


def _config(root, strategy, steps, **mixing):
  config = demo_config(root, train__steps=steps, train__log_every=1, train__eval_every=0,
                       train__eval_batches=1, train__checkpoint_every=0)
  config.mixing.strategy = strategy
  config.mixing.update_every = 2
  return set_mixing(config, **mixing)


def _train(config, workdir):
  run = training.build(copy.deepcopy(config), str(workdir))
  training.train(run)
  return run, {r['step']: r for r in metrics_lib.read_metrics(str(workdir))}


@pytest.fixture(scope='module')
def source_run(root):
  """A 6-step MoS run whose scorer moves after every step (the demo's DIFF on device)."""
  workdir = root / 'mos'
  _, lines = _train(_config(root, 'mos', 6, update_every=1), workdir)
  return workdir, lines


def _values(line, prefix):
  return np.array([v for k, v in sorted(line.items()) if k.startswith(prefix)])


def test_replay_reproduces_the_draws_step_by_step(root, source_run):
  source, want = source_run
  run, got = _train(_config(root, 'replay', 6, replay__run=str(source)), root / 'replay')
  assert run.reward_fn is None and not run.strategy.signals  # No reward pass.
  assert sorted(got) == sorted(want) == list(range(7))
  moved = 0
  for step in range(7):
    for prefix in KEYS:
      np.testing.assert_array_equal(_values(got[step], prefix), _values(want[step], prefix),
                                    err_msg=f'{prefix} at step {step}')
    moved += step and not np.array_equal(_values(want[step], 'mixture/'),
                                         _values(want[step - 1], 'mixture/'))
    assert not any(k.startswith('reward/') for k in got[step])
  assert moved >= 4  # The source's mixture changed after most steps (so replay followed it).

  # Its step counter is in the checkpoint: killed after step 4 and resumed from step 3, it still
  # follows the source step by step.
  config = _config(root, 'replay', 6, replay__run=str(source))
  config.train.checkpoint_every = 3
  resume_after_crash(config, str(root / 'replay_resumed'), after_batches=4, start_step=3)
  resumed = {r['step']: r for r in metrics_lib.read_metrics(str(root / 'replay_resumed'))}
  for step in range(7):
    for prefix in KEYS:
      np.testing.assert_array_equal(_values(resumed[step], prefix), _values(want[step], prefix),
                                    err_msg=f'resumed: {prefix} at step {step}')


def test_replay_rescales_and_static_from_run_holds_the_final_p(root, source_run):
  source, want = source_run
  _, half = _train(_config(root, 'replay', 3, replay__run=str(source)), root / 'half')
  for step in range(4):  # Step s of a 3-step run reads the 6-step source at step 2s.
    np.testing.assert_array_equal(_values(half[step], 'mixture/'),
                                  _values(want[2 * step], 'mixture/'), err_msg=f'step {step}')
  _, fixed = _train(_config(root, 'static', 3, static__from_run=str(source)), root / 'fixed')
  for step in range(4):
    np.testing.assert_array_equal(_values(fixed[step], 'mixture/'), _values(want[6], 'mixture/'))


def test_doremi_reads_the_reference_runs_final_model(root):
  uni_run, _ = _train(_config(root, 'static', 4), root / 'uni')
  uni_params = jax.device_get(uni_run.state.params)
  config = _config(root, 'doremi', 4, doremi__reference=str(root / 'uni'), doremi_eta=5.0)
  config.train.checkpoint_every = 2
  run = training.build(copy.deepcopy(config), str(root / 'doremi'))
  assert run.strategy.signals == {'ref_excess'}
  restored = restore.restore_params(str(root / 'uni'), 4, run.state.params,
                                    jax.tree.map(lambda x: x.sharding, run.state.params), run.mesh)
  for a, b in zip(jax.tree.leaves(uni_params), jax.tree.leaves(jax.device_get(restored))):
    np.testing.assert_array_equal(a, b)
  training.train(run)
  lines = {r['step']: r for r in metrics_lib.read_metrics(str(root / 'doremi'))}
  names = run.data.names
  rewards = np.array([[lines[s][f'reward/{n}'] for n in names] for s in (1, 3)])
  assert np.isfinite(rewards).all() and (rewards >= 0).all() and rewards.max() > 0
  start, end = _values(lines[0], 'mixture/'), _values(lines[4], 'mixture/')
  assert np.abs(end - start).max() > 1e-4
  # A crash after step 2: the resumed run restores the reference again and ends where this did.
  final = jax.tree.leaves(jax.device_get(run.state))
  resumed = resume_after_crash(config, str(root / 'doremi_resumed'), after_batches=3,
                               start_step=2)
  for a, b in zip(final, resumed):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # The same names and model but other training examples: refused before anything is written.
  other = copy.deepcopy(config)
  first = names[0]
  other.data.datasets[first].dev_examples += 1  # One training example fewer.
  with pytest.raises(ValueError, match=rf"trained on other data: the training examples of "
                                       rf"\['{first}'\]"):
    training.build(other, str(root / 'doremi_other'))
  assert not os.path.exists(root / 'doremi_other')
