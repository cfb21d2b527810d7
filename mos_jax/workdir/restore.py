"""Reading a run folder's checkpoint back: the trained model of a finished, running or crashed run.

Used by generation, evaluation and export (training resumes through `mos_jax.training.resume`,
which also restores the loader). Also the checks both share: a workdir is a local path, and a LoRA
checkpoint resumes only onto the base it was trained on.
"""

from __future__ import annotations

import os

import jax

from mos_jax import mixing
from mos_jax.infra import distributed
from mos_jax.infra import sharding
from mos_jax.models import lora
from mos_jax.models.build import build_model
from mos_jax.steps import reference_cache
from mos_jax.steps.state import initial_state, merge
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
    strategy = mixing.make_strategy(config.mixing, list(config.data.datasets.keys()), sizes)
    graphdef, state, state_shardings, _, frozen = initial_state(
        config, build_model(config, mesh, vocab_size), sizes, mesh, strategy)
    check_same_base(checkpointer.read_meta(step), config, workdir)
    target = sharding.sharded_abstract(state, state_shardings)
    jax.tree.map(lambda x: x.delete(), state)
    state, _ = checkpointer.restore(step, target)
  finally:
    checkpointer.close()
  return merge(graphdef, state.params, frozen), step
