"""MultiDDS and MultiUAT (the new signals: gradients, dev entropy) on 8 simulated devices (mesh
2 x 2 x 2) give one device's numbers."""

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

STRATEGIES = ['multidds', 'multiuat']

SCRIPT = textwrap.dedent('''
    import json, os, sys
    import jax
    from mos_jax import training
    from ml_collections import config_dict
    assert jax.device_count() == 8, jax.devices()
    config = config_dict.ConfigDict(json.loads(sys.argv[1]))
    for strategy in json.loads(sys.argv[3]):
      config.mixing.strategy = strategy
      config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
      training.train(training.build(config, os.path.join(sys.argv[2], strategy)))
''')


def _rows(workdir):
  rows = metrics_lib.read_metrics(os.path.join(workdir, 'metrics.jsonl'))
  return [{k: v for k, v in r.items() if not k.startswith('perf/')} for r in rows]


@pytest.mark.slow
def test_rival_strategies_sharded_equal_one_device(tmp_path):
  config = demo_config(tmp_path, train__steps=3, train__log_every=1, train__eval_every=0,
                       train__checkpoint_every=0, train__eval_batches=1)
  config.mixing.update_every = 1
  config.data.reward_batch_size = 8  # 8 x 4 datasets rows split over data x fsdp = 4
  references = {}
  for strategy in STRATEGIES:
    config.mixing.strategy = strategy
    workdir = str(tmp_path / 'one' / strategy)
    training.train(training.build(config, workdir))
    references[strategy] = _rows(workdir)
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8',
         'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': REPO}
  done = subprocess.run([sys.executable, '-c', SCRIPT, config.to_json(), str(tmp_path / 'eight'),
                         json.dumps(STRATEGIES)], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-4000:]
  for strategy in STRATEGIES:
    ref, got = references[strategy], _rows(str(tmp_path / 'eight' / strategy))
    assert [r['step'] for r in ref] == [r['step'] for r in got], strategy
    assert any(k.startswith('reward/') for k in ref[-1]), strategy
    for a, b in zip(ref, got):
      assert a.keys() == b.keys(), strategy
      for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=2e-5, atol=1e-6, err_msg=f'{strategy} {key}')
