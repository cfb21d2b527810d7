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
      np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-7, err_msg=f'{a["step"]} {key}')
