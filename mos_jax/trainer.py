"""The training loop: Algorithm 1 of the paper around the pure steps in `mos_jax.steps`.

`build(config, workdir)` makes everything a run needs (mesh, data, model, jitted steps, state,
checkpoints, metrics) and `train(run)` drives it. This is the one place where steps are jitted
with shardings and donation.

A run holds its workdir's lock (`workdir_lock`) from `build` to the end of `train`; it stops
cleanly on SIGTERM/SIGINT (`preemption`: save the current step, exit), never checkpoints a state
whose latest update was non-finite, and resumes from an older checkpoint when the latest cannot
be read only if `train.restore_fallback` says so.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from mos_jax import checkpoint as checkpoint_lib
from mos_jax import compilation_cache
from mos_jax import config as config_lib
from mos_jax import config_check
from mos_jax import console
from mos_jax import distributed
from mos_jax import errors
from mos_jax import metrics as metrics_lib
from mos_jax import mixing
from mos_jax import models
from mos_jax import plots
from mos_jax import preemption
from mos_jax import reference as reference_lib
from mos_jax import report
from mos_jax import sharding
from mos_jax import steps
from mos_jax import workdir_lock
from mos_jax.data import bundle as data_lib
from mos_jax.data import build_data
from mos_jax.data import prefetch
from mos_jax.models import lora
from mos_jax.mixing import signals as signals_lib

log = logging.getLogger(__name__)



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
  state: steps.TrainState
  train_fn: Callable  # (state, batch) -> (state, metrics), jitted, state donated.
  reward_fn: Callable | None  # (params, batch) -> reward outputs, jitted.
  mixing_fn: Callable | None  # (mixing_state, reward outputs) -> (mixing_state, info), jitted.
  eval_fn: Callable  # (params, batch) -> (nll sum, tokens), jitted.
  probs_fn: Callable  # mixing_state -> probabilities [N], jitted.
  reference_tables: dict | None  # theta_0 NLL per example (DIFF with the cache).
  checkpointer: Any
  writer: Any
  start_step: int
  lock: Any = None  # workdir_lock.WorkdirLock held by process 0 until train() ends.
  saved_step: int | None = None  # The newest checkpoint (written or restored), for messages.
  window: list = dataclasses.field(default_factory=list)  # Unlogged step metrics at resume.
  stopped_by: str | None = None  # 'SIGTERM' / 'Ctrl-C (SIGINT)' when a signal stopped train().
  exit_code: int = 0  # What the train command exits with (130 after Ctrl-C).
  frozen: Any = None  # LoRA: the frozen base (pure dict, never donated or saved); None without.
  eval_tasks: Any = None  # mos_jax.evaluation.TrainingTasks, made at the first evaluation.
  train_jit: Any = None  # The jitted (state, batch, frozen) step behind train_fn (to lower it).

  def close(self):
    """Releases the workdir (train() does it; call it when a built run is not trained)."""
    if self.lock is not None:
      self.lock.release()
      self.lock = None


def embedding_rows(model_config, tokenizer_size: int) -> int:
  """Rows of a preset's embedding table: `model.vocab_size`, or (0, or a run config from before
  the key) the tokenizer's size."""
  return model_config.get('vocab_size', 0) or tokenizer_size


def build_model(config, mesh, vocab_size: int):
  """The run's model on `mesh` (None: default device): `model.hf_checkpoint` or the preset with
  `vocab_size` embeddings, with qwix adapters when `model.lora.rank` > 0."""
  m = config.model
  lora.check_config(config)
  options = {'dtype': m.dtype, 'param_dtype': m.param_dtype, 'remat': m.remat,
             'scan_layers': m.scan_layers, 'attention_impl': m.attention_impl or None,
             'loss_chunk': m.loss_chunk}
  if m.hf_checkpoint:
    model = models.load_hf(m.hf_checkpoint, mesh=mesh, **options)
  else:
    rows = embedding_rows(m, vocab_size)
    model = models.init_model(models.get_preset(m.preset, vocab_size=rows, **options),
                              config.seed, mesh=mesh)
  if model.config.vocab_size < vocab_size:
    raise ValueError(f'The tokenizer has {vocab_size} tokens but the model only '
                     f'{model.config.vocab_size} embeddings (model.hf_checkpoint / '
                     f'model.vocab_size).')
  if lora.enabled(m):  # qwix adapters (and a quantized base with model.quantize).
    model = lora.add_adapters(model, m.lora, m.quantize, config.seed)
  return model


