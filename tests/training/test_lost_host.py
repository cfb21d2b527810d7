"""A host lost from a multi-host run (real processes): the others stop with one paragraph and exit
75, a rerun on any host count resumes exactly, a save cut short leaves the previous checkpoint,
and a start-up that a peer never joins ends after the timeout."""

import copy
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from mos_jax import training
from mos_jax.data import build_data
from mos_jax.infra import lost_host
from mos_jax.workdir import checkpoint as checkpoint_lib
from mos_jax.workdir import metrics as metrics_lib
from demo_run import REPO, demo_config
from test_survival import _ENV, _command, _wait_for_step

HEARTBEAT_S = 3
_PARAGRAPH = re.compile(
    r'host 1 of 2 stopped answering \((?:heartbeat timeout after 3 s|no heartbeat for \d+ s, '
    r'and a collective with it failed)\) at step (\d+); the last '
    r'checkpoint is step (\d+) in (\S+)\. Restart the job \(any host count\) to resume\.')


def _port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _host_env(process_id, port, devices=2):
  return {**_ENV, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}',
          'MOS_COORDINATOR_ADDRESS': f'localhost:{port}', 'MOS_NUM_PROCESSES': '2',
          'MOS_PROCESS_ID': str(process_id)}


def _comparable(workdir):
  return [{k: v for k, v in r.items() if not k.startswith('perf/')}
          for r in metrics_lib.read_metrics(str(workdir))]


_OVERRIDES = ('--config.train.steps=60', '--config.train.checkpoint_every=20',
              f'--config.distributed.heartbeat_timeout_s={HEARTBEAT_S}')


@pytest.mark.slow
def test_sigkill_of_one_host_stops_the_other_with_75_and_a_rerun_resumes_exactly(tmp_path):
  config = demo_config(tmp_path, train__steps=60, train__log_every=1, train__eval_every=0,
                       train__checkpoint_every=20, train__eval_batches=1)
  build_data(config)  # The demo files, written once before two processes read them.
  workdir = tmp_path / 'run'
  port = _port()
  hosts = [subprocess.Popen(_command(tmp_path, workdir, *_OVERRIDES), env=_host_env(i, port),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  _wait_for_step(workdir, hosts[0], 22)
  hosts[1].kill()  # SIGKILL: no goodbye, as a lost VM or the OOM killer.
  killed = time.monotonic()
  out, err = hosts[0].communicate(timeout=HEARTBEAT_S + 60)
  took = time.monotonic() - killed
  hosts[1].wait()
  assert hosts[0].returncode == lost_host.EXIT_CODE, err[-3000:]
  assert took < HEARTBEAT_S + 15, took
  found = _PARAGRAPH.search(err)
  assert found, err[-3000:]
  step, saved, folder = int(found[1]), int(found[2]), found[3]
  assert folder == str(workdir / 'checkpoints') and saved == 20 and step > saved
  # One paragraph on the terminal; jax's fatal error and the rest go to train.log.
  assert err.strip().splitlines() == [found[0].join(('error: ', ''))], err[-3000:]
  log = (workdir / 'train.log').read_text()
  assert found[0] in log
  print(f'survivor exited {took:.1f} s after the SIGKILL: {found[0]}')

  # Rerun as one process (one device): resumes from step 20 and ends as an uninterrupted run.
  started = time.monotonic()
  run = training.build(copy.deepcopy(config), str(workdir))
  assert run.start_step == 20
  training.train(run)
  straight = tmp_path / 'straight'
  training.train(training.build(copy.deepcopy(config), str(straight)))
  print(f'resumed and uninterrupted runs: {time.monotonic() - started:.1f} s')
  resumed, reference = _comparable(workdir), _comparable(straight)
  assert [r['step'] for r in resumed] == [r['step'] for r in reference]
  for a, b in zip(reference, resumed):
    assert a.keys() == b.keys()
    for key in a:
      if a['step'] == 0 and key.startswith('eval/'):
        continue  # Step 0's dev loss came from 2 hosts, whose dev rows differ (not this issue).
      np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-7, err_msg=f'{a["step"]} {key}')


# Runs the train command, killing the process (SIGKILL) when Orbax has written every file of the
# step-20 checkpoint into its temporary folder but not yet renamed it: a death in mid-save.
_KILLED_IN_SAVE = '''
import os, runpy, signal, sys
from orbax.checkpoint._src.path import atomicity
finalize = atomicity.AtomicRenameTemporaryPath.finalize
async def dying_finalize(self, *args, **kwargs):
  if self._final_path.name == '20':
    os.kill(os.getpid(), signal.SIGKILL)
  return await finalize(self, *args, **kwargs)
atomicity.AtomicRenameTemporaryPath.finalize = dying_finalize
sys.argv[0] = 'mos_jax.train'
runpy.run_module('mos_jax.train', run_name='__main__')
'''


@pytest.mark.slow
def test_a_host_killed_during_an_async_save_leaves_the_previous_checkpoint(tmp_path):
  workdir = tmp_path / 'run'
  argv = _command(tmp_path, workdir, '--config.train.steps=30', '--config.train.checkpoint_every=10',
                  '--config.train.async_checkpoints=True', '--config.train.log_every=10')
  done = subprocess.run([sys.executable, '-c', _KILLED_IN_SAVE, *argv[3:]], env=_ENV,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
  left = sorted(os.listdir(workdir / 'checkpoints'))
  assert left[0] == '10' and len(left) == 2 and left[1].startswith('20.'), left  # 20: unfinished.
  checkpointer = checkpoint_lib.Checkpointer(str(workdir / 'checkpoints'))
  assert checkpointer.latest_step() == 10
  assert checkpointer.describe_latest() == f'the last checkpoint is step 10 in {workdir}/checkpoints'
  checkpointer.close()
  config = demo_config(tmp_path, train__steps=30, train__checkpoint_every=10)
  run = training.build(config, str(workdir))  # Restores step 10: every file of it reads back.
  assert run.start_step == 10
  run.checkpointer.close()
  run.close()


@pytest.mark.slow
def test_a_peer_that_never_joins_fails_after_the_timeout_with_a_paragraph(tmp_path):
  port, unused = _port(), _port()
  timeout = ['--config.distributed.initialization_timeout_s=2']
  alone = subprocess.Popen(_command(tmp_path, tmp_path / 'alone', *timeout),
                           env=_host_env(0, port), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
  lost = subprocess.Popen(_command(tmp_path, tmp_path / 'lost', *timeout),
                          env=_host_env(1, unused), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  for proc, expected in (
      (alone, f'process 0 of 2 could not join the coordinator at localhost:{port} within 2 s '
              f'(distributed.initialization_timeout_s): process ids [1] did not start.'),
      (lost, f'process 1 of 2 could not join the coordinator at localhost:{unused} within 2 s '
             f'(distributed.initialization_timeout_s): nothing answers there, so process 0 did '
             f'not start or the address is wrong.')):
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == lost_host.EXIT_CODE, err[-3000:]
    assert expected in err, err[-3000:]
    # One paragraph on the terminal: jax's fatal error and stack trace went to the log file.
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f'error: {expected}'), err[-3000:]
