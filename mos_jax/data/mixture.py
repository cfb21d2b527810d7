"""The dynamic mixture loader (Algorithm 1, lines 3-4): draw a dataset from p, yield its batch.

p is set from outside (the scorer) before each draw. Draws use an RNG seeded by (seed, step), so
every host draws the same dataset at the same step while reading its own shard. Reward batches
come from separate per-dataset streams, so the scorer's look at the data never shifts the
training order. The whole position (every stream, step, p) is JSON state that
`grain.checkpoint.CheckpointSave/CheckpointRestore` write and read through Orbax.
"""

import dataclasses
from collections.abc import Sequence

import grain
import numpy as np

from mos_jax.data import pipeline

MIX_PER = ('batch', 'example')
_DRAW_STREAM = 0x6d6978  # Keeps draw seeds apart from other uses of the run seed.


def check_probabilities(p, num_datasets: int) -> np.ndarray:
  """Validates a mixture and returns it normalised (float64)."""
  p = np.asarray(p, np.float64).reshape(-1)
  if p.shape[0] != num_datasets:
    raise ValueError(f'expected {num_datasets} probabilities (one per dataset), got {p.shape[0]}')
  if not np.all(np.isfinite(p)):
    raise ValueError(f'mixture probabilities must be finite, got {p.tolist()}')
  if np.any(p < 0):
    raise ValueError(f'mixture probabilities must be non-negative, got {p.tolist()}')
  if p.sum() <= 0:
    raise ValueError(f'mixture probabilities sum to zero: {p.tolist()}')
  return p / p.sum()


@dataclasses.dataclass(frozen=True)
class MixtureSpec:
  names: tuple[str, ...]
  seed: int
  rows: int  # Host-local rows per training batch.
  reward_rows: int  # Host-local rows per reward batch.
  max_len: int
  buckets: tuple[int, ...] = ()
  mix_per: str = 'batch'
  process_index: int = 0
  process_count: int = 1


class BlockReader:
  """Takes any number of rows from a stream of blocks, remembering where it is inside a block.

  Its state is the stream's state before the current block plus the offset into it, so a
  restored reader re-reads that block and continues at the same row.
  """

  def __init__(self, stream: grain.DatasetIterator):
    self._stream = stream
    self._block, self._offset = None, 0
    self._before = None

  def take(self, n: int) -> dict:
    parts = []
    while n:
      if self._block is None or self._offset == len(self._block['lengths']):
        self._before = self._stream.get_state()
        self._block, self._offset = next(self._stream), 0
      k = min(n, len(self._block['lengths']) - self._offset)
      parts.append({key: v[self._offset:self._offset + k] for key, v in self._block.items()})
      self._offset += k
      n -= k
    if len(parts) == 1:
      return parts[0]
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}

  def get_state(self) -> dict:
    if self._block is None or self._offset == len(self._block['lengths']):
      return {'stream': self._stream.get_state(), 'offset': 0}
    return {'stream': self._before, 'offset': self._offset}

  def set_state(self, state: dict) -> None:
    self._stream.set_state(state['stream'])
    self._block, self._offset = None, 0
    if state['offset']:
      self._before = state['stream']
      self._block, self._offset = next(self._stream), int(state['offset'])


class MixtureIterDataset(grain.IterDataset):
  """Parents: one training stream per dataset, then one reward stream per dataset."""

  def __init__(self, train: Sequence[grain.IterDataset], reward: Sequence[grain.IterDataset],
               spec: MixtureSpec, row_lengths: dict | None = None):
    """`row_lengths` ({'train': [...], 'reward': [...]} of pipeline.RowLengths, one per dataset,
    None where rows are packed to max_len) lets every host crop to the same bucket."""
    if spec.mix_per not in MIX_PER:
      raise ValueError(f'data.mix_per must be one of {MIX_PER}, got {spec.mix_per!r}')
    if not len(train) == len(reward) == len(spec.names):
      raise ValueError('one training and one reward stream per dataset are needed')
    super().__init__(list(train) + list(reward))
    self.spec = spec
    self.row_lengths = row_lengths

  def __iter__(self) -> 'MixtureIterator':
    return MixtureIterator(self)

  def __str__(self) -> str:
    return f'MixtureIterDataset({", ".join(self.spec.names)}, per {self.spec.mix_per})'


