"""Mixture replay (beyond the paper): follow the mixture that another run logged.

`mixing.strategy=replay` with `mixing.replay.run=DIR` reads p over units (`mixture/<name>`) from
DIR/metrics.jsonl, step by step, rescaled to this run's length T: the line the source logged at its
step k holds the p its step k + 1 drew with, so after step s this run draws with the p of the
source's latest line at or before step floor(s * T_src / T) (T_src: the source's train.steps);
p is piecewise constant between logged lines (before the first one, the first one's p).
`mixing.strategy=static` with `mixing.static.from_run=DIR` holds DIR's last logged p.

Neither declares a signal, so neither runs a reward pass: a mixture learned by MoS with a small
model trains a large one without MoS's cost. The schedule lives in the strategy (hashable tuples
the jitted steps close over); the state is a step counter, checkpointed with the run, so a resumed
run goes on exactly. The source folder is read whenever the strategy is built (training,
evaluation): keep it. It must have trained on the same dataset names, with p over the same
mixing.unit.
"""

from __future__ import annotations

import dataclasses
import json
import os

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mos_jax.mixing import base


@flax.struct.dataclass
class ReplayState:
  step: jax.Array  # int32 []: train steps taken (the schedule's clock)


def source_folder(mixing_config, section: str, key: str) -> str:
  """`mixing.<section>.<key>` ('' when unset, or absent from a config written before it)."""
  node = mixing_config.get(section)
  return str(node.get(key, '') or '') if node is not None else ''


def read_source(folder: str, what: str) -> tuple[dict, list[dict]]:
  """(config.json as a dict, the metrics.jsonl lines) of run folder `folder`; `what` names the
  setting in messages. Torn or unreadable lines are skipped (as workdir.metrics reads them)."""
  config_path = os.path.join(folder, 'config.json')
  if not os.path.isfile(config_path):
    raise ValueError(f'{what}={folder!r} is not a run folder (no config.json)')
  with open(config_path) as f:
    config = json.load(f)
  path = os.path.join(folder, 'metrics.jsonl')
  if not os.path.isfile(path):
    raise ValueError(f'{what}={folder!r} has no metrics.jsonl: no logged mixture to follow')
  lines = []
  with open(path) as f:
    for raw in f:
      try:
        lines.append(json.loads(raw))
      except json.JSONDecodeError:
        continue
  return config, lines


def logged_mixture(folder: str, names, unit: str, what: str) -> tuple[int, list[int], np.ndarray]:
  """(the source's train.steps, its logged steps, p [K, N] in `names`' order) of run `folder`.

  Refuses (ValueError, one line) a folder that is not a run, has no logged mixture, trained on
  other dataset names, or whose p counts another mixing.unit.
  """
  config, lines = read_source(folder, what)
  source_names = list(config.get('data', {}).get('datasets', {}))
  if sorted(source_names) != sorted(names):
    raise ValueError(f'{what}={folder!r} trained on datasets {source_names}, this run on '
                     f'{list(names)}: a mixture carries over only between the same datasets')
  source_unit = config.get('mixing', {}).get('unit', 'row')  # Before mixing.unit: rows.
  if source_unit != unit:
    raise ValueError(f'{what}={folder!r} logged p over {source_unit}s, this run mixes '
                     f'{unit}s: set --config.mixing.unit={source_unit} to follow it')
  by_step = {}
  for line in lines:
    if isinstance(line, dict) and all(f'mixture/{n}' in line for n in names):
      by_step[int(line['step'])] = [float(line[f'mixture/{n}']) for n in names]
  if not by_step:
    raise ValueError(f'{what}={folder!r}: its metrics.jsonl logs no mixture/<name> line')
  steps = sorted(by_step)
  return int(config['train']['steps']), steps, np.asarray([by_step[s] for s in steps])


def schedule(source_steps: int, logged: list[int], table: np.ndarray, steps: int):
  """Where this run's p changes: (first steps [K'], p [K', N]) with p[j] used after steps
  starts[j] .. starts[j + 1] - 1. A source line at step k governs this run from step
  ceil(k * steps / source_steps) on (the first s with floor(s * source_steps / steps) >= k);
  lines that repeat the previous p are dropped."""
  starts, rows = [], []
  for k, p in zip(logged, table):
    start = -(-k * steps // source_steps)
    if rows and np.array_equal(p, rows[-1]):
      continue
    if starts and starts[-1] == start:  # Several source lines map to one step: the last wins.
      rows[-1] = p
      continue
    starts.append(start)
    rows.append(p)
  return starts, np.asarray(rows)


@base.register('replay')
@dataclasses.dataclass(frozen=True)
class Replay(base.Strategy):
  """p from a table, indexed by the train steps taken (also static's `from_run`)."""
  starts: tuple[int, ...] = (0,)  # first step (of this run) of each row of the table
  table: tuple[tuple[float, ...], ...] = ()  # [K, N] p over mixing.unit
  source: str = ''  # the run folder it came from

  @classmethod
  def from_config(cls, mixing_config, names, prior, train_steps=None):
    folder = source_folder(mixing_config, 'replay', 'run')
    if not folder:
      raise ValueError('mixing.strategy=replay needs mixing.replay.run=DIR, a run folder whose '
                       'logged mixture this run follows')
    return cls.from_run(mixing_config, names, prior, folder, train_steps, final_only=False)

  @classmethod
  def from_run(cls, mixing_config, names, prior, folder, train_steps, final_only: bool):
    name = 'static' if final_only else 'replay'
    what = 'mixing.static.from_run' if final_only else 'mixing.replay.run'
    base.no_target(mixing_config, name)
    if float(mixing_config.min_prob):
      raise ValueError(f'mixing.min_prob={mixing_config.min_prob} floors a scorer\'s output; '
                       f'{what} follows the logged p as it is: set mixing.min_prob=0')
    folder = os.path.abspath(os.path.expanduser(folder))
    source_steps, logged, table = logged_mixture(folder, names, mixing_config.get('unit', 'row'),
                                                 what)
    if final_only:
      starts, rows = [0], table[-1:]
    else:
      if not train_steps:
        raise ValueError('mixing.strategy=replay rescales the logged mixture to this run\'s '
                         'train.steps, which the caller did not give')
      starts, rows = schedule(source_steps, logged, table, int(train_steps))
    return cls(name=name, names=tuple(names), prior=prior, starts=tuple(int(s) for s in starts),
               table=tuple(tuple(float(x) for x in row) for row in rows), source=folder)

  def init_state(self, mixing_config, sizes, key):
    del mixing_config, sizes, key
    return ReplayState(step=jnp.zeros((), jnp.int32))

  def probs(self, state):
    starts = jnp.asarray(self.starts, jnp.int32)
    row = jnp.clip(jnp.searchsorted(starts, state.step, side='right') - 1, 0, len(self.starts) - 1)
    return jnp.asarray(self.table, jnp.float32)[row]

  def after_train_step(self, state, metrics):
    del metrics
    return state.replace(step=state.step + 1)

  def moves_after(self, step: int) -> bool:
    return step in self.starts[1:]
