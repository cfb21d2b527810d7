"""Reading a run folder's checkpoint back: the trained model of a finished, running or crashed run.

Used by generation, evaluation and export, and by a DoReMi run for its reference run's parameters
(`restore_params`) (training resumes through `mos_jax.training.resume`,
which also restores the loader). Also the checks both share: a workdir is a local path, and a LoRA
checkpoint resumes only onto the base it was trained on.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections

from mos_jax import mixing
from mos_jax.infra import distributed
from mos_jax.infra import sharding
from mos_jax.models import lora
from mos_jax.models.build import build_model
from mos_jax.steps import reference_cache
from mos_jax.steps.state import TrainState, initial_state, make_optimizer, merge
from mos_jax.workdir import checkpoint as checkpoint_lib


def checked_workdir(workdir: str) -> str:
  """`workdir` as an absolute local path (Orbax wants one); a URL is refused."""
  if '://' in workdir:
    raise ValueError(f'--workdir {workdir}: use a filesystem path; metrics, plots and the theta_0 '
                     f'cache use plain file I/O (mount a bucket with gcsfuse, see launch/README.md).')
  return os.path.abspath(workdir)


def check_same_base(saved: dict, config, workdir: str):
  """A LoRA checkpoint holds adapters only: the base re-read from model.hf_checkpoint (or the
  preset and seed) must be the one they were trained on (files, sizes, times, dtypes, quantize)."""
  if lora.enabled(config.model) and saved.get('base') != reference_cache.model_key(config):
    raise ValueError(f'{workdir}: the checkpoint holds LoRA adapters for another base model '
                     f'(model.hf_checkpoint / model.preset / seed / dtypes / model.quantize changed, '
                     f'or its weight files were rewritten). Use the original base, or a new workdir.')


def checkpoints_folder(workdir: str) -> str:
  """`workdir`'s checkpoints/ folder; a workdir without one is refused (before anything loads)."""
  workdir = checked_workdir(workdir)
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'{workdir}: no checkpoints/ folder (train first).')
  return directory


def restore_model(config, workdir: str, vocab_size: int, step: int | None = None):
  """The backbone of `workdir`'s latest checkpoint (or of `step`): (model, step).

  `vocab_size` is the run's tokenizer size (a preset's embedding rows follow it). Reads only the
  train state (not the loader, not the data) and writes nothing, so it works on a finished,
  running or crashed run, with any number of processes.
  """
  directory = checkpoints_folder(workdir)
  workdir = os.path.dirname(directory)
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
    # Only the scorer's shape depends on the dataset sizes; the restored values replace it.
    sizes = [1] * len(config.data.datasets)
    strategy = mixing.make_strategy(config.mixing, list(config.data.datasets.keys()), sizes,
                                    train_steps=config.train.steps)
    graphdef, state, state_shardings, _, frozen = initial_state(
        config, build_model(config, mesh, vocab_size), sizes, mesh, strategy)
    check_same_base(checkpointer.read_meta(step), config, workdir)
    target = sharding.sharded_abstract(state, state_shardings)
    jax.tree.map(lambda x: x.delete(), state)
    state, _ = checkpointer.restore(step, target)
  finally:
    checkpointer.close()
  return merge(graphdef, state.params, frozen), step


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
  """`workdir`/config.json as a ConfigDict ('inf' / 'nan' strings back as floats)."""
  def floats(value):
    if isinstance(value, dict):
      return {k: floats(v) for k, v in value.items()}
    return float(value) if value in ('inf', '-inf', 'nan') else value
  with open(os.path.join(workdir, 'config.json')) as f:
    return ml_collections.ConfigDict(floats(json.load(f)))


def restore_params(workdir: str, step: int, params, param_shardings, mesh):
  """The trained parameters of `workdir`'s checkpoint `step`, on `param_shardings`: another run of
  the model whose parameters `params` has (a pure dict, or their ShapeDtypeStructs). The rest of
  its train state (AdamW, its strategy's state) is only shaped (jax.eval_shape, from its
  config.json) to read the checkpoint: nothing but the parameters is materialised before the read.
  Writes nothing."""
  config = read_run_config(workdir)
  names = list(config.data.datasets.keys())
  sizes = [1] * len(names)  # Only the scorer's shape depends on the sizes; its values are read.
  strategy = mixing.make_strategy(config.mixing, names, sizes, train_steps=config.train.steps)
  replicated = sharding.replicated(mesh)
  abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  optimizer = make_optimizer(config.train)
  opt_shardings = sharding.opt_state_shardings(optimizer, abstract_params, param_shardings, mesh)
  mixing_state = jax.eval_shape(
      lambda: strategy.init_state(config.mixing, sizes, jax.random.key(0)))
  scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
  target = TrainState(
      step=scalar, params=sharding.sharded_abstract(abstract_params, param_shardings),
      opt_state=sharding.sharded_abstract(jax.eval_shape(optimizer.init, abstract_params),
                                          opt_shardings),
      mixing=jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                          mixing_state),
      bad_steps=scalar, skipped_steps=scalar)
  checkpointer = checkpoint_lib.Checkpointer(checkpoints_folder(workdir), async_save=False)
  try:
    state, _ = checkpointer.restore(step, target)
  finally:
    checkpointer.close()
  return state.params
