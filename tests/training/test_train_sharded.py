"""Sharded training on 8 simulated CPU devices gives the single-device numbers, and a checkpoint
written under one mesh resumes under another."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mos_jax.workdir import metrics as metrics_lib
from mos_jax import training
from demo_run import REPO, demo_config

MESHES = [(1, 8, 1), (2, 2, 2), (1, 4, 2)]  # FSDP only; data x fsdp x tensor; fsdp x tensor.

# Runs inside a subprocess with 8 devices: one short run per mesh, then a resume on another mesh
# from the (2, 2, 2) run's step-2 checkpoint.
SCRIPT = textwrap.dedent('''
    import json, os, shutil, sys
    import jax
    from mos_jax import training
    from ml_collections import config_dict
    assert jax.device_count() == 8, jax.devices()
    config = config_dict.ConfigDict(json.loads(sys.argv[1]))
    out = sys.argv[2]
    for mesh in json.loads(sys.argv[3]):
      config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
      workdir = os.path.join(out, 'mesh_%d_%d_%d' % tuple(mesh))
      training.train(training.build(config, workdir))
    moved = os.path.join(out, 'moved')
    shutil.copytree(os.path.join(out, 'mesh_2_2_2'), moved)
    shutil.rmtree(os.path.join(moved, 'checkpoints', '4'))
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 8, 1
    run = training.build(config, moved)
    assert run.start_step == 2, run.start_step
    training.train(run)
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 3, 1, 1
    try:
      training.build(config, os.path.join(out, 'bad_mesh'))
    except ValueError as e:
      print('MESH ERROR:', e)
''')


def _comparable(workdir):
  rows = metrics_lib.read_metrics(os.path.join(workdir, 'metrics.jsonl'))
  return [{k: v for k, v in r.items() if not k.startswith('perf/')} for r in rows]


def _assert_close(reference, other, where):
  assert [r['step'] for r in reference] == [r['step'] for r in other], where
  for a, b in zip(reference, other):
    assert a.keys() == b.keys(), where
    for key in a:
      np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-7, err_msg=f'{where} {key}')


@pytest.mark.slow
def test_meshes_match_one_device_and_checkpoints_move_between_meshes(tmp_path):
  config = demo_config(tmp_path, train__steps=4, train__log_every=1, train__eval_every=0,
                       train__checkpoint_every=2, train__eval_batches=1)
  config.mixing.update_every = 1  # The mixture moves every step, so it is compared too.
  reference_dir = str(tmp_path / 'one_device')
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1
  training.train(training.build(config, reference_dir))
  reference = _comparable(reference_dir)
  assert any(k.startswith('reward/') for k in reference[-1])

  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8',
         'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': REPO}
  done = subprocess.run(
      [sys.executable, '-c', SCRIPT, config.to_json(), str(tmp_path), json.dumps(MESHES)],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-4000:]
  for mesh in MESHES:
    _assert_close(reference, _comparable(str(tmp_path / ('mesh_%d_%d_%d' % mesh))), mesh)
  _assert_close(reference, _comparable(str(tmp_path / 'moved')), 'saved on (2,2,2), resumed on (1,8,1)')
  error = [line for line in done.stdout.splitlines() if line.startswith('MESH ERROR')]
  assert error and 'multiplies to 3 devices' in error[0] and '8 are available' in error[0], error
