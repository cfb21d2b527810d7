"""The dynamic mixture loader (Algorithm 1, lines 3-4): draw a dataset from p, yield its batch.

p is set from outside (the scorer) before each draw. It is a distribution over `unit`s (examples
by default, as in the paper, or tokens, or rows): a packed row of dataset i holds u_i units
(u_i = units / rows of that dataset's current epoch plan), so rows are drawn with
d_i = (p_i / u_i) / sum_j (p_j / u_j), which makes the expected share of units drawn from
dataset i exactly p_i. With one example per row and unit 'example', d = p. Draws use an RNG seeded
by (seed, step), so every host draws the same dataset at the same step. They are independent
samples from d ('random', Algorithm 1), or 'balanced': each dataset's rows drawn so far stay
within about one of their expected number sum_t d_t * rows_t (never a whole row ahead; a credit
per dataset, carried in the state), so a short run's realised mixture is d rather than a noisy
sample of it. Each host reads its own slice of the global batch, which every host plans alike
(pipeline.RowPlan). Reward batches come from separate per-dataset streams, so the scorer's look
at the data never shifts the training order. The whole position (global rows taken from every
stream, step, p, credits) is JSON state that `grain.checkpoint.CheckpointSave/CheckpointRestore`
write and read through Orbax.
"""

import dataclasses
from collections.abc import Sequence

import grain
import numpy as np

from mos_jax.data import pipeline

MIX_PER = ('batch', 'example')
UNITS = ('example', 'token', 'row')  # What a mixture probability counts (mixing.unit).
DRAWS = ('random', 'balanced')  # How rows are given to datasets (data.draws).
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
  pad_id: int = 0
  buckets: tuple[int, ...] = ()
  mix_per: str = 'batch'
  process_index: int = 0
  process_count: int = 1
  num_workers: int = 0  # Grain worker processes per dataset (mixing per batch).
  unit: str = 'row'  # What p counts: UNITS (the loader turns it into row draws).
  draws: str = 'random'  # DRAWS: independent samples from d, or balanced against their expectation.


class MixtureIterDataset(grain.IterDataset):
  """Parents: one global training row stream per dataset, then one reward row stream per
  dataset (pipeline.GlobalRows)."""

  def __init__(self, train: Sequence[pipeline.GlobalRows], reward: Sequence[pipeline.GlobalRows],
               spec: MixtureSpec):
    if spec.mix_per not in MIX_PER:
      raise ValueError(f'data.mix_per must be one of {MIX_PER}, got {spec.mix_per!r}')
    if spec.unit not in UNITS:
      raise ValueError(f'mixing.unit must be one of {UNITS}, got {spec.unit!r}')
    if spec.draws not in DRAWS:
      raise ValueError(f'data.draws must be one of {DRAWS}, got {spec.draws!r}')
    if not len(train) == len(reward) == len(spec.names):
      raise ValueError('one training and one reward stream per dataset are needed')
    super().__init__(list(train) + list(reward))
    self.spec = spec
    self.train, self.reward = list(train), list(reward)

  def __iter__(self) -> 'MixtureIterator':
    return MixtureIterator(self)

  def __str__(self) -> str:
    return f'MixtureIterDataset({", ".join(self.spec.names)}, per {self.spec.mix_per})'


