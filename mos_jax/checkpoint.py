"""Orbax checkpoints of a run: the train state, the Grain loader position and JSON metadata.

Each step folder holds three Composite items:
  state  a pytree of jax arrays (StandardSave); restored onto whatever shardings the abstract target
         carries, which is how a checkpoint moves between meshes;
  data   the loader's `get_state()` via Grain's Orbax handler (one file per process);
  meta   JSON (config, data fingerprints, dataset names) for checks before resuming.
Orbax coordinates the processes; every process calls every method.
"""

from typing import Any

import grain
import orbax.checkpoint as ocp


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
    lands (e.g. from `jax.eval_shape` plus the target mesh's shardings).
    """
    items = {'state': ocp.args.StandardRestore(abstract_state), 'meta': ocp.args.JsonRestore()}
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored['state'], restored['meta']

  def read_meta(self, step: int | None = None) -> dict[str, Any]:
    """The JSON metadata of `step` (default: the latest), without touching the arrays."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError('no checkpoint to read metadata from')
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

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
