"""Building a run: everything Algorithm 1 needs, and the one place where steps are jitted.

`build(config, workdir)` makes the mesh, data, model, jitted steps (shardings and donation), the
train state, checkpoints and metrics, and resumes from the latest checkpoint in `workdir`
(`resume`); `loop.train(run)` drives it.

A run holds its workdir's lock (`workdir.lock`) from `build` to the end of `train`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mos_jax import config as config_lib
from mos_jax import mixing
from mos_jax.config import check as config_check
from mos_jax.data import build_data
from mos_jax.infra import compilation_cache
from mos_jax.infra import console
from mos_jax.infra import distributed
from mos_jax.infra import errors
from mos_jax.infra import lost_host
from mos_jax.infra import sharding
from mos_jax.models import lora
from mos_jax.models.build import build_model
from mos_jax.steps import reference_cache
from mos_jax.steps import reward as reward_lib
from mos_jax.steps import sft
from mos_jax.steps.state import TrainState, initial_state
from mos_jax.training import reference_run
from mos_jax.training import resume as resume_lib
from mos_jax.workdir import checkpoint as checkpoint_lib
from mos_jax.workdir import lock as lock_lib
from mos_jax.workdir import metrics as metrics_lib
from mos_jax.workdir.restore import checked_workdir


class TrainingError(errors.UserError, RuntimeError):
  """A run that cannot go on (e.g. too many non-finite updates in a row)."""


@dataclasses.dataclass
class Run:
  config: Any
  workdir: str
  mesh: jax.sharding.Mesh
  data: Any  # mos_jax.data.DataBundle
  strategy: Any  # mos_jax.mixing.Strategy
  graphdef: Any  # The backbone's structure; nnx.merge(graphdef, state.params) is the model.
  meta: dict  # Saved with every checkpoint: dataset names, data fingerprints, config.
  state: TrainState
  train_fn: Callable  # (state, batch) -> (state, metrics), jitted, state donated.
  reward_fn: Callable | None  # (params, batch) -> reward outputs, jitted.
  mixing_fn: Callable | None  # (mixing_state, reward outputs) -> (mixing_state, info), jitted.
  eval_fn: Callable  # (params, batch) -> (nll sum, tokens), jitted.
  probs_fn: Callable  # mixing_state -> probabilities [N], jitted.
  reference_tables: dict | None  # theta_0 NLL per example (DIFF with the cache).
  checkpointer: Any
  writer: Any
  start_step: int
  lock: Any = None  # workdir.lock.WorkdirLock held by process 0 until train() ends.
  saved_step: int | None = None  # The newest checkpoint (written or restored), for messages.
  window: list = dataclasses.field(default_factory=list)  # Unlogged step metrics at resume.
  stopped_by: str | None = None  # 'SIGTERM' / 'Ctrl-C (SIGINT)' when a signal stopped train().
  exit_code: int = 0  # What the train command exits with (130 after Ctrl-C).
  frozen: Any = None  # LoRA: the frozen base (pure dict, never donated or saved); None without.
  eval_tasks: Any = None  # evals.during_training.TrainingTasks, made at the first evaluation.
  train_jit: Any = None  # The jitted (state, batch, frozen) step behind train_fn (to lower it).

  def close(self):
    """Releases the workdir (train() does it; call it when a built run is not trained)."""
    if self.lock is not None:
      self.lock.release()
      self.lock = None


def _mixing_functions(config, strategy, graphdef, initial_params, param_shardings, mesh, data,
                      workdir, is_main, frozen=None):
  """The jitted reward step (the strategy's signals) and update, and the theta_0 NLL tables.

  theta_0 is the initial model: a resumed run rebuilds it the same way before restoring. A
  strategy with a reference run (DoReMi) gets that run's final parameters instead.
  """
  replicated = sharding.replicated(mesh)
  reference = config.mixing.diff_reference  # 'cache', 'device' or 'base' (config_check).
  reference_params = reference_tables = None
  if strategy.needs_reference and reference == 'device':
    ref_dtype = jnp.dtype(config.mixing.reference_dtype)
    reference_params = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(ref_dtype), p),
                               out_shardings=param_shardings)(initial_params)
  if strategy.reference_run:  # DoReMi: another run's final model (reference_run.py).
    reference_params = reference_run.load_params(strategy, initial_params, param_shardings, mesh)
  grad_mask = None
  if 'grad_cos' in strategy.signals:
    grad_mask = reward_lib.gradient_mask(initial_params, config.mixing.grad_params)
  reward_step = jax.jit(
      functools.partial(reward_lib.signal_step, graphdef=graphdef, num_datasets=len(data.names),
                        signals=strategy.signals, grad_mask=grad_mask,
                        micro_rows=config.data.reward_micro_batch,
                        base_reference=strategy.needs_reference and reference == 'base'),
      in_shardings=(param_shardings, param_shardings if reference_params is not None else None,
                    None, None), out_shardings=replicated)
  reward_fn = lambda params, batches: reward_step(params, reference_params, batches, frozen)
  mixing_fn = jax.jit(strategy.make_update(config.mixing), out_shardings=replicated)
  if strategy.needs_reference and reference == 'cache':
    nll_step = jax.jit(functools.partial(reward_lib.reference_nll_step, graphdef=graphdef,
                                         micro_rows=config.data.reward_micro_batch),
                       in_shardings=(param_shardings, None, None), out_shardings=replicated)
    with jax.set_mesh(mesh):
      reference_tables = reference_cache.load_or_compute(
          os.path.join(workdir, 'reference_nll'), data, reference_cache.model_key(config),
          lambda batch: nll_step(initial_params, batch, frozen),
          functools.partial(distributed.host_local_to_global, mesh=mesh),
          batch_size=config.data.eval_batch_size, write=is_main)
  return reward_fn, mixing_fn, reference_tables


def build(config, workdir: str) -> Run:
  """Everything a run needs; resumes from the latest checkpoint in `workdir` if there is one.

  The config is checked before anything is read or written; a workdir in use by another run is
  refused (WorkdirInUse). From here until `train` returns (or `Run.close`), the run holds the lock.
  """
  config_check.validate(config)
  workdir = checked_workdir(workdir)
  distributed.initialize(timeouts=config.distributed, joined_dir=os.path.join(workdir, '.joined'))
  compilation_cache.enable(config.train.compilation_cache)
  is_main = distributed.is_main_process()
  lock = lock_lib.WorkdirLock(workdir).acquire() if is_main else None
  try:
    run = _build(config, workdir, is_main)
  except BaseException:
    if lock is not None:
      lock.release()
    raise
  run.lock = lock
  # The log file starts once the run is accepted: a refused start writes nothing into workdir.
  console.log_to(os.path.join(workdir, 'train.log' if is_main
                              else f'train.process{jax.process_index()}.log'))
  if jax.process_count() > 1:  # A lost host: one paragraph here, jax's fatal error in the log.
    console.native_to_log()
  return run


def _build(config, workdir: str, is_main: bool) -> Run:
  mesh = sharding.make_mesh(config.mesh)
  data = build_data(config, process_index=jax.process_index(),
                    process_count=jax.process_count())
  sizes = data.unit_sizes()  # What the mixture counts (mixing.unit), for the prior.
  if config.train.get('epochs', 0) > 0:  # Passes over the data: the sizes are known only now.
    config.train.steps = _steps_for_epochs(config, data, sizes)
  names = data.names
  num_datasets = len(names)
  _check_batch_sizes(config, num_datasets, mesh)
  strategy = mixing.make_strategy(config.mixing, names, sizes, train_steps=config.train.steps)
  reference_run.check_data(config, strategy, data)  # Before the model: DoReMi's reference, same data.

  # The model is built outside the mesh context: its params carry logical names, which
  # init_model/load_hf map to mesh axes themselves.
  graphdef, state, state_shardings, optimizer, frozen = initial_state(
      config, build_model(config, mesh, len(data.tokenizer)), sizes, mesh, strategy)
  param_shardings, replicated = state_shardings.params, sharding.replicated(mesh)

  # LoRA dropout (training forwards only) draws its masks from (seed, step).
  dropout_seed = (config.seed if lora.enabled(config.model) and config.model.lora.dropout > 0
                  else None)
  train_step = functools.partial(sft.train_step, graphdef=graphdef, optimizer=optimizer,
                                 num_datasets=num_datasets, micro_batches=config.train.micro_batches,
                                 dropout_seed=dropout_seed)

  def train_and_mix(state, batch, frozen):  # The strategy's per-step hook runs inside the same jit.
    state, metrics = train_step(state, batch, frozen)
    return state.replace(mixing=strategy.after_train_step(state.mixing, metrics)), metrics

  # With LoRA the frozen base is a third argument (on the rule-table shardings), never donated.
  train_jit = jax.jit(
      train_and_mix,
      in_shardings=(state_shardings, None, None), out_shardings=(state_shardings, replicated),
      donate_argnums=(0,))
  train_fn = lambda state, batch: train_jit(state, batch, frozen)
  eval_step = jax.jit(functools.partial(sft.eval_step, graphdef=graphdef),
                      in_shardings=(param_shardings, None, None), out_shardings=replicated)
  eval_fn = lambda params, batch: eval_step(params, batch, frozen)
  probs_fn = jax.jit(strategy.probs)
  reward_fn = mixing_fn = reference_tables = None
  if strategy.updates_scorer:
    reward_fn, mixing_fn, reference_tables = _mixing_functions(
        config, strategy, graphdef, state.params, param_shardings, mesh, data, workdir, is_main,
        frozen)

  checkpointer = checkpoint_lib.Checkpointer(
      os.path.join(workdir, 'checkpoints'), keep=config.train.keep_checkpoints,
      async_save=config.train.async_checkpoints)
  lost_host.describe_checkpoints(checkpointer.describe_latest)  # For a lost host's paragraph.
  start_step, window = 0, []
  meta = {'names': names, 'fingerprints': {n: data.fingerprint(n) for n in names},
          'loader': _loader_identity(config), 'config': json.loads(config_lib.config_to_json(config))}
  if lora.enabled(config.model):  # Adapters resume only onto the base they were trained on.
    meta['base'] = reference_cache.model_key(config)
  if checkpointer.latest_step() is not None:
    try:
      state, start_step, window = resume_lib.resume(config, checkpointer, state, state_shardings, data,
                                          meta, workdir, is_main)
    except BaseException:
      checkpointer.close()
      raise

  if is_main:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config_lib.config_to_json(config))
  writer = metrics_lib.MetricsWriter(workdir, enabled=is_main, resume_step=start_step or None)
  return Run(config=config, workdir=workdir, mesh=mesh, data=data, strategy=strategy,
             graphdef=graphdef, meta=meta, state=state, train_fn=train_fn, reward_fn=reward_fn, mixing_fn=mixing_fn,
             eval_fn=eval_fn, probs_fn=probs_fn, reference_tables=reference_tables,
             checkpointer=checkpointer, writer=writer, start_step=start_step,
             saved_step=start_step or None, window=window, frozen=frozen, train_jit=train_jit)


def _steps_for_epochs(config, data, sizes) -> int:
  """Steps in which `train.epochs` passes over every dataset's units are drawn, at the prior
  mixture q_tau: rows of dataset i are drawn with d_i = (p_i / u_i) / Z, Z = sum_j p_j / u_j, so a
  row holds 1 / Z units on average and the run needs epochs * units * Z / batch_size steps ('row':
  u = 1, Z = 1: the rows of one pass)."""
  p = mixing.prior_probs(sizes, config.mixing.prior_temperature)
  u = data.train.units_per_row()
  units = sum(rows.plan.rows_in_epoch(0) * u_i for rows, u_i in zip(data.train.train_streams, u))
  return math.ceil(config.train.epochs * units * float(np.sum(p / u)) / config.train.batch_size)


def _loader_identity(config) -> dict:
  """Settings that decide which batches the loader yields (besides the data itself). Not the
  process count nor Grain workers: global batches are the same for any of them."""
  d = config.data
  return {'seed': config.seed, 'batch_size': config.train.batch_size,
          'reward_batch_size': d.reward_batch_size, 'max_len': d.max_len, 'packing': d.packing,
          'buckets': list(d.buckets), 'mix_per': d.mix_per,
          'unit': config.mixing.get('unit', 'row'), 'draws': d.get('draws', 'random')}


def _check_batch_sizes(config, num_datasets: int, mesh):
  """Batch shapes must split evenly over the batch-sharded mesh axes; fail before compiling."""
  shards = mesh.shape['data'] * mesh.shape['fsdp']
  micro = config.train.micro_batches
  rows = {'train.batch_size': config.train.batch_size,
          'train.batch_size / train.micro_batches': config.train.batch_size // max(micro, 1),
          'data.reward_batch_size x datasets': config.data.reward_batch_size * num_datasets,
          'data.eval_batch_size': config.data.eval_batch_size}
  if micro < 1 or config.train.batch_size % micro:
    raise ValueError(f'train.batch_size={config.train.batch_size} is not divisible by '
                     f'train.micro_batches={micro}.')
  # Each host feeds its own rows; devices that share a batch shard (the tensor axis) must then
  # sit on one host, or they would be fed different rows for what must be one copy.
  for shard in mesh.devices.reshape(-1, mesh.shape['tensor']):
    if len({d.process_index for d in shard}) > 1:
      raise ValueError(f'mesh.tensor={mesh.shape["tensor"]} spans several hosts; keep tensor '
                       f'parallelism within a host (tensor <= devices per host).')
  for key, n in rows.items():
    if n % shards:
      raise ValueError(f'{key} = {n} rows do not split over mesh.data x mesh.fsdp = {shards} '
                       f'devices; make it a multiple of {shards}.')
