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
  pad_id: int
  buckets: tuple[int, ...] = ()
  mix_per: str = 'batch'
  process_index: int = 0
  process_count: int = 1


class MixtureIterDataset(grain.IterDataset):
  """Parents: one training stream per dataset, then one reward stream per dataset."""

  def __init__(self, train: Sequence[grain.IterDataset], reward: Sequence[grain.IterDataset],
               spec: MixtureSpec):
    if spec.mix_per not in MIX_PER:
      raise ValueError(f'data.mix_per must be one of {MIX_PER}, got {spec.mix_per!r}')
    if not len(train) == len(reward) == len(spec.names):
      raise ValueError('one training and one reward stream per dataset are needed')
    super().__init__(list(train) + list(reward))
    self.spec = spec

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
    self._train, self._reward = iterators[:n], iterators[n:]
    self._step = 0
    self._probs = np.full(n, 1.0 / n)

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

  def _batch(self, rows: list[dict], dataset_ids) -> dict:
    s = self._spec
    length = pipeline.pick_length([len(r['tokens']) for r in rows], s.max_len, s.buckets)
    return pipeline.collate(rows, dataset_ids, length, s.pad_id)

  def __next__(self) -> dict:
    self._assert_not_closed()
    dataset_ids = self.draw(self._step)
    rows = [next(self._train[i]) for i in dataset_ids]
    self._step += 1
    return self._batch(rows, dataset_ids)

  def reward_batches(self) -> dict[str, dict]:
    """One batch of reward_batch_size (host-local) rows per dataset, from the reward streams."""
    self._assert_not_closed()
    out = {}
    for i, name in enumerate(self._spec.names):
      rows = [next(self._reward[i]) for _ in range(self._spec.reward_rows)]
      out[name] = self._batch(rows, [i] * len(rows))
    return out

  def get_state(self) -> dict:
    names = self._spec.names
    return {
        'names': list(names),
        'step': self._step,
        'probabilities': self._probs.tolist(),
        'train': {n: it.get_state() for n, it in zip(names, self._train)},
        'reward': {n: it.get_state() for n, it in zip(names, self._reward)},
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
    self._probs = check_probabilities(state['probabilities'], len(names))

  def __str__(self) -> str:
    return f'MixtureIterator(step={self._step})'