def _initial_state(config, model, sizes, mesh, strategy):
  """The train state at step 0 on its shardings: parameters, AdamW, the strategy's start.

  With LoRA the state's params are the adapters; the frozen base comes back separately (pure
  dict, as loaded: on the rule table's shardings), else as None.
  """
  if lora.enabled(config.model):
    graphdef, param_state, frozen_state = nnx.split(model, nnx.LoRAParam, ...)
    frozen = nnx.to_pure_dict(frozen_state)  # A quantized base's arrays land on the rule table too.
    frozen = jax.device_put(frozen, lora.frozen_shardings(model.config, frozen, mesh))
  else:
    (graphdef, param_state), frozen = nnx.split(model, nnx.Param), None
  param_shardings = nnx.to_pure_dict(sharding.state_shardings(param_state, mesh))
  params = jax.device_put(nnx.to_pure_dict(param_state), param_shardings)
  replicated = sharding.replicated(mesh)
  with jax.set_mesh(mesh):
    optimizer = steps.make_optimizer(config.train)
    opt_shardings = sharding.opt_state_shardings(optimizer, params, param_shardings, mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
    mixing_state = jax.device_put(
        strategy.init_state(config.mixing, sizes, jax.random.key(config.seed + 1)),
        replicated)
  zero = lambda: jax.device_put(jnp.zeros((), jnp.int32), replicated)  # Distinct buffers:
  state = steps.TrainState(step=zero(), params=params, opt_state=opt_state,  # all are donated.
                           mixing=mixing_state, bad_steps=zero(), skipped_steps=zero())
  state_shardings = steps.TrainState(
      step=replicated, params=param_shardings, opt_state=opt_shardings,
      mixing=jax.tree.map(lambda _: replicated, mixing_state), bad_steps=replicated,
      skipped_steps=replicated)
  return graphdef, state, state_shardings, optimizer, frozen


def _mixing_functions(config, strategy, graphdef, initial_params, param_shardings, mesh, data,
                      workdir, is_main, frozen=None):
  """The jitted reward step (the strategy's signals) and update, and the theta_0 NLL tables.

  theta_0 is the initial model: a resumed run rebuilds it the same way before restoring.
  """
  replicated = sharding.replicated(mesh)
  reference = config.mixing.diff_reference  # 'cache', 'device' or 'base' (config_check).
  reference_params = reference_tables = None
  if strategy.needs_reference and reference == 'device':
    ref_dtype = jnp.dtype(config.mixing.reference_dtype)
    reference_params = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(ref_dtype), p),
                               out_shardings=param_shardings)(initial_params)
  grad_mask = None
  if 'grad_cos' in strategy.signals:
    grad_mask = signals_lib.gradient_mask(initial_params, config.mixing.grad_params)
  reward_step = jax.jit(
      functools.partial(signals_lib.signal_step, graphdef=graphdef, num_datasets=len(data.names),
                        signals=strategy.signals, grad_mask=grad_mask,
                        micro_rows=config.data.reward_micro_batch,
                        base_reference=strategy.needs_reference and reference == 'base'),
      in_shardings=(param_shardings, param_shardings if reference_params is not None else None,
                    None, None), out_shardings=replicated)
  reward_fn = lambda params, batches: reward_step(params, reference_params, batches, frozen)
  mixing_fn = jax.jit(strategy.make_update(config.mixing), out_shardings=replicated)
  if strategy.needs_reference and reference == 'cache':
    nll_step = jax.jit(functools.partial(steps.reference_nll_step, graphdef=graphdef,
                                         micro_rows=config.data.reward_micro_batch),
                       in_shardings=(param_shardings, None, None), out_shardings=replicated)
    with jax.set_mesh(mesh):
      reference_tables = reference_lib.load_or_compute(
          os.path.join(workdir, 'reference_nll'), data, reference_lib.model_key(config),
          lambda batch: nll_step(initial_params, batch, frozen),
          functools.partial(distributed.host_local_to_global, mesh=mesh),
          batch_size=config.data.eval_batch_size, write=is_main)
  return reward_fn, mixing_fn, reference_tables


def _checked_workdir(workdir: str) -> str:
  if '://' in workdir:
    raise ValueError(f'--workdir {workdir}: use a filesystem path; metrics, plots and the theta_0 '
                     f'cache use plain file I/O (mount a bucket with gcsfuse, see launch/README.md).')
  return os.path.abspath(workdir)  # Orbax wants absolute paths.


