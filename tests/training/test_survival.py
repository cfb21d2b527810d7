"""What a run survives: signals, a second launcher, NaN streaks, unreadable checkpoints, bad input."""

import copy
import glob
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mos_jax.workdir import checkpoint as checkpoint_lib
from mos_jax.config import check as config_check
from mos_jax.workdir import metrics as metrics_lib
from mos_jax import training
from mos_jax.workdir import lock as lock_lib
from demo_run import REPO, demo_config


def _lines(workdir):
  return [{k: v for k, v in r.items() if not k.startswith('perf/')}
          for r in metrics_lib.read_metrics(workdir)]


def _signal_in_step(run, step, signals):
  """Sends `signals` to this process while the loop runs training step `step`."""
  train_fn, calls = run.train_fn, {'n': run.start_step}

  def train_with_signal(state, batch):
    calls['n'] += 1
    if calls['n'] == step:
      for sig in signals:
        os.kill(os.getpid(), sig)
    return train_fn(state, batch)

  run.train_fn = train_with_signal


def test_ctrl_c_saves_the_step_and_the_resumed_run_equals_an_uninterrupted_one(tmp_path):
  config = demo_config(tmp_path, train__steps=8, train__log_every=4, train__eval_every=4,
                       train__checkpoint_every=0, train__eval_batches=1)
  config.mixing.update_every = 2
  straight = str(tmp_path / 'straight')
  run = training.build(copy.deepcopy(config), straight)
  training.train(run)
  params_straight = jax.tree.leaves(jax.device_get(run.state.params))

  workdir = str(tmp_path / 'stopped')
  run = training.build(copy.deepcopy(config), workdir)
  _signal_in_step(run, 6, [signal.SIGINT])  # Mid-window: steps 5 and 6 are unlogged.
  assert training.train(run) == {}
  assert run.stopped_by == 'Ctrl-C (SIGINT)' and run.exit_code == 130
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['6']
  assert not os.path.exists(os.path.join(workdir, lock_lib.LOCK_FILE))  # Released.

  run = training.build(copy.deepcopy(config), workdir)
  assert run.start_step == 6
  training.train(run)
  assert _lines(workdir) == _lines(straight)
  for a, b in zip(params_straight, jax.tree.leaves(jax.device_get(run.state.params))):
    np.testing.assert_array_equal(a, b)

  # A second Ctrl-C aborts at once, without saving.
  again = str(tmp_path / 'aborted')
  run = training.build(copy.deepcopy(config), again)
  _signal_in_step(run, 3, [signal.SIGINT, signal.SIGINT])
  before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs as a background job.
  with pytest.raises(KeyboardInterrupt):
    training.train(run)
  assert not os.listdir(os.path.join(again, 'checkpoints'))
  assert signal.getsignal(signal.SIGINT) is before  # Handlers put back.


def _command(tmp_path, workdir, *overrides):
  data_dir = tmp_path / 'demo_data'
  from mos_jax.data import demo_skills
  paths = [f'--config.data.datasets.{n}.path={e.path}'
           for n, e in demo_skills.config_entries(str(data_dir)).items()]
  return [sys.executable, '-m', 'mos_jax.train', '--config', f'{REPO}/configs/demo.py',
          '--workdir', str(workdir), f'--config.data.demo_dir={data_dir}',
          f'--config.data.tokenizer={data_dir}/tokenizer', '--config.train.eval_every=0',
          '--config.train.eval_batches=1', '--config.train.log_every=1',
          '--config.train.checkpoint_every=0', '--config.train.progress_bar=False',
          *paths, *overrides]


_ENV = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': REPO}


