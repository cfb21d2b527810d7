"""Orbax checkpoints of a run: the train state, the Grain loader position and JSON metadata.

Each step folder holds three Composite items:
  state  a pytree of jax arrays (StandardSave); restored onto whatever shardings the abstract target
         carries, which is how a checkpoint moves between meshes;
  data   the loader's `get_state()` via Grain's Orbax handler (one file per process);
  meta   JSON (config, data fingerprints, dataset names) for checks before resuming.
Orbax coordinates the processes; every process calls every method.

A checkpoint that cannot be read (a truncated or missing file) raises `CheckpointUnreadable`,
which names the step and the failing file; `set_aside(step)` moves it out of the way (into
`checkpoints.unreadable/`, never deleted) so that an older one can be restored.
"""

import json
import os
import re
import shutil
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from mos_jax.infra import errors


class CheckpointUnreadable(errors.UserError):
  """A checkpoint's files cannot be read back."""

  def __init__(self, directory: str, step: int, detail: str):
    self.directory, self.step, self.detail = directory, step, detail
    super().__init__(f'checkpoint {step} in {directory} cannot be read: {detail}')


def _failure_detail(exc: BaseException) -> str:
  """The most specific line of an exception chain: the innermost message naming a file."""
  chain, seen = [], set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    chain.append(exc)
    exc = exc.__cause__ or exc.__context__
  lines = [f'{type(e).__name__}: {line.strip()}' for e in reversed(chain)
           for line in str(e).splitlines()[:1] if line.strip()]
  named = [line for line in lines if re.search(r'(/[^\s"\']+)', line)]
  detail = (named or lines or ['unknown error'])[0]
  return detail if len(detail) < 400 else detail[:400] + '...'


class Checkpointer:
  """A CheckpointManager keeping the newest `keep` steps, optionally saving in the background."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iterator: Any, meta: dict[str, Any]) -> bool:
    """Starts saving `step` (returns at once when async); False if a checkpoint of it exists.

    The loader state is read now, so the iterator may advance while the arrays are written.
    `data_iterator=None` saves no loader position (restore must then pass None too).
    """
    if step in self._manager.all_steps():
      return False
    items = {'state': ocp.args.StandardSave(state), 'meta': ocp.args.JsonSave(meta)}
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
    return self._manager.save(step, args=ocp.args.Composite(**items))

  def restore(self, step: int, abstract_state: Any,
              data_iterator: Any = None) -> tuple[Any, dict[str, Any]]:
    """Returns (state, meta) of `step` and moves `data_iterator` (if given) to the saved position.

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct` whose `.sharding` says where each array
    lands (e.g. from `jax.eval_shape` plus the target mesh's shardings). Raises
    CheckpointUnreadable when its files cannot be read.
    """
    items = {'state': ocp.args.StandardRestore(abstract_state), 'meta': ocp.args.JsonRestore()}
    written_by = self._loader_file(step)
    if data_iterator is not None and written_by is None:
      items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._read(step, items)
    if data_iterator is not None and written_by is not None:
      # Written by another number of processes. Every process saved the same position (global
      # rows taken per stream), so process 0's file serves any process count.
      with open(written_by) as f:
        data_iterator.set_state(json.load(f))
    return restored['state'], restored['meta']

  def _loader_file(self, step: int) -> str | None:
    """Process 0's loader file of `step` when this process's own is missing (the checkpoint was
    written by another number of processes), else None."""
    folder = os.path.join(self.directory, str(step), 'data')
    index, count = jax.process_index(), jax.process_count()
    if not os.path.isdir(folder) or os.path.exists(
        os.path.join(folder, f'process_{index}-of-{count}.json')):
      return None
    first = sorted(f for f in os.listdir(folder) if f.startswith('process_0-of-'))
    return os.path.join(folder, first[0]) if first else None

  def read_meta(self, step: int | None = None) -> dict[str, Any]:
    """The JSON metadata of `step` (default: the latest), without touching the arrays."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError('no checkpoint to read metadata from')
    return self._read(step, {'meta': ocp.args.JsonRestore()})['meta']

  def _read(self, step: int, items: dict) -> Any:
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointUnreadable(self.directory, step, _failure_detail(e)) from e
    if restored.get('meta') is None:
      raise CheckpointUnreadable(self.directory, step, 'its meta/metadata file is missing')
    return restored

  def describe_latest(self) -> str:
    """'the last checkpoint is step M in DIR' from the folder itself: only finished saves count
    (Orbax writes a step into a temporary folder and renames it when complete)."""
    steps = [int(n) for n in os.listdir(self.directory) if n.isdigit()]
    if not steps:
      return f'no checkpoint was written yet in {self.directory}'
    return f'the last checkpoint is step {max(steps)} in {self.directory}'

  @property
  def directory(self) -> str:
    return str(self._manager.directory)

  def reload(self) -> None:
    """Looks at the folder again (after another process changed it)."""
    self._manager.reload()

  def set_aside(self, step: int) -> str:
    """Moves checkpoint `step` to `<directory>.unreadable/<step>`; returns where it went."""
    self.wait()
    aside = self.directory.rstrip('/') + '.unreadable'
    os.makedirs(aside, exist_ok=True)
    target = os.path.join(aside, str(step))
    while os.path.exists(target):
      target += '_'
    shutil.move(os.path.join(self.directory, str(step)), target)
    self._manager.reload()
    return target

  def wait(self) -> None:
    """Blocks until a background save has finished (call before exiting or reading it back)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
