"""Multi-process start-up and host-local -> global batches.

Every process runs the same command. `initialize()` must run before anything touches a jax
device. It connects the processes when there are several and does nothing for one:

- explicit: `coordinator_address`, `num_processes`, `process_id` from the argument (flags or a
  config node) or the env vars MOS_COORDINATOR_ADDRESS, MOS_NUM_PROCESSES, MOS_PROCESS_ID
  (MOS_LOCAL_DEVICE_IDS="0,1" optionally restricts the devices this process uses);
- MOS_DISTRIBUTED=auto: jax's own detection (Cloud TPU slices, GKE, SLURM, Open MPI); the TPU
  pod launcher sets it, because a TPU VM cannot tell it is one of several hosts without it;
- SLURM with more than one task: jax's SLURM detector (coordinator = first node of the step).

`timeouts` (the config's `distributed` node) sets how long start-up waits for every process
(`initialization_timeout_s`), after how long without a heartbeat a process counts as lost
(`heartbeat_timeout_s`) and how long a finishing process waits for the others
(`shutdown_timeout_s`); all three go to `jax.distributed.initialize`. A lost or missing process
ends the others with one paragraph and exit code 75 (`mos_jax.infra.lost_host`).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import jax
from jax._src import distributed as jax_distributed  # The coordination client: no public name.
import numpy as np

from mos_jax.infra import console
from mos_jax.infra import lost_host
from mos_jax.infra import sharding

log = logging.getLogger(__name__)

_ENV = {'coordinator_address': 'MOS_COORDINATOR_ADDRESS', 'num_processes': 'MOS_NUM_PROCESSES',
        'process_id': 'MOS_PROCESS_ID', 'local_device_ids': 'MOS_LOCAL_DEVICE_IDS'}
_TIMEOUTS = {'initialization_timeout_s': 'initialization_timeout',
             'heartbeat_timeout_s': 'heartbeat_timeout_seconds',
             'shutdown_timeout_s': 'shutdown_timeout_seconds'}
DEFAULT_TIMEOUTS = {'initialization_timeout_s': 300, 'heartbeat_timeout_s': 100,
                    'shutdown_timeout_s': 300}  # jax's own defaults.
_done: str | None = None  # What initialize() did, so that calling it again is a no-op.


def _get(source, key):
  if source is None:
    return None
  if isinstance(source, Mapping):
    return source.get(key)
  try:  # ConfigDict, absl FlagValues and plain objects.
    return getattr(source, key)
  except (AttributeError, KeyError):
    return None


def plan(source=None, environ: Mapping[str, str] | None = None) -> tuple[str, dict[str, Any] | None]:
  """(description, kwargs for jax.distributed.initialize or None to skip). Pure, for tests."""
  env = os.environ if environ is None else environ
  explicit = {}
  for key, var in _ENV.items():
    value = _get(source, key)
    value = env.get(var) if value in (None, '') else value
    if value not in (None, ''):
      explicit[key] = value
  if isinstance(explicit.get('local_device_ids'), str):
    explicit['local_device_ids'] = [int(i) for i in explicit['local_device_ids'].split(',')]
  if {'coordinator_address', 'num_processes', 'process_id'} & explicit.keys():
    missing = sorted({'coordinator_address', 'num_processes', 'process_id'} - explicit.keys())
    num = int(explicit.get('num_processes', 0) or 0)
    if num == 1:
      return 'single process (num_processes=1)', None
    if missing:
      raise ValueError(f'Distributed start-up needs {missing} as well (flags or '
                       f'{", ".join(_ENV[m] for m in missing)}).')
    explicit['num_processes'], explicit['process_id'] = num, int(explicit['process_id'])
    return (f'explicit coordinator {explicit["coordinator_address"]}, process '
            f'{explicit["process_id"]} of {num}'), explicit
  devices = {k: v for k, v in explicit.items() if k == 'local_device_ids'}
  if env.get('MOS_DISTRIBUTED', '').lower() in ('auto', '1', 'true'):
    return 'auto-detected cluster (MOS_DISTRIBUTED=auto)', devices
  slurm_vars = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID',
                'SLURM_LOCALID')
  if all(v in env for v in slurm_vars):
    tasks = int(env['SLURM_NTASKS'])
    if tasks == 1:
      return 'single process (SLURM_NTASKS=1)', None
    kwargs: dict[str, Any] = dict(devices)
    # jax maps SLURM_LOCALID to one device per process; with one task per node, use all GPUs.
    per_node = env.get('SLURM_STEP_TASKS_PER_NODE') or env.get('SLURM_NTASKS_PER_NODE', '')
    gpus = env.get('SLURM_GPUS_ON_NODE')
    if per_node.split('(')[0] == '1' and gpus and not kwargs:
      kwargs['local_device_ids'] = list(range(int(gpus)))
    return f'SLURM task {env["SLURM_PROCID"]} of {tasks}', kwargs
  return 'single process (no cluster environment found)', None


def initialize(config_or_flags=None, timeouts=None, joined_dir: str | None = None) -> str:
  """Connects the processes of a multi-host run (see the module docstring); returns what it did.

  `timeouts`: a mapping or ConfigDict with DEFAULT_TIMEOUTS' keys (seconds). `joined_dir`: a
  folder every host sees, where each process notes that it started (a failed start-up then names
  the processes that did not).
  """
  global _done
  if _done is not None or jax.distributed.is_initialized():
    return _done or 'already initialized'
  description, kwargs = plan(config_or_flags)
  if kwargs is not None:
    seconds = {k: _get(timeouts, k) or v for k, v in DEFAULT_TIMEOUTS.items()}
    kwargs.update({_TIMEOUTS[k]: int(v) for k, v in seconds.items()})
    if 'coordinator_address' in kwargs:  # Auto-detected runs learn these inside jax.
      lost_host.joining(kwargs['process_id'], kwargs['num_processes'],
                        kwargs['coordinator_address'], seconds['initialization_timeout_s'],
                        joined_dir)
    with console.native_quiet():  # A failed start-up: one paragraph, not jax's fatal error.
      jax.distributed.initialize(**kwargs)
    state = jax_distributed.global_state
    if 'coordinator_address' not in kwargs:
      lost_host.joining(state.process_id, state.num_processes, state.coordinator_address,
                        seconds['initialization_timeout_s'])
    lost_host.watch(state.client, seconds['heartbeat_timeout_s'])
    description += f' -> {jax.process_count()} processes, {jax.device_count()} devices'
  log.info('mos_jax.infra.distributed: %s', description)
  _done = description
  return description


def is_main_process() -> bool:
  """True on the one process that writes metrics, plots and logs."""
  return jax.process_index() == 0


def host_local_to_global(batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict:
  """Global jax arrays from this host's rows, split over (data, fsdp) on the leading dimension.

  Each process passes its `global_batch // process_count` rows; rows of process i become rows
  [i * local, (i + 1) * local) of the global batch.
  """
  shards = mesh.shape['data'] * mesh.shape['fsdp']
  out = {}
  for key, local in batch.items():
    local = np.asarray(local)
    if local.ndim == 0 or (local.shape[0] * jax.process_count()) % shards:
      raise ValueError(
          f'Batch key {key!r}: {local.shape[0] if local.ndim else 0} local rows x '
          f'{jax.process_count()} processes is not divisible by data*fsdp = {shards}.')
    out[key] = jax.make_array_from_process_local_data(
        sharding.batch_sharding(mesh, local.ndim), local)
  return out