def restore_model(config, workdir: str, step: int | None = None):
  """The backbone of `workdir`'s latest checkpoint (or of `step`): (model, step, tokenizer folder).

  Reads only the train state (not the loader, not the data) and writes nothing, so it works on a
  finished, running or crashed run, with any number of processes.
  """
  workdir = _checked_workdir(workdir)
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'{workdir}: no checkpoints/ folder (train first).')
  distributed.initialize()
  mesh = sharding.make_mesh(config.mesh)
  checkpointer = checkpoint_lib.Checkpointer(directory, keep=config.train.keep_checkpoints,
                                             async_save=False)
  try:
    if step is None:
      step = checkpointer.latest_step()
      if step is None:
        raise FileNotFoundError(f'{directory}: no checkpoint (train first).')
    elif step not in checkpointer.all_steps():
      raise FileNotFoundError(f'{directory}: no checkpoint of step {step}; saved steps: '
                              f'{checkpointer.all_steps()}.')
    tokenizer_dir = data_lib.tokenizer_path(config)
    vocab_size = len(data_lib.load_tokenizer(tokenizer_dir))
    # Only the scorer's shape depends on the dataset sizes; the restored values replace it.
    sizes = [1] * len(config.data.datasets)
    strategy = mixing.make_strategy(config.mixing, list(config.data.datasets.keys()), sizes)
    graphdef, state, state_shardings, _, frozen = _initial_state(
        config, build_model(config, mesh, vocab_size), sizes, mesh, strategy)
    _check_same_base(checkpointer.read_meta(step), config, workdir)
    target = sharding.sharded_abstract(state, state_shardings)
    jax.tree.map(lambda x: x.delete(), state)
    state, _ = checkpointer.restore(step, target)
  finally:
    checkpointer.close()
  return steps.merge(graphdef, state.params, frozen), step, tokenizer_dir


def build(config, workdir: str) -> Run:
  """Everything a run needs; resumes from the latest checkpoint in `workdir` if there is one.

  The config is checked before anything is read or written; a workdir in use by another run is
  refused (WorkdirInUse). From here until `train` returns (or `Run.close`), the run holds the lock.
  """
  config_check.validate(config)
  workdir = _checked_workdir(workdir)
  distributed.initialize()
  compilation_cache.enable(config.train.compilation_cache)
  is_main = distributed.is_main_process()
  lock = workdir_lock.WorkdirLock(workdir).acquire() if is_main else None
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
  return run


