"""A 2-step MoS run from a tiny Hugging Face checkpoint of each newer family (sliding windows,
soft-caps, QK-norm, sandwich norms on), on one device and on the simulated (2, 2, 2) mesh: the same
losses, rewards and mixtures."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from mos_jax import models, training
from demo_run import REPO, demo_config
from test_train_sharded import _assert_close, _comparable

SCRIPT = textwrap.dedent('''
    import json, sys
    import jax
    from mos_jax import training
    from ml_collections import config_dict
    assert jax.device_count() == 8, jax.devices()
    config = config_dict.ConfigDict(json.loads(sys.argv[1]))
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
    training.train(training.build(config, sys.argv[2]))
''')


@pytest.mark.slow
@pytest.mark.parametrize('preset', ['tiny-qwen3', 'tiny-gemma2', 'tiny-gemma3', 'tiny-mistral'])
def test_two_mos_steps_one_device_equal_the_mesh(preset, tmp_path):
  checkpoint = tmp_path / 'checkpoint'
  # max_len 128 rows: windows of 8 and the local / global pattern are both exercised.
  models.save_hf(models.init_model(models.get_preset(preset), seed=0), checkpoint)
  config = demo_config(tmp_path, train__steps=2, train__log_every=1, train__eval_every=0,
                       train__checkpoint_every=0, train__eval_batches=1)
  config.model.hf_checkpoint = str(checkpoint)
  config.mixing.update_every = 1  # A scorer update (rewards from the forward) every step.
  config.data.reward_batch_size = 4
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1
  training.train(training.build(config, str(tmp_path / 'one_device')))
  reference = _comparable(str(tmp_path / 'one_device'))
  assert reference[-1]['step'] == 2 and any(k.startswith('reward/') for k in reference[-1])

  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8',
         'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': REPO}
  done = subprocess.run([sys.executable, '-c', SCRIPT, config.to_json(), str(tmp_path / 'mesh')],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-4000:]
  _assert_close(reference, _comparable(str(tmp_path / 'mesh')), (preset, '(2, 2, 2)'))
