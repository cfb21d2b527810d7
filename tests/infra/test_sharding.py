"""Mesh resolution, the logical-axis rule table, optimizer-state shardings and global batches.

Multi-device checks run in subprocesses with simulated CPU devices (XLA_FLAGS must be set
before jax starts); each prints JSON that the tests below assert on.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import ml_collections
import numpy as np
import pytest

from mos_jax.infra import distributed
from mos_jax.infra import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _mesh(data, fsdp, tensor):
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))


def _run(script, devices, extra_env=None, timeout=120):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT,
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}', **(extra_env or {}))
  return subprocess.Popen([sys.executable, '-c', textwrap.dedent(script)], env=env, cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc, timeout=120):
  out, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, err[-3000:]
  return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize('cfg,n,expected', [
    ((1, -1, 1), 8, (1, 8, 1)),
    ((2, -1, 2), 8, (2, 2, 2)),
    ((-1, 4, 1), 8, (2, 4, 1)),
    ((1, 1, 1), 1, (1, 1, 1)),
    ((2, 4, 8), 64, (2, 4, 8)),
])
def test_mesh_shape_resolves(cfg, n, expected):
  assert sharding.mesh_shape(_mesh(*cfg), n) == expected


@pytest.mark.parametrize('cfg,n,numbers', [
    ((1, 3, 1), 8, ('3', '8')),      # Fixed sizes that multiply to the wrong count.
    ((1, 16, 1), 8, ('16', '8')),
    ((3, -1, 1), 8, ('3', '8')),     # -1 cannot take the rest: 3 does not divide 8.
])
def test_mesh_shape_mismatch_names_both_numbers(cfg, n, numbers):
  with pytest.raises(ValueError) as e:
    sharding.mesh_shape(_mesh(*cfg), n)
  for number in numbers:
    assert number in str(e.value)


@pytest.mark.parametrize('cfg', [(-1, -1, 1), (0, 8, 1), (1, -2, 1)])
def test_mesh_shape_rejects_bad_sizes(cfg):
  with pytest.raises(ValueError, match='config.mesh'):
    sharding.mesh_shape(_mesh(*cfg), 8)


def test_unknown_logical_name_is_an_error():
  with pytest.raises(KeyError, match='emb'):
    sharding.logical_to_mesh_spec(('emb', 'mlp'))


def test_host_local_to_global_one_device():
  mesh = sharding.make_mesh(_mesh(1, -1, 1), jax.devices()[:1])
  batch = {'tokens': np.arange(12, dtype=np.int32).reshape(4, 3),
           'dataset_ids': np.array([0, 1, 1, 0], np.int32)}
  out = distributed.host_local_to_global(batch, mesh)
  for key, value in batch.items():
    assert out[key].shape == value.shape and out[key].dtype == value.dtype
    np.testing.assert_array_equal(np.asarray(out[key]), value)
  assert distributed.is_main_process()


def test_single_process_initialize_is_a_logged_no_op(monkeypatch):
  for var in ('MOS_COORDINATOR_ADDRESS', 'MOS_NUM_PROCESSES', 'MOS_PROCESS_ID', 'MOS_DISTRIBUTED',
              'SLURM_JOB_ID'):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setattr(distributed, '_done', None)
  first = distributed.initialize()
  assert first.startswith('single process')
  assert distributed.initialize() == first  # Idempotent.
  assert not jax.distributed.is_initialized()


SLURM = dict(SLURM_JOB_ID='7', SLURM_STEP_NODELIST='gpu[01-02]', SLURM_PROCID='3',
             SLURM_LOCALID='3')


@pytest.mark.parametrize('env,flags,expected', [
    ({}, None, None),
    (dict(MOS_NUM_PROCESSES='1'), None, None),
    (dict(MOS_COORDINATOR_ADDRESS='h:1', MOS_NUM_PROCESSES='4', MOS_PROCESS_ID='2'), None,
     dict(coordinator_address='h:1', num_processes=4, process_id=2)),
    # Flags win over the environment; process 0 is not mistaken for "unset".
    (dict(MOS_PROCESS_ID='2'), dict(coordinator_address='h:1', num_processes=2, process_id=0),
     dict(coordinator_address='h:1', num_processes=2, process_id=0)),
    (dict(MOS_DISTRIBUTED='auto'), None, {}),
    (dict(SLURM, SLURM_NTASKS='1'), None, None),
    (dict(SLURM, SLURM_NTASKS='16', SLURM_NTASKS_PER_NODE='8', SLURM_GPUS_ON_NODE='8'), None, {}),
    (dict(SLURM, SLURM_NTASKS='2', SLURM_NTASKS_PER_NODE='1', SLURM_GPUS_ON_NODE='8'), None,
     dict(local_device_ids=list(range(8)))),
    # The step's layout (srun --ntasks-per-node=1) wins over the allocation's (8 per node).
    (dict(SLURM, SLURM_NTASKS='2', SLURM_NTASKS_PER_NODE='8', SLURM_STEP_TASKS_PER_NODE='1(x2)',
          SLURM_GPUS_ON_NODE='4'), None, dict(local_device_ids=list(range(4)))),
])
def test_distributed_plan(env, flags, expected):
  assert distributed.plan(flags, env)[1] == expected


def test_distributed_plan_incomplete_explicit_settings():
  with pytest.raises(ValueError, match='MOS_PROCESS_ID'):
    distributed.plan(None, dict(MOS_COORDINATOR_ADDRESS='h:1', MOS_NUM_PROCESSES='2'))


EIGHT_DEVICES = '''
import json, jax, jax.numpy as jnp, ml_collections, numpy as np, optax
from flax import nnx
from mos_jax.infra import distributed
from mos_jax.infra import sharding

def spec(s, ndim):
  return [list(a) if isinstance(a, tuple) else a for a in tuple(s.spec) + (None,) * (ndim - len(s.spec))]

class Toy(nnx.Module):
  def __init__(self):
    def p(shape, names):
      return nnx.Param(jnp.ones(shape), out_sharding=names, eager_sharding=False)
    self.embed = p((256, 64), ('vocab', 'embed'))
    self.q = p((64, 8, 16), ('embed', 'heads', 'head_dim'))
    self.k = p((64, 2, 16), ('embed', 'kv_heads', 'head_dim'))
    self.o = p((8, 16, 64), ('heads', 'head_dim', 'embed'))
    self.up = p((64, 256), ('embed', 'mlp'))
    self.down = p((256, 64), ('mlp', 'embed'))
    self.odd = p((6, 256), ('embed', 'mlp'))
    self.norm = p((64,), ('norm',))
    self.stack = p((4, 64, 256), ('layers', 'embed', 'mlp'))

mesh_cfg = lambda d, f, t: ml_collections.ConfigDict(dict(data=d, fsdp=f, tensor=t))
res = {'specs': {}, 'tiny': {}}
try:
  sharding.make_mesh(mesh_cfg(1, 3, 1))
except ValueError as e:
  res['mismatch'] = str(e)

_, abstract = nnx.split(nnx.eval_shape(Toy))
for shape in [(1, 8, 1), (1, 2, 4), (2, 2, 2)]:
  mesh = sharding.make_mesh(mesh_cfg(*shape))
  sh = nnx.to_pure_dict(sharding.state_shardings(abstract, mesh))
  shapes = nnx.to_pure_dict(abstract)
  res['specs'][str(shape)] = {k: spec(v, len(shapes[k].shape)) for k, v in sh.items()}

# Real placement on (1, 8, 1): params and AdamW moments hold 1/8 of each large array per device.
mesh = sharding.make_mesh(mesh_cfg(1, 8, 1))
params_abs = nnx.to_pure_dict(abstract)
param_sh = nnx.to_pure_dict(sharding.state_shardings(abstract, mesh))
params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(Toy())), out_shardings=param_sh)()
tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.1))
opt_sh = sharding.opt_state_shardings(tx, params_abs, param_sh, mesh)
opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
adam = opt_state[1][0]
res['param_shard_rows'] = params['up'].addressable_shards[0].data.shape
res['mu_shard_rows'] = adam.mu['up'].addressable_shards[0].data.shape
res['nu_spec'] = spec(adam.nu['down'].sharding, 2)
res['count_replicated'] = adam.count.sharding.is_fully_replicated
res['unsharded_ok'] = sharding.unsharded_large_params(
    {'params': params, 'opt': opt_state}, min_size=1000)
# A checkpoint written on (1, 8, 1) restores onto (2, 2, 2): Orbax reshards to the target.
import tempfile
from mos_jax.workdir.checkpoint import Checkpointer
params = jax.jit(lambda t: jax.tree.map(lambda p: p * jnp.arange(p.size).reshape(p.shape), t),
                 out_shardings=param_sh)(params)
ckpt = Checkpointer(tempfile.mkdtemp(), async_save=False)
ckpt.save(1, {'params': params, 'opt': opt_state}, None, {})
mesh2 = sharding.make_mesh(mesh_cfg(2, 2, 2))
param_sh2 = nnx.to_pure_dict(sharding.state_shardings(abstract, mesh2))
target = sharding.sharded_abstract(
    {'params': params_abs, 'opt': jax.eval_shape(tx.init, params_abs)},
    {'params': param_sh2, 'opt': sharding.opt_state_shardings(tx, params_abs, param_sh2, mesh2)})
restored, _ = ckpt.restore(1, target)
ckpt.close()
res['restored_equal'] = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                            zip(jax.tree.leaves(restored['params']), jax.tree.leaves(params)))
res['restored_spec'] = spec(restored['params']['up'].sharding, 2)
res['restored_mu_spec'] = spec(restored['opt'][1][0].mu['up'].sharding, 2)

bad_sh = dict(param_sh, up=sharding.replicated(mesh), down=sharding.NamedSharding(mesh, jax.P(None, 'tensor')))
res['unsharded_bad'] = sharding.unsharded_large_params(
    sharding.sharded_abstract(params_abs, bad_sh), min_size=1000)
res['unsharded_small'] = sharding.unsharded_large_params(
    sharding.sharded_abstract(params_abs, bad_sh), min_size=20000)

# Global batch from one host's rows on a (2, 4, 1) mesh.
mesh = sharding.make_mesh(mesh_cfg(2, 4, 1))
batch = {'tokens': np.arange(64, dtype=np.int32).reshape(16, 4), 'dataset_ids': np.arange(16, dtype=np.int32)}
glob = distributed.host_local_to_global(batch, mesh)
res['batch_equal'] = all(np.array_equal(np.asarray(glob[k]), v) for k, v in batch.items())
res['batch_spec'] = spec(glob['tokens'].sharding, 2)
res['batch_shard_rows'] = sorted({s.data.shape[0] for s in glob['tokens'].addressable_shards})
try:
  distributed.host_local_to_global({'tokens': np.zeros((12, 4), np.int32)}, mesh)
except ValueError as e:
  res['batch_error'] = str(e)

# Activations pinned by logical names: batch over (data, fsdp), MLP/vocab over tensor.
mesh = sharding.make_mesh(mesh_cfg(2, 2, 2))
with jax.set_mesh(mesh):
  pinned = jax.jit(lambda x, y: (sharding.constrain(x * 2, 'batch', None, 'embed'),
                                 sharding.constrain(y * 2, 'batch', None, 'mlp')))(
      jnp.ones((8, 4, 16)), jnp.ones((8, 4, 16)))
res['constrained'] = [spec(a.sharding, 3) for a in pinned]

# The backbone's own parameters: every >= 2-D one split over fsdp, with and without scan.
from mos_jax import models
for scan in (False, True):
  config = models.get_preset('tiny', scan_layers=scan)
  _, tiny = nnx.split(nnx.eval_shape(lambda: models.Decoder(config, rngs=nnx.Rngs(0))), nnx.Param)
  for shape in [(1, 8, 1), (2, 2, 2)]:
    mesh = sharding.make_mesh(mesh_cfg(*shape))
    sharded = sharding.sharded_abstract(tiny, sharding.state_shardings(tiny, mesh))
    leaves = jax.tree_util.tree_flatten_with_path(sharded)[0]
    res['tiny'][f'{shape} scan={scan}'] = {
        'params': sum(len(l.shape) >= 2 for _, l in leaves),
        'unsharded': [jax.tree_util.keystr(p) for p, l in leaves
                      if len(l.shape) >= 2 and sharding.unsharded_large_params([l], min_size=0)]}
print(json.dumps(res))
'''


@pytest.fixture(scope='module')
def eight():
  return _result(_run(EIGHT_DEVICES, 8))


def test_mesh_that_does_not_match_devices_fails(eight):
  assert '3' in eight['mismatch'] and '8' in eight['mismatch']


F, T = 'fsdp', 'tensor'


@pytest.mark.parametrize('mesh,expected', [
    ('(1, 8, 1)', dict(embed=[None, F], q=[F, None, None], k=[F, None, None], o=[None, None, F],
                       up=[F, None], down=[None, F], odd=[None, F], norm=[F],
                       stack=[None, F, None])),
    # 2 KV heads do not split 4 ways: replicated over tensor, still FSDP-sharded.
    ('(1, 2, 4)', dict(embed=[T, F], q=[F, T, None], k=[F, None, None], o=[T, None, F],
                       up=[F, T], down=[T, F], odd=[F, T], norm=[F], stack=[None, F, T])),
    ('(2, 2, 2)', dict(embed=[T, F], q=[F, T, None], k=[F, T, None], o=[T, None, F],
                       up=[F, T], down=[T, F], odd=[F, T], norm=[F], stack=[None, F, T])),
])
def test_rule_table_on_toy_module(eight, mesh, expected):
  assert eight['specs'][mesh] == expected


def test_params_and_optimizer_state_are_fsdp_sharded(eight):
  assert eight['param_shard_rows'] == [8, 256]  # up is (64, 256) over 8 fsdp shards.
  assert eight['mu_shard_rows'] == [8, 256]
  assert eight['nu_spec'] == [None, F]
  assert eight['count_replicated']
  assert eight['unsharded_ok'] == []


def test_checkpoint_restores_onto_another_mesh(eight):
  assert eight['restored_equal']
  assert eight['restored_spec'] == [F, T] and eight['restored_mu_spec'] == [F, T]


def test_unsharded_large_params_catches_replication(eight):
  # Replicated, or split over another axis only: both keep a full copy per FSDP shard.
  assert sorted(eight['unsharded_bad']) == ["['down']", "['up']"]
  assert eight['unsharded_small'] == []  # 64 x 256 is below that min_size.


def test_constrain_pins_activations(eight):
  assert eight['constrained'] == [[['data', 'fsdp'], None, None], [['data', 'fsdp'], None, T]]
  x = np.ones((2, 3))
  assert sharding.constrain(x, 'batch', None) is x  # No mesh context: untouched.


def test_host_local_to_global_eight_devices(eight):
  assert eight['batch_equal']
  assert eight['batch_spec'] == [['data', 'fsdp'], None]
  assert eight['batch_shard_rows'] == [2]
  assert '12' in eight['batch_error'] and '8' in eight['batch_error']


def test_tiny_preset_is_fully_fsdp_sharded(eight):
  assert len(eight['tiny']) == 4
  for mesh, found in eight['tiny'].items():
    assert found['params'] > 0, mesh
    assert found['unsharded'] == [], mesh


TWO_PROCESSES = '''
import json, numpy as np, ml_collections
from mos_jax.infra import distributed
from mos_jax.infra import sharding
desc = distributed.initialize()
import jax
pid = jax.process_index()
mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=-1, tensor=1)))
local = {'tokens': np.arange(8 * 3, dtype=np.int32).reshape(8, 3) + 100 * pid,
         'dataset_ids': np.full((8,), pid, np.int32)}
glob = distributed.host_local_to_global(local, mesh)
rep = sharding.replicated(mesh)
total = jax.jit(lambda t: t.sum(), out_shardings=rep)(glob['tokens'])
ids = jax.jit(lambda t: t + 0, out_shardings=rep)(glob['dataset_ids'])
print(json.dumps(dict(desc=desc, shape=list(glob['tokens'].shape), total=int(total),
                      ids=np.asarray(ids).tolist(), main=distributed.is_main_process())))
'''


def test_two_processes_build_one_global_batch():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  env = dict(MOS_COORDINATOR_ADDRESS=f'localhost:{port}', MOS_NUM_PROCESSES='2')
  procs = [_run(TWO_PROCESSES, 4, dict(env, MOS_PROCESS_ID=str(i))) for i in range(2)]
  results = [_result(p) for p in procs]
  local_sum = int(np.arange(24).sum())
  for pid, r in enumerate(results):
    assert '8 devices' in r['desc']
    assert r['shape'] == [16, 3]
    assert r['total'] == 2 * local_sum + 100 * 24  # Both hosts' rows, each counted once.
    assert r['ids'] == [0] * 8 + [1] * 8  # Process i's rows come i-th.
    assert r['main'] == (pid == 0)


def test_initialize_passes_the_distributed_timeouts_to_jax(monkeypatch, tmp_path):
  """The config's distributed.*_s keys reach jax.distributed.initialize under jax's names."""
  from mos_jax.infra import lost_host
  seen = {}

  class Stop(Exception):
    pass

  def fake_initialize(**kwargs):
    seen.update(kwargs)
    raise Stop

  monkeypatch.setattr(distributed, '_done', None)
  monkeypatch.setattr(lost_host, '_watch', None)  # Put back afterwards.
  monkeypatch.setattr(lost_host, '_install', lambda: None)  # No SIGABRT handler in the suite.
  monkeypatch.setattr(jax.distributed, 'initialize', fake_initialize)
  monkeypatch.setenv('MOS_COORDINATOR_ADDRESS', 'h:1')
  monkeypatch.setenv('MOS_NUM_PROCESSES', '2')
  monkeypatch.setenv('MOS_PROCESS_ID', '1')
  with pytest.raises(Stop):
    distributed.initialize(timeouts={'heartbeat_timeout_s': 7, 'initialization_timeout_s': 9},
                           joined_dir=str(tmp_path / 'joined'))
  assert seen == dict(coordinator_address='h:1', num_processes=2, process_id=1,
                      initialization_timeout=9, heartbeat_timeout_seconds=7,
                      shutdown_timeout_seconds=300)
  assert os.listdir(tmp_path / 'joined') == ['process_1']  # Names it if start-up fails.
