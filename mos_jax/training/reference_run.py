"""DoReMi's reference model in a run: another finished run's final parameters, frozen beside theta.

The config checks (config/other_runs.py) have already refused a reference folder that is not a
finished run of the same dataset names and model. Once this run's data is read, `check_data`
refuses a reference that trained on other data: the data fingerprints its final checkpoint records
(a hash of each dataset's tokenized training examples and the settings that shaped them) must be
this run's. `load_params` then restores its parameters onto this run's parameter shardings: one
more copy of the trained parameters on device, like diff_reference='device' keeps theta_0.
"""

from __future__ import annotations

from mos_jax.config import other_runs
from mos_jax.workdir import checkpoint as checkpoint_lib
from mos_jax.workdir import restore


def _final_step(folder: str) -> int:
  return int(restore.read_run_config(folder).train.steps)


def check_data(config, strategy, data) -> None:
  """Refuses (ValueError, one line) a reference run whose training data is not this run's, or
  (LoRA) whose adapters were trained on another base."""
  folder = strategy.reference_run
  if not folder:
    return
  step = _final_step(folder)
  checkpointer = checkpoint_lib.Checkpointer(restore.checkpoints_folder(folder), async_save=False)
  try:
    meta = checkpointer.read_meta(step)
  finally:
    checkpointer.close()
  restore.check_same_base(meta, config, folder)
  recorded = meta.get('fingerprints', {})
  differ = [n for n in data.names if recorded.get(n) != data.fingerprint(n)]
  if differ:
    raise ValueError(f'mixing.doremi.reference={folder!r} trained on other data: the training '
                     f'examples of {differ} (or the settings that tokenized them) differ from this '
                     f'run\'s (data fingerprints in {other_runs.final_checkpoint(folder, step)}); '
                     f'the reference must be a run of the same data.')


def load_params(strategy, params, param_shardings, mesh):
  """The reference run's final parameters on `param_shardings` (None without a reference run)."""
  folder = strategy.reference_run
  if not folder:
    return None
  return restore.restore_params(folder, _final_step(folder), params, param_shardings, mesh)
