"""Resuming a run from its newest readable checkpoint: state, loader position, unlogged metrics.

A checkpoint resumes only onto the data, loader settings and (LoRA) base it was trained on; an
unreadable latest checkpoint stops the run, naming the file, unless `train.restore_fallback`.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from mos_jax.infra import console
from mos_jax.infra import errors
from mos_jax.infra import sharding
from mos_jax.workdir import checkpoint as checkpoint_lib
from mos_jax.workdir.restore import check_same_base

log = logging.getLogger(__name__)


def resume(config, checkpointer, state, state_shardings, data, meta, workdir, is_main):
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
      check_same_data(saved, meta, workdir)
      check_same_base(saved, config, workdir)
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
    return state, latest, window_from_json(saved_meta.get('window', []))
  raise errors.UserError(f'{workdir}: no checkpoint could be read; they were moved to '
                         f'{checkpointer.directory.rstrip("/")}.unreadable/. Run again to start '
                         f'from step 0, or use a new workdir.')


def window_from_json(pending: list) -> list:
  return [{k: np.asarray(value, dtype) for k, (dtype, value) in m.items()} for m in pending]


def check_same_data(saved: dict, current: dict, workdir: str):
  """A checkpoint resumes only onto the datasets it was trained on (the loader state and the
  scorer are per dataset)."""
  if saved.get('names') != current['names']:
    raise ValueError(f'{workdir}: the checkpoint was trained on datasets {saved.get("names")}, '
                     f'the config has {current["names"]}. Use the same datasets or a new workdir.')
  saved_loader = saved.get('loader', {})
  if 'unit' not in saved_loader:  # Written before mixing.unit: its probabilities counted rows.
    unit = current['loader'].get('unit', 'row')
    if unit != 'row' and (saved_loader.get('packing') or unit == 'token'):
      raise errors.UserError(
          f'{workdir}: this checkpoint was written before mixing.unit existed, when a mixture '
          f'probability meant a share of packed rows, not of {unit}s; resuming it with '
          f'mixing.unit={unit!r} would change what its mixture means mid-run. Resume it with '
          f'--config.mixing.unit=row (exactly the run it was), or start a new workdir.')
    saved_loader = dict(saved_loader, unit=unit)  # Unpacked rows: one example each, same draws.
  saved_loader = {'draws': 'random', **saved_loader}  # Before data.draws, every draw was random.
  changed = {k: (saved_loader.get(k), v) for k, v in current['loader'].items()
             if saved_loader.get(k) != v}
  if changed:
    raise ValueError(f'{workdir}: these settings changed since the checkpoint (saved, now): '
                     f'{changed}; the loader cannot resume where it stopped with them. Restore '
                     f'them, or use a new workdir.')
  saved_entries = saved.get('config', {}).get('data', {}).get('datasets', {})
  for name, fingerprint in current['fingerprints'].items():
    if saved.get('fingerprints', {}).get(name) != fingerprint:
      entry = saved_entries.get(name, {})
      # A checkpoint from before test splits: holding one out of the train file changed it.
      hint = (f' The checkpoint predates test splits: resume it with '
              f'--config.data.datasets.{name}.test_examples=0 (no test split), or use a new '
              f'workdir.' if entry and 'test_examples' not in entry else
              ' Restore the data and settings, or use a new workdir.')
      raise ValueError(f'{workdir}: dataset {name!r} changed since the checkpoint (its tokenized '
                       f'data or data settings differ), so the loader cannot resume where it '
                       f'stopped.{hint}')