class MixtureIterator(grain.DatasetIterator):
  """next() -> one training batch; reward_batches() -> one batch per dataset."""

  def __init__(self, ds: MixtureIterDataset):
    iterators = [iter(parent) for parent in ds.parents]
    super().__init__(iterators)
    self._spec = ds.spec
    n = len(ds.spec.names)
    self._train = [BlockReader(it) for it in iterators[:n]]
    self._reward = [BlockReader(it) for it in iterators[n:]]
    self._step = 0
    self._probs = np.full(n, 1.0 / n)
    # With several hosts and buckets: rows taken so far per stream (the same on every host).
    self._lengths = ds.row_lengths
    self._taken = {'train': [0] * n, 'reward': [0] * n}

  def _longest(self, kind: str, dataset: int, rows: int) -> int | None:
    """The longest of the next `rows` rows of every host's stream (None: crop to this host's)."""
    lengths = self._lengths[kind][dataset] if self._lengths else None
    start = self._taken[kind][dataset]
    self._taken[kind][dataset] += rows
    return lengths.longest(start, rows) if lengths is not None else None

  @property
  def step(self) -> int:
    return self._step

  @property
  def probabilities(self) -> np.ndarray:
    return self._probs.copy()

  def set_probabilities(self, p) -> None:
    """Used from the next draw on; NaN, negative or all-zero p is refused."""
    self._probs = check_probabilities(p, len(self._spec.names))

  def draw(self, step: int) -> np.ndarray:
    """The dataset of each host-local row at `step` (all rows alike when mixing per batch)."""
    s = self._spec
    rng = np.random.default_rng([s.seed, _DRAW_STREAM, step])
    if s.mix_per == 'batch':
      return np.full(s.rows, rng.choice(len(s.names), p=self._probs))
    # Draw the global batch, then take this host's slice: the global batch is one sample from p.
    every = rng.choice(len(s.names), size=s.rows * s.process_count, p=self._probs)
    return every[s.process_index * s.rows:(s.process_index + 1) * s.rows]

  def __next__(self) -> dict:
    self._assert_not_closed()
    s = self._spec
    dataset_ids = self.draw(self._step)
    first = int(dataset_ids[0])
    longest = None
    if (dataset_ids == first).all():
      longest = self._longest('train', first, s.rows)
      block = self._train[first].take(s.rows)
    else:  # Per-example mixing: each dataset's rows go where the draw put them.
      block = {}
      for i in np.unique(dataset_ids):
        where = np.nonzero(dataset_ids == i)[0]
        part = self._train[i].take(len(where))
        for key, value in part.items():
          if key not in block:
            block[key] = np.empty((s.rows,) + value.shape[1:], value.dtype)
          block[key][where] = value
    self._step += 1
    return pipeline.crop(block, dataset_ids, s.max_len, s.buckets, longest)

  def reward_batches(self) -> dict[str, dict]:
    """One batch of reward_batch_size (host-local) rows per dataset, from the reward streams."""
    self._assert_not_closed()
    out = {}
    for i, name in enumerate(self._spec.names):
      longest = self._longest('reward', i, self._spec.reward_rows)
      block = self._reward[i].take(self._spec.reward_rows)
      out[name] = pipeline.crop(block, [i] * self._spec.reward_rows, self._spec.max_len,
                                self._spec.buckets, longest)
    return out

  def get_state(self) -> dict:
    names = self._spec.names
    return {
        'names': list(names),
        'step': self._step,
        'probabilities': self._probs.tolist(),
        'train': {n: it.get_state() for n, it in zip(names, self._train)},
        'reward': {n: it.get_state() for n, it in zip(names, self._reward)},
        'taken': {k: list(v) for k, v in self._taken.items()},
    }

  def set_state(self, state: dict) -> None:
    names = list(self._spec.names)
    if list(state['names']) != names:
      raise ValueError(f'loader state is for datasets {state["names"]}, this run has {names}')
    for n, it in zip(names, self._train):
      it.set_state(state['train'][n])
    for n, it in zip(names, self._reward):
      it.set_state(state['reward'][n])
    self._step = int(state['step'])
    n = len(names)
    self._taken = {k: list(v) for k, v in state.get('taken', {'train': [0] * n,
                                                             'reward': [0] * n}).items()}
    self._probs = check_probabilities(state['probabilities'], len(names))

  def __str__(self) -> str:
    return f'MixtureIterator(step={self._step})'