class MixtureIterator(grain.DatasetIterator):
  """next() -> this host's part of one global training batch; reward_batches() -> one batch per
  dataset.

  Its position is the number of global rows taken from each stream (the same on every host), the
  step and p; every batch is a function of them, so the global batches do not depend on how many
  hosts read them.
  """

  def __init__(self, ds: MixtureIterDataset):
    super().__init__()
    s = self._spec = ds.spec
    self._train, self._reward = ds.train, ds.reward
    n = len(s.names)
    block = lambda i, rows, **kw: pipeline.BlockSpec(
        i, rows, s.max_len, s.pad_id, s.buckets, s.process_index, s.process_count, **kw)
    self._train_blocks = [block(i, s.rows) for i in range(n)]
    self._reward_blocks = [block(i, s.reward_rows, token_example_ids=True) for i in range(n)]
    self._step = 0
    self._probs = np.full(n, 1.0 / n)
    self._taken = {'train': [0] * n, 'reward': [0] * n}  # Global rows taken from each stream.
    self._examples = [0] * n  # Training examples drawn from each dataset (all hosts' rows).
    self._credit = np.zeros(n)  # Balanced draws: expected minus drawn picks per dataset.
    self._streams = [None] * n  # Mixing per batch: each dataset's blocks from its position on.

  @property
  def step(self) -> int:
    return self._step

  @property
  def unit(self) -> str:
    return self._spec.unit

  @property
  def train_streams(self) -> list:
    """Each dataset's global training row stream (pipeline.GlobalRows: its RowPlan)."""
    return list(self._train)

  @property
  def probabilities(self) -> np.ndarray:
    return self._probs.copy()

  def rows_per_epoch(self) -> list[int]:
    """Training rows in one pass over each dataset (its examples, or fewer packed rows)."""
    return [rows.plan.rows_in_epoch(0) for rows in self._train]

  def set_probabilities(self, p) -> None:
    """Used from the next draw on; NaN, negative or all-zero p is refused."""
    self._probs = check_probabilities(p, len(self._spec.names))

  def units_per_row(self) -> np.ndarray:
    """u_i: units (spec.unit) per training row in the epoch plan each dataset draws from now."""
    if self._spec.unit == 'row':
      return np.ones(len(self._spec.names))
    u = []
    for rows, taken in zip(self._train, self._taken['train']):
      epoch = rows.plan.epoch_of(taken)
      units = rows.plan.examples_per_epoch if self._spec.unit == 'example' else rows.plan.tokens
      u.append(units / rows.plan.rows_in_epoch(epoch))
    return np.asarray(u, np.float64)

  def draw_probabilities(self) -> np.ndarray:
    """d: the distribution of the next draw over datasets, rows (or examples when mixing per
    example) of dataset i drawn with p_i / u_i, renormalised."""
    if self._spec.unit == 'row':
      return self._probs.copy()  # Bit for bit today's draws.
    return check_probabilities(self._probs / self.units_per_row(), len(self._spec.names))

  def _next_draw(self) -> np.ndarray:
    """The dataset of every row of this step's global batch (one dataset per batch, or one per
    row when mixing per example: the global batch is then one sample from d)."""
    s = self._spec
    rng = np.random.default_rng([s.seed, _DRAW_STREAM, self._step])
    d, width = self.draw_probabilities(), s.rows * s.process_count
    if s.draws == 'balanced':
      if s.mix_per == 'batch':
        return np.full(width, int(np.argmax(self._balanced_counts(d, 1, rng))))
      return rng.permutation(np.repeat(np.arange(len(d)), self._balanced_counts(d, width, rng)))
    if s.mix_per == 'batch':
      return np.full(width, rng.choice(len(s.names), p=d))
    return rng.choice(len(s.names), size=width, p=d)

  def _balanced_counts(self, d: np.ndarray, picks: int, rng) -> np.ndarray:
    """How many of `picks` go to each dataset: each pick to the dataset furthest behind its
    expected count (ties at random): smooth weighted round-robin (nginx's upstream balancer).
    Expected minus drawn sums to 0 after each step and stays above -1 for every dataset."""
    self._credit += picks * d
    counts = np.zeros(len(d), np.int64)
    for _ in range(picks):
      behind = np.flatnonzero(self._credit >= self._credit.max() - 1e-12)
      i = int(behind[0] if len(behind) == 1 else rng.choice(behind))
      self._credit[i] -= 1.0
      counts[i] += 1
    return counts

  def _next_block(self, i: int) -> dict:
    """Mixing per batch: dataset i's next global batch (this host's part)."""
    s = self._spec
    width = s.rows * s.process_count
    if self._streams[i] is None:
      blocks = pipeline.HostBlocks(self._train[i], self._train_blocks[i])
      it = blocks[self._taken['train'][i] // width:].to_iter_dataset(
          grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))  # Data is in memory.
      if s.num_workers:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=s.num_workers))
      self._streams[i] = iter(it)
    self._count_examples(i, self._taken['train'][i], width)
    self._taken['train'][i] += width
    return next(self._streams[i])

  def _count_examples(self, i: int, start: int, rows: int) -> None:
    plan = self._train[i].plan
    self._examples[i] += sum(len(plan.examples(r)) for r in range(start, start + rows))

  def _mixed_rows(self, every: np.ndarray) -> dict:
    """Mixing per example: global row j is the next row of dataset every[j]; this host reads
    only the rows of its slice, and crops to the longest row of the whole global batch."""
    s = self._spec
    lo, hi = s.process_index * s.rows, (s.process_index + 1) * s.rows
    rows, longest = [None] * s.rows, 0
    for i in np.unique(every).tolist():
      start, total = self._taken['train'][i], int((every == i).sum())
      before, where = int((every[:lo] == i).sum()), np.nonzero(every[lo:hi] == i)[0]
      got = self._train[i]._getitems(range(start + before, start + before + len(where)))  # pylint: disable=protected-access
      for r, row in zip(where, got):
        rows[r] = row
      if s.buckets:
        longest = max(longest, self._train[i].plan.longest(start, start + total))
      self._count_examples(i, start, total)
      self._taken['train'][i] += total
    return pipeline.crop(pipeline.stack(rows, s.max_len, s.pad_id), every[lo:hi], s.max_len,
                         s.buckets, longest or None)

  def __next__(self) -> dict:
    self._assert_not_closed()
    every = self._next_draw()
    if self._spec.mix_per == 'batch':
      batch = self._next_block(int(every[0]))
    else:
      batch = self._mixed_rows(every)
    self._step += 1
    return batch

  def reward_batches(self) -> dict[str, dict]:
    """One batch of reward_batch_size rows per dataset (this host's part), from the reward
    streams, all of one width; rows carry `token_example_ids` (each token's example, -1 on
    padding)."""
    self._assert_not_closed()
    s = self._spec
    width = s.reward_rows * s.process_count
    longest = None  # The reward step stacks every dataset's batch: one bucket for all of them.
    if s.buckets:
      longest = max(rows.plan.longest(taken, taken + width)
                    for rows, taken in zip(self._reward, self._taken['reward']))
    out = {}
    for i, name in enumerate(s.names):
      out[name] = pipeline.host_batch(self._reward[i], self._taken['reward'][i],
                                      self._reward_blocks[i], longest)
      self._taken['reward'][i] += width
    return out

  def get_state(self) -> dict:
    """The position; 'draw' (the next draw's distribution, a function of the rest) and 'examples'
    (training examples drawn per dataset) are there for the metrics."""
    return {
        'names': list(self._spec.names),
        'step': self._step,
        'unit': self._spec.unit,
        'probabilities': self._probs.tolist(),
        'draw': self.draw_probabilities().tolist(),
        'taken': {k: list(v) for k, v in self._taken.items()},
        'examples': list(self._examples),
        'credit': self._credit.tolist(),
    }

  def set_state(self, state: dict) -> None:
    names = list(self._spec.names)
    if list(state['names']) != names:
      raise ValueError(f'loader state is for datasets {state["names"]}, this run has {names}')
    if 'train' in state:
      raise ValueError('this loader state was written by an older mos_jax (one stream per host); '
                       'resume it with that version, or start a new workdir.')
    # A state from before mixing.unit counted rows; training.resume decides if it still fits.
    unit = state.get('unit', self._spec.unit)
    if unit != self._spec.unit:
      raise ValueError(f'loader state counts mixture probabilities in {unit}s, this run in '
                       f'{self._spec.unit}s (mixing.unit)')
    self._close_streams()
    self._step = int(state['step'])
    self._taken = {k: [int(x) for x in v] for k, v in state['taken'].items()}
    self._probs = check_probabilities(state['probabilities'], len(names))
    self._examples = [int(x) for x in state.get('examples', [])] or [
        sum(len(rows.plan.examples(r)) for r in range(taken))  # Older states: count them.
        for rows, taken in zip(self._train, self._taken['train'])]
    self._credit = np.asarray(state.get('credit', [0.0] * len(names)), np.float64)

  def _close_streams(self) -> None:
    for it in self._streams:
      if it is not None and hasattr(it, 'close'):
        it.close()
    self._streams = [None] * len(self._spec.names)

  def close(self) -> None:
    self._close_streams()
    super().close()

  def __str__(self) -> str:
    return f'MixtureIterator(step={self._step})'
