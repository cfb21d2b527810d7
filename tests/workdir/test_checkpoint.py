"""Checkpoints: state, meta and loader position restored; async keep-last-k; onto another sharding
and another mesh."""

import os
import subprocess
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np

from mos_jax.infra.sharding import sharded_abstract
from mos_jax.workdir.checkpoint import Checkpointer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _toy_iterator():
  return iter(grain.MapDataset.range(100).shuffle(seed=1).to_iter_dataset())


def _toy_state(offset):
  return {'w': jnp.arange(8.0).reshape(2, 4) + offset, 'opt': {'count': jnp.int32(offset)}}


def test_checkpoint_restores_state_meta_and_loader_position(tmp_path):
  it = _toy_iterator()
  with Checkpointer(str(tmp_path / 'ckpt'), keep=2, async_save=False) as ckpt:
    assert ckpt.latest_step() is None
    [next(it) for _ in range(7)]
    ckpt.save(7, _toy_state(7), it, {'names': ['a', 'b'], 'tau': 'inf'})
    expected = [next(it) for _ in range(5)]  # What the uninterrupted run reads next.
    assert ckpt.latest_step() == 7

    fresh = _toy_iterator()
    target = _toy_state(0)
    state, meta = ckpt.restore(
        7, sharded_abstract(target, jax.tree.map(lambda x: x.sharding, target)), fresh)
  assert [next(fresh) for _ in range(5)] == expected
  np.testing.assert_array_equal(state['w'], _toy_state(7)['w'])
  assert int(state['opt']['count']) == 7 and state['opt']['count'].dtype == jnp.int32
  assert meta == {'names': ['a', 'b'], 'tau': 'inf'}


def test_checkpoint_async_keeps_last_k(tmp_path):
  directory = tmp_path / 'ckpt'
  it = _toy_iterator()
  with Checkpointer(str(directory), keep=2, async_save=True) as ckpt:
    for step in (10, 20, 30):
      next(it)
      ckpt.save(step, _toy_state(step), it, {'step': step})
    ckpt.wait()
    assert ckpt.all_steps() == [20, 30]
    assert ckpt.read_meta() == {'step': 30}
  assert sorted(os.listdir(directory)) == ['20', '30']
  with Checkpointer(str(directory), keep=2) as again:  # A restarted run finds the latest.
    assert again.latest_step() == 30


def test_checkpoint_restores_onto_another_sharding(tmp_path):
  with Checkpointer(str(tmp_path / 'ckpt'), keep=1, async_save=False) as ckpt:
    ckpt.save(1, _toy_state(1), None, {})
    mesh = jax.make_mesh((1,), ('fsdp',), devices=jax.devices()[:1])
    target = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shardings = jax.tree.map(lambda _: target, _toy_state(0))
    state, _ = ckpt.restore(1, sharded_abstract(_toy_state(0), shardings))
  assert state['w'].sharding == target
  np.testing.assert_array_equal(state['w'], _toy_state(1)['w'])


_MESH_MOVE = """
import sys, jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from mos_jax.workdir.checkpoint import Checkpointer
from mos_jax.infra.sharding import sharded_abstract
four = jax.make_mesh((4,), ('fsdp',), devices=jax.devices()[:4])
w = jax.device_put(np.arange(32.0).reshape(8, 4), NamedSharding(four, P('fsdp')))
with Checkpointer(sys.argv[1], keep=1, async_save=True) as ckpt:
  ckpt.save(5, {'w': w}, None, {})
two = jax.make_mesh((2,), ('tensor',), devices=jax.devices()[4:6])
target = NamedSharding(two, P(None, 'tensor'))
with Checkpointer(sys.argv[1], keep=1) as ckpt:
  state, _ = ckpt.restore(5, sharded_abstract({'w': w}, {'w': target}))
assert state['w'].sharding == target, state['w'].sharding
assert {d.id for d in state['w'].devices()} == {4, 5}
np.testing.assert_array_equal(state['w'], np.arange(32.0).reshape(8, 4))
print('moved')
"""


def test_checkpoint_moves_between_meshes(tmp_path):
  env = {**os.environ, 'PYTHONPATH': REPO, 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  run = subprocess.run([sys.executable, '-c', _MESH_MOVE, str(tmp_path / 'ckpt')],
                       capture_output=True, text=True, env=env)
  assert run.returncode == 0 and 'moved' in run.stdout, run.stderr[-2000:]