def _build(config, workdir: str, is_main: bool) -> Run:
  mesh = sharding.make_mesh(config.mesh)
  data = build_data(config, process_index=jax.process_index(),
                    process_count=jax.process_count())
  if config.train.get('epochs', 0) > 0:  # Passes over the data: the sizes are known only now.
    rows = sum(data.train.rows_per_epoch())  # Packed rows hold several examples each.
    config.train.steps = math.ceil(config.train.epochs * rows / config.train.batch_size)
  names = data.names
  num_datasets = len(names)
  _check_batch_sizes(config, num_datasets, mesh)
  strategy = mixing.make_strategy(config.mixing, names, data.sizes)

  # The model is built outside the mesh context: its params carry logical names, which
  # init_model/load_hf map to mesh axes themselves.
  graphdef, state, state_shardings, optimizer, frozen = _initial_state(
      config, build_model(config, mesh, len(data.tokenizer)), data.sizes, mesh, strategy)
  param_shardings, replicated = state_shardings.params, sharding.replicated(mesh)

  # LoRA dropout (training forwards only) draws its masks from (seed, step).
  dropout_seed = (config.seed if lora.enabled(config.model) and config.model.lora.dropout > 0
                  else None)
  train_step = functools.partial(steps.train_step, graphdef=graphdef, optimizer=optimizer,
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
  eval_step = jax.jit(functools.partial(steps.eval_step, graphdef=graphdef),
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
  start_step, window = 0, []
  meta = {'names': names, 'fingerprints': {n: data.fingerprint(n) for n in names},
          'loader': _loader_identity(config), 'config': json.loads(config_lib.config_to_json(config))}
  if lora.enabled(config.model):  # Adapters resume only onto the base they were trained on.
    meta['base'] = reference_lib.model_key(config)
  if checkpointer.latest_step() is not None:
    try:
      state, start_step, window = _resume(config, checkpointer, state, state_shardings, data,
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


def _resume(config, checkpointer, state, state_shardings, data, meta, workdir, is_main):
  """(state, step, unlogged window metrics) of the newest readable checkpoint.

  An unreadable latest checkpoint stops the run, naming the file, unless
  `train.restore_fallback`: then it is set aside (moved, not deleted) and the next older one is
  tried. A checkpoint of other data or loader settings is refused either way.
  """
  target = sharding.sharded_abstract(state, state_shardings)
  jax.tree.map(lambda x: x.delete(), state)  # Free the fresh state before the saved one lands.
  while (latest := checkpointer.latest_step()) is not None:
    try:
      saved = checkpointer.read_meta(latest)
      _check_same_data(saved, meta, workdir)
      _check_same_base(saved, config, workdir)
      state, saved_meta = checkpointer.restore(latest, target, data.train)
    except checkpoint_lib.CheckpointUnreadable as e:
      older = [s for s in checkpointer.all_steps() if s < latest]
      if not config.train.restore_fallback:
        advice = (f'Older checkpoints ({", ".join(map(str, older))}) may be intact: run again with '
                  f'--config.train.restore_fallback=True to set this one aside and resume from '
                  f'the newest readable one.' if older else
                  'There is no older checkpoint: move it away to start again, or use a new '
                  'workdir.')
        raise checkpoint_lib.CheckpointUnreadable(e.directory, e.step, f'{e.detail}. {advice}'
                                                  ) from e
      aside = checkpointer.set_aside(latest) if is_main else 'checkpoints.unreadable/'
      if jax.process_count() > 1:  # The others look again once process 0 has moved it.
        multihost_utils.sync_global_devices(f'set aside checkpoint {latest}')
        checkpointer.reload()
      log.warning('Checkpoint %d cannot be read (%s); moved it to %s and trying %s.', latest,
                  e.detail, aside, f'checkpoint {older[-1]}' if older else 'a fresh start')
      continue
    if int(state.step) != latest:
      raise ValueError(f'{workdir}: checkpoint {latest} holds the state of step {int(state.step)}.')
    console.say(f'Resumed from {os.path.join(workdir, "checkpoints")} at step {latest}.')
    return state, latest, _window_from_json(saved_meta.get('window', []))
  raise errors.UserError(f'{workdir}: no checkpoint could be read; they were moved to '
                         f'{checkpointer.directory.rstrip("/")}.unreadable/. Run again to start '
                         f'from step 0, or use a new workdir.')


def _window_from_json(pending: list) -> list:
  return [{k: np.asarray(value, dtype) for k, (dtype, value) in m.items()} for m in pending]


def _stack_reward_batches(batches: dict, names) -> dict:
  """One batch from every dataset as [b * N] rows, example-major, so that host-local blocks
  concatenate into a global [b, N] layout on any number of hosts."""
  first = batches[names[0]]
  return {k: np.stack([batches[n][k] for n in names], axis=1).reshape(
      (-1,) + first[k].shape[1:]) for k in first}


def evaluate(run: Run) -> dict[str, float]:
  """Token-weighted dev loss per dataset (datasets without dev examples are left out)."""
  out = {}
  limit = run.config.train.eval_batches
  for name in run.data.names:
    sums = []
    for i, batch in enumerate(run.data.dev_batches(name)):
      if limit and i >= limit:
        break
      sums.append(run.eval_fn(run.state.params,
                              distributed.host_local_to_global(batch, run.mesh)))
    nll_sum, tokens = np.sum(jax.device_get(sums), axis=0) if sums else (0.0, 0.0)
    if tokens > 0:
      out[f'eval/{name}/loss'] = float(nll_sum / tokens)
  if run.config.train.get('eval_tasks'):  # Skills exact match, lm-eval tasks (evaluation.py).
    if run.eval_tasks is None:
      from mos_jax import evaluation  # pylint: disable=g-import-not-at-top
      run.eval_tasks = evaluation.TrainingTasks(run)
    out.update(run.eval_tasks())
  return out


def update_mixture(run: Run) -> dict[str, float]:
  """Algorithm 1 lines 6-11: the strategy's signals from one batch of every dataset (train reward
  batches and/or dev batches, as its signals need), then its update."""
  names = run.data.names
  batches = {}
  needed = signals_lib.batches_needed(run.strategy.signals)
  if 'train' in needed:
    batch = _stack_reward_batches(run.data.train.reward_batches(), names)
    if run.reference_tables is not None:
      batch['nll0'] = reference_lib.lookup(run.reference_tables, names, batch)
    batches['train'] = distributed.host_local_to_global(batch, run.mesh)
  if 'dev' in needed:  # Dev windows are indexed by the update, so a resumed run gets the same.
    window = run.data.train.step // run.config.mixing.update_every
    dev = {n: run.data.dev_window(n, window, run.config.data.reward_batch_size) for n in names}
    batches['dev'] = distributed.host_local_to_global(_stack_reward_batches(dev, names), run.mesh)
  reward_out = run.reward_fn(run.state.params, batches)
  new_mixing, info = run.mixing_fn(run.state.mixing, reward_out)
  run.state = run.state.replace(mixing=new_mixing)
  info = jax.device_get(info)
  out = {}
  for i, name in enumerate(names):
    out[f'reward/{name}'] = float(info['reward'][i])
    out[f'reward_raw/{name}'] = float(info['raw_reward'][i])
  return out


def current_probs(run: Run) -> np.ndarray:
  return np.asarray(jax.device_get(run.probs_fn(run.state.mixing)), np.float64)


class _Window:
  """Train metrics gathered on the host between two metrics lines (token-weighted).

  Non-finite (skipped) steps are left out of the losses; their count is logged separately.
  """

  def __init__(self, names, train_config, first_step, feed, check, pending=()):
    self.names, self.train_config, self.feed, self.check = names, train_config, feed, check
    self.pending = list(pending)  # Restored from a checkpoint written between two log steps.
    self.start, self.first_step = time.perf_counter(), first_step
    self.waited = feed.wait_s  # The loop's total wait for batches at the window's start.

  def add(self, metrics):
    self.pending.append(metrics)

  def to_json(self) -> list:
    """The unlogged steps' metrics, for a checkpoint saved between two log steps (exact types)."""
    return [{k: [str(v.dtype), v.tolist()] for k, v in m.items()}
            for m in jax.device_get(self.pending)]

  def pause(self, seconds: float):
    """Leaves time spent on evaluation and checkpoints out of the step timings."""
    self.start += seconds

  def flush(self, step: int, skipped_steps: int) -> dict[str, float]:
    pending = jax.device_get(self.pending)  # Metrics are read here only: the device never waits.
    for m in pending:
      self.check(m)
    got = [m for m in pending if m['finite']]
    elapsed, steps_done = time.perf_counter() - self.start, max(1, step - self.first_step)
    waited, self.waited = self.feed.wait_s - self.waited, self.feed.wait_s
    self.pending, self.start, self.first_step = [], time.perf_counter(), step
    tokens = sum(float(m['tokens']) for m in got)
    ds_nll = sum((m['dataset_nll'] for m in got), np.zeros(len(self.names)))
    ds_tokens = sum((m['dataset_tokens'] for m in got), np.zeros(len(self.names)))
    out = {'train/loss': float(ds_nll.sum() / tokens) if tokens else float('nan'),
           'train/grad_norm': float(np.mean([m['grad_norm'] for m in got])) if got else float('nan'),
           'train/tokens': tokens,
           # Skipped updates do not advance optax's count: step s used count s - 1 - skipped.
           'train/lr': steps.learning_rate(self.train_config, step - 1 - skipped_steps),
           'train/skipped_steps': skipped_steps,
           'perf/tokens_per_s': tokens / max(elapsed, 1e-9),
           'perf/real_token_fraction': (sum(float(m['real_tokens']) for m in got)
                                        / max(sum(float(m['positions']) for m in got), 1.0)),
           'perf/real_tokens_per_s': (sum(float(m['real_tokens']) for m in got)
                                      / max(elapsed, 1e-9)),
           'perf/data_wait_fraction': waited / max(elapsed, 1e-9),
           'perf/step_s': elapsed / steps_done}
    for i, name in enumerate(self.names):
      if ds_tokens[i] > 0:
        out[f'train/loss/{name}'] = float(ds_nll[i] / ds_tokens[i])
    return out


def train(run: Run) -> dict:
  """Runs from `run.start_step` to `config.train.steps`; returns the summary (on process 0).

  A SIGTERM or SIGINT ends it early after saving the current step: then `run.stopped_by` names
  the signal, `run.exit_code` is 0 (SIGTERM) or 130 (SIGINT) and the summary is empty.
  """
  stop = preemption.StopSignals().install()
  with jax.set_mesh(run.mesh):  # Activation sharding constraints need the mesh when tracing.
    try:
      return _train_loop(run, stop)
    finally:
      stop.restore()
      run.data.close()
      run.close()


def _train_loop(run: Run, stop: preemption.StopSignals) -> dict:
  config, data, names = run.config, run.data, run.data.names
  tc = config.train
  is_main = distributed.is_main_process()
  data.train.set_probabilities(current_probs(run))

  progress = None
  if is_main and tc.progress_bar:
    from tqdm.auto import tqdm
    progress = tqdm(total=tc.steps, initial=run.start_step, dynamic_ncols=True, desc='train')
  say = (progress.write if progress is not None else print) if is_main else (lambda _: None)

  if run.start_step == 0:
    first = evaluate(run)
    say(_eval_text(0, first, names))
    run.writer.write(0, {**first, **_mixture_metrics(current_probs(run), names)})

  updates_after = lambda step: (run.strategy.updates_scorer
                                 and (step - 1) % config.mixing.update_every == 0)
  # The draw after a step that moves the mixture must use the new one: the prefetcher holds there.
  moves_after = lambda step: run.strategy.per_step or updates_after(step)
  feed = prefetch.Prefetcher(data.train, functools.partial(distributed.host_local_to_global,
                                                           mesh=run.mesh),
                             run.start_step + 1, tc.steps, config.data.prefetch, moves_after)
  window = _Window(names, tc, run.start_step, feed, functools.partial(_check_finite, run),
                   run.window)
  try:
    for step in range(run.start_step + 1, tc.steps + 1):
      run.state, metrics = run.train_fn(run.state, feed.next(step))
      window.add(metrics)
      if run.strategy.per_step:  # It moved the mixture inside the train step (e.g. ODM).
        data.train.set_probabilities(current_probs(run))

      line = {}
      # Algorithm 1 counts t = 0..T and updates psi after the theta update when t % S == 0; our
      # step is t + 1, so the scorer moves after steps 1, S + 1, 2S + 1, ...
      if updates_after(step):
        line.update(update_mixture(run))
        data.train.set_probabilities(current_probs(run))
      if moves_after(step):
        feed.resume()
      last = step == tc.steps
      checkpoint_now = (tc.checkpoint_every and step % tc.checkpoint_every == 0) or last
      # Windows also restart at checkpoints, so a resumed run logs what an uninterrupted one does.
      if step % tc.log_every == 0 or checkpoint_now:
        line.update(window.flush(step, int(jax.device_get(run.state.skipped_steps))))
        line.update(_step_rewards(run))
      paused = time.perf_counter()
      if (tc.eval_every and step % tc.eval_every == 0) or last:
        dev = evaluate(run)
        say(_eval_text(step, dev, names))
        line.update(dev)
      if checkpoint_now:
        _save(run, step, feed, run.meta, say)  # The loader position of step + 1.
      window.pause(time.perf_counter() - paused)
      if line:
        line.update(_mixture_metrics(current_probs(run), names))  # Every line has the mixture.
        run.writer.write(step, line)
        if progress is not None and 'train/loss' in line:
          progress.set_postfix_str(_progress_text(line, names))
      if progress is not None:
        progress.update(1)
      if not last and stop.at(step):
        # The window's unlogged steps travel in the checkpoint, so the resumed run logs exactly
        # what an uninterrupted one does.
        saved = _save(run, step, feed, {**run.meta, 'window': window.to_json()}, say)
        run.checkpointer.wait()  # Durable before the process exits.
        run.stopped_by, run.exit_code = stop.name, stop.exit_code
        break
  finally:
    feed.close()
    if progress is not None:
      progress.close()
    run.checkpointer.wait()
    run.writer.close()
  run.checkpointer.close()
  if run.stopped_by:
    where = (f'saved step {step} in {run.checkpointer.directory}' if saved else
             f'the last good checkpoint is step {run.saved_step}' if run.saved_step else
             'no checkpoint was written')
    say(f'Stopped by {run.stopped_by} after step {step}; {where}. Run the same command to '
        f'resume.')
    return {}
  if not is_main:  # Only process 0 has the metrics file.
    return {}
  summary = report.summarize(os.path.join(run.workdir, 'metrics.jsonl'), names)
  plots.write_plots(run.workdir)
  print(report.format_summary(summary))
  return summary


def _loader_identity(config) -> dict:
  """Settings that decide which batches the loader yields (besides the data itself). Not the
  process count nor Grain workers: global batches are the same for any of them."""
  d = config.data
  return {'seed': config.seed, 'batch_size': config.train.batch_size,
          'reward_batch_size': d.reward_batch_size, 'max_len': d.max_len, 'packing': d.packing,
          'buckets': list(d.buckets), 'mix_per': d.mix_per}


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


def _check_same_data(saved: dict, current: dict, workdir: str):
  """A checkpoint resumes only onto the datasets it was trained on (the loader state and the
  scorer are per dataset)."""
  if saved.get('names') != current['names']:
    raise ValueError(f'{workdir}: the checkpoint was trained on datasets {saved.get("names")}, '
                     f'the config has {current["names"]}. Use the same datasets or a new workdir.')
  changed = {k: (saved.get('loader', {}).get(k), v) for k, v in current['loader'].items()
             if saved.get('loader', {}).get(k) != v}
  if changed:
    raise ValueError(f'{workdir}: these settings changed since the checkpoint (saved, now): '
                     f'{changed}; the loader cannot resume where it stopped with them. Restore '
                     f'them, or use a new workdir.')
  for name, fingerprint in current['fingerprints'].items():
    if saved.get('fingerprints', {}).get(name) != fingerprint:
      raise ValueError(f'{workdir}: dataset {name!r} changed since the checkpoint (its tokenized '
                       f'data or data settings differ), so the loader cannot resume where it '
                       f'stopped. Restore the data and settings, or use a new workdir.')


def _check_same_base(saved: dict, config, workdir: str):
  """A LoRA checkpoint holds adapters only: the base re-read from model.hf_checkpoint (or the
  preset and seed) must be the one they were trained on (files, sizes, times, dtypes, quantize)."""
  if lora.enabled(config.model) and saved.get('base') != reference_lib.model_key(config):
    raise ValueError(f'{workdir}: the checkpoint holds LoRA adapters for another base model '
                     f'(model.hf_checkpoint / model.preset / seed / dtypes / model.quantize changed, '
                     f'or its weight files were rewritten). Use the original base, or a new workdir.')


def _save(run: Run, step: int, loader, meta: dict, say) -> bool:
  """Starts a checkpoint of `step` unless the latest update was non-finite (then the state is
  the last good one, but resuming from it would repeat the streak's start: keep the older one)."""
  if int(jax.device_get(run.state.bad_steps)):
    say(f'warning: step {step} is not checkpointed: its update was non-finite (skipped).')
    return False
  run.checkpointer.save(step, run.state, loader, meta)
  run.saved_step = step
  return True


def _check_finite(run: Run, metrics):
  bad = int(jax.device_get(metrics['bad_steps']))
  if bad >= run.config.train.max_bad_steps:
    where = (f'The last good checkpoint is step {run.saved_step} ({run.checkpointer.directory}): '
             f'run the same command with a lower --config.train.lr to resume from it.'
             if run.saved_step else 'No checkpoint was written: start again with a lower '
             '--config.train.lr.')
    raise TrainingError(
        f'{bad} non-finite updates in a row (loss or gradient is NaN/inf); stopping (those updates '
        f'were skipped and no checkpoint was written during them). {where} Also check the data, '
        f'or raise train.max_bad_steps.')


def _step_rewards(run: Run) -> dict[str, float]:
  """reward/<name> of a strategy that updates every step (none for the others)."""
  reward = run.strategy.step_rewards(run.state.mixing)
  if reward is None:
    return {}
  return {f'reward/{n}': float(r) for n, r in zip(run.data.names, jax.device_get(reward))}


def _mixture_metrics(probs, names):
  return {f'mixture/{n}': float(p) for n, p in zip(names, probs)}


def _eval_text(step, dev, names):
  losses = ' '.join(f'{n}={dev[f"eval/{n}/loss"]:.3f}' for n in names if f'eval/{n}/loss' in dev)
  return f'step {step}: dev loss {losses}'


def _progress_text(line, names):
  mix = ' '.join(f'{n[:6]}={line[f"mixture/{n}"]:.2f}' for n in names)
  return f'loss={line["train/loss"]:.3f} tok/s={line["perf/tokens_per_s"]:.0f} {mix}'