def _wait_for_step(workdir, proc, step, timeout=240):
  """Blocks until metrics.jsonl has a line at `step` or later (the run is training)."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    rows = metrics_lib.read_metrics(str(workdir))
    if rows and rows[-1]['step'] >= step:
      return rows[-1]['step']
    assert proc.poll() is None, proc.communicate()
    time.sleep(0.2)
  raise TimeoutError(f'{workdir} did not reach step {step}')


def _stopped_step(stdout, name):
  line = [l for l in stdout.splitlines() if l.startswith(f'Stopped by {name}')]
  assert len(line) == 1, stdout
  step = int(line[0].split('after step ')[1].split(';')[0])
  assert f'saved step {step} in ' in line[0], line
  return step


def test_sigterm_sigint_lock_and_kill_in_real_processes(tmp_path):
  workdir = tmp_path / 'run'
  first = subprocess.Popen(_command(tmp_path, workdir, '--config.train.steps=500'), env=_ENV,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _wait_for_step(workdir, first, 2)

  # A second launcher is refused at once, naming the first; the first trains on unharmed.
  second = subprocess.run(_command(tmp_path, workdir, '--config.train.steps=500'), env=_ENV,
                          capture_output=True, text=True, timeout=120)
  assert second.returncode == 1
  assert 'in use by another run' in second.stderr and f'pid {first.pid}' in second.stderr
  assert 'Traceback' not in second.stderr
  reached = _wait_for_step(workdir, first, _wait_for_step(workdir, first, 2) + 2)

  first.send_signal(signal.SIGTERM)  # Preemption: finish the step, save it, exit 0.
  out, err = first.communicate(timeout=120)
  assert first.returncode == 0, err[-2000:]
  stopped = _stopped_step(out, 'SIGTERM')
  assert stopped >= reached
  assert os.listdir(workdir / 'checkpoints') == [str(stopped)]

  # Resumed, then Ctrl-C: saved again, exit 130, one line saying where.
  resumed = subprocess.Popen(_command(tmp_path, workdir, '--config.train.steps=500'), env=_ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _wait_for_step(workdir, resumed, stopped + 2)
  resumed.send_signal(signal.SIGINT)
  out, err = resumed.communicate(timeout=120)
  assert resumed.returncode == 130, err[-2000:]
  assert f'Resumed from {workdir}/checkpoints at step {stopped}.' in out
  interrupted = _stopped_step(out, r'Ctrl-C (SIGINT)')
  assert interrupted > stopped and 'Traceback' not in err

  # A killed run leaves its lock file behind, but not the lock: the next run starts.
  killed = subprocess.Popen(_command(tmp_path, workdir, '--config.train.steps=500'), env=_ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  _wait_for_step(workdir, killed, interrupted + 1)
  killed.kill()
  killed.wait()
  assert (workdir / lock_lib.LOCK_FILE).exists()
  last = subprocess.run(_command(tmp_path, workdir, f'--config.train.steps={interrupted + 2}'),
                        env=_ENV, capture_output=True, text=True, timeout=240)
  assert last.returncode == 0, last.stderr[-2000:]
  assert 'Finished' in last.stdout
  # The console carried only the program's own lines; the libraries' went to train.log.
  for text in (last.stdout, last.stderr):
    assert not [l for l in text.splitlines() if l[:1] in 'IWE' and l[1:5].isdigit()], text
    assert 'orbax' not in text.lower() and 'absl' not in text
  log_text = (workdir / 'train.log').read_text()
  assert 'checkpoint_manager' in log_text or 'orbax' in log_text.lower()


def test_nan_streak_writes_no_checkpoint_and_lower_lr_resumes(tmp_path):
  config = demo_config(tmp_path, train__steps=12, train__max_bad_steps=3,
                       train__checkpoint_every=2, train__log_every=1, train__eval_every=0,
                       train__eval_batches=1)
  config.mixing.strategy = 'static'
  workdir = str(tmp_path / 'nan')
  run = training.build(copy.deepcopy(config), workdir)
  # From step 3 on, a NaN weight makes every loss non-finite: a streak that skips every update.
  train_fn = run.train_fn

  def poisoned_from_step_3(state, batch):
    if int(state.step) == 2:
      first = jax.tree_util.tree_leaves_with_path(state.params)[0][0]
      state = state.replace(params=jax.tree_util.tree_map_with_path(
          lambda p, x: x * np.nan if p == first else x, state.params))
    return train_fn(state, batch)

  run.train_fn = poisoned_from_step_3
  with pytest.raises(training.TrainingError, match=r'last good checkpoint is step 2\b'):
    training.train(run)
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['2']  # None during the streak.

  config.train.lr, config.train.steps = 1e-4, 6
  run = training.build(config, workdir)
  assert run.start_step == 2
  training.train(run)
  lines = [r for r in _lines(workdir) if 'train/loss' in r]
  assert [r['step'] for r in lines] == [1, 2, 3, 4, 5, 6]
  assert all(np.isfinite(r['train/loss']) for r in lines)
  assert lines[-1]['train/skipped_steps'] == 0


def test_unreadable_checkpoint_is_named_and_fallback_resumes_from_older(tmp_path):
  config = demo_config(tmp_path, train__steps=4, train__log_every=1, train__eval_every=0,
                       train__checkpoint_every=2, train__eval_batches=1)
  workdir = tmp_path / 'run'
  training.train(training.build(copy.deepcopy(config), str(workdir)))
  finished = _lines(str(workdir))
  data_file = max(glob.glob(str(workdir / 'checkpoints' / '4' / 'state' / '**' / 'd' / '*'),
                            recursive=True), key=os.path.getsize)
  with open(data_file, 'r+b') as f:
    f.truncate(100)
  before = sorted(os.listdir(workdir))

  with pytest.raises(checkpoint_lib.CheckpointUnreadable) as refused:
    training.build(copy.deepcopy(config), str(workdir))
  message = str(refused.value)
  assert 'checkpoint 4' in message and str(workdir / 'checkpoints') in message
  assert 'restore_fallback=True' in message and '(2)' in message
  assert sorted(os.listdir(workdir)) == before  # Nothing moved, lock released.
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4']

  config.train.restore_fallback = True
  run = training.build(config, str(workdir))
  assert run.start_step == 2
  assert os.listdir(workdir / 'checkpoints.unreadable') == ['4']  # Set aside, not deleted.
  training.train(run)
  assert _lines(str(workdir)) == finished
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4']


def test_bad_config_values_are_all_named_before_anything_is_written(tmp_path):
  config = demo_config(tmp_path)
  config.mixing.update_every = 0
  config.train.lr = -1.0
  config.mixing.min_prob = 0.3
  config.model.dtype = 'float64'
  config.train.warmup_fraction = 1.5
  config.distributed.heartbeat_timeout_s = 0
  workdir = tmp_path / 'never'
  with pytest.raises(ValueError) as bad:
    training.build(config, str(workdir))
  for part in ('mixing.update_every=0 must be >= 1', 'train.lr=-1.0 must be > 0',
               'mixing.min_prob=0.3 must be <= 0.25', "model.dtype='float64'",
               'train.warmup_fraction=1.5 must be < 1',
               'distributed.heartbeat_timeout_s=0 must be >= 1'):
    assert part in str(bad.value), part
  assert not workdir.exists() and not (tmp_path / 'demo_data').exists()
  config_check.validate(demo_config(tmp_path))  # The shipped demo is valid.


def test_invalid_utf8_names_dataset_file_and_line(tmp_path):
  config = demo_config(tmp_path)
  from mos_jax.data import build_data
  build_data(config)  # Writes the demo files.
  path = config.data.datasets.math.path
  with open(path, 'rb') as f:
    lines = f.read().splitlines(keepends=True)
  lines[6] = lines[6].replace(b'"', b'"\xff', 1)
  with open(path, 'wb') as f:
    f.writelines(lines)
  workdir = tmp_path / 'never'
  with pytest.raises(ValueError, match=rf"dataset 'math': {path}:7: not valid UTF-8 \(byte 0xff"):
    training.build(copy.deepcopy(config), str(workdir))
  assert not workdir.exists()
  config.data.on_error = 'skip'
  assert build_data(config).stats['math']['skipped_records'] == 1


def test_commands_print_one_paragraph_for_expected_errors(tmp_path):
  def command(*args):
    return subprocess.run([sys.executable, '-m', *args], capture_output=True, text=True,
                          cwd=tmp_path, env=_ENV, timeout=120)

  missing = command('mos_jax.train', '--workdir', 'run')
  assert missing.returncode == 1 and '--config is required' in missing.stderr
  bad = command('mos_jax.train', '--config', f'{REPO}/configs/demo.py', '--workdir', 'run',
                '--config.mixing.update_every=0')
  assert bad.returncode == 1 and 'mixing.update_every=0 must be >= 1' in bad.stderr
  no_run = command('mos_jax.export', '--config', f'{REPO}/configs/demo.py', '--workdir', 'run',
                   '--out', 'hf')
  assert no_run.returncode == 1 and 'no checkpoints/ folder' in no_run.stderr
  for done in (missing, bad, no_run):
    assert 'Traceback' not in done.stderr and len(done.stderr.strip().splitlines()) <= 2
  assert not (tmp_path / 'run').exists()
  verbose = command('mos_jax.train', '--config', f'{REPO}/configs/demo.py', '--workdir', 'run',
                    '--config.mixing.update_every=0', '--alsologtostderr')
  assert verbose.returncode == 1 and 'Traceback' in verbose.stderr


def test_lock_is_exclusive_and_described(tmp_path):
  workdir = str(tmp_path / 'w')
  with lock_lib.WorkdirLock(workdir):
    info = json.loads(open(os.path.join(workdir, lock_lib.LOCK_FILE)).read())
    assert info['pid'] == os.getpid()
    with pytest.raises(lock_lib.WorkdirInUse, match=f'pid {os.getpid()}'):
      lock_lib.WorkdirLock(workdir).acquire()
  assert not os.path.exists(workdir)  # Created by the lock and left empty: removed again.


_TWO_HOSTS = '''
import json, sys, time
from mos_jax.infra import distributed
from mos_jax.infra import preemption
distributed.initialize()
import jax
stop = preemption.StopSignals().install()
open(sys.argv[1] + str(jax.process_index()), 'w').close()  # Ready.
for step in range(1, 100000):
  time.sleep(0.01)  # A training step.
  if stop.at(step):
    print(json.dumps({'step': step, 'signal': stop.name, 'code': stop.exit_code}), flush=True)
    break
'''


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])
def test_two_hosts_stop_at_the_same_step(tmp_path, sig):
  import socket
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  ready = str(tmp_path / 'ready')
  procs = [subprocess.Popen(
      [sys.executable, '-c', _TWO_HOSTS, ready], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True, env={**_ENV, 'MOS_COORDINATOR_ADDRESS': f'localhost:{port}',
                      'MOS_NUM_PROCESSES': '2', 'MOS_PROCESS_ID': str(i)}) for i in range(2)]
  deadline = time.time() + 120
  while not all(os.path.exists(ready + str(i)) for i in range(2)):
    assert time.time() < deadline and all(p.poll() is None for p in procs)
    time.sleep(0.1)
  time.sleep(0.5)
  procs[1].send_signal(sig)  # One host is told; both must save the same step.
  results = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
  assert results[0]['step'] == results[1]['step']
  assert results[1]['code'] == (130 if sig == signal.SIGINT else 0)
  assert results[0]['code'] == 0
