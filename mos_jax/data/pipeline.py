"""Per-dataset Grain pipelines over the tokenized Arrow table, and batch assembly.

Each dataset's endless stream is planned globally (RowPlan: which examples make each row), and
every host reads only its slice of each global batch. Rows are stacked padded to max_len; a batch
is cropped to the smallest bucket that holds the global batch's longest row (or kept at max_len).
This module imports only numpy, pyarrow and grain: worker processes unpickle what lives here.
"""

import bisect
import dataclasses
import sys

import grain
import numpy as np
import pyarrow as pa

ROW_KEYS = ('tokens', 'targets', 'loss_mask', 'positions', 'segment_ids')
_PACKING_BINS = 8  # Rows packed together before they are emitted (first-fit).


class ExampleSource(grain.sources.RandomAccessDataSource):
  """Random access to tokenized examples: numpy views of the Arrow table's list buffers."""

  def __init__(self, table: pa.Table):
    self._table = table
    self._views()

  def _views(self):
    ids = self._table.column('input_ids').combine_chunks()
    flags = self._table.column('trained').combine_chunks()
    self._offsets = ids.offsets.to_numpy()
    self._ids = ids.values.to_numpy()
    self._flags = flags.values.to_numpy()

  def __getstate__(self):
    return {'table': self._table}

  def __setstate__(self, state):
    self._table = state['table']
    self._views()

  def __len__(self) -> int:
    return len(self._offsets) - 1

  def __getitem__(self, index: int) -> dict:
    lo, hi = self._offsets[index], self._offsets[index + 1]
    return {'ids': self._ids[lo:hi], 'trained': self._flags[lo:hi], 'example_id': int(index)}

  def __repr__(self) -> str:
    return f'ExampleSource({len(self)} examples)'


def _first_fit(order: np.ndarray, lengths: np.ndarray, max_len: int) -> list[list[int]]:
  """Examples in `order` -> rows of at most max_len positions: each example goes into the first
  of _PACKING_BINS open rows it fits; when it fits none, the fullest open row is emitted."""
  rows, open_rows, used = [], [], []
  for i in order.tolist():
    n = int(lengths[i])
    for b, u in enumerate(used):
      if u + n <= max_len:
        open_rows[b].append(i)
        used[b] += n
        break
    else:
      if len(open_rows) == _PACKING_BINS:
        b = used.index(max(used))
        rows.append(open_rows.pop(b))
        used.pop(b)
      open_rows.append([i])
      used.append(n)
  return rows + open_rows  # The epoch's last rows, in the order they were opened.


class RowPlan:
  """Which examples make up each row of one dataset's endless stream — the same on every host.

  Epoch e visits every example once, in the order of a permutation seeded by (seed, e); with
  packing its examples are packed first-fit into rows of max_len positions, otherwise each
  example is a row. The plan reads only example lengths, so every host knows every row of the
  global stream (and its length) without reading or asking anyone: the global batch is the same
  for any number of hosts, and all hosts agree on a batch's bucket.
  """

  def __init__(self, lengths: np.ndarray, seed: int, max_len: int, packing: bool):
    self._lengths = np.asarray(lengths, np.int64)
    self._seed, self._max_len, self._packing = seed, max_len, packing
    self.examples_per_epoch = len(self._lengths)  # Every epoch visits each example once.
    self.tokens = int(self._lengths.sum())  # Positions of one epoch's examples (mixing.unit).
    self._starts = [0]  # First global row of epochs 0, 1, ... planned so far (and the next one).
    self._plans = {}  # epoch -> (examples in row order, row offsets into them); the last two.

  def _plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    if epoch not in self._plans:
      order = np.random.default_rng([self._seed, epoch]).permutation(len(self._lengths))
      if self._packing:
        rows = _first_fit(order, self._lengths, self._max_len)
        offsets = np.cumsum([0] + [len(r) for r in rows])
        order = np.asarray([i for r in rows for i in r], np.int64)
      else:
        offsets = np.arange(len(order) + 1)
      self._plans = {e: p for e, p in self._plans.items() if e >= epoch - 1}
      self._plans[epoch] = (order, offsets)
    return self._plans[epoch]

  def rows_in_epoch(self, epoch: int) -> int:
    return len(self._plan(epoch)[1]) - 1

  def epoch_of(self, row: int) -> int:
    """The epoch that global row `row` belongs to."""
    return self._locate(row)[0]

  def _locate(self, row: int) -> tuple[int, int]:
    while self._starts[-1] <= row:
      self._starts.append(self._starts[-1] + self.rows_in_epoch(len(self._starts) - 1))
    epoch = bisect.bisect_right(self._starts, row) - 1
    return epoch, row - self._starts[epoch]

  def examples(self, row: int) -> np.ndarray:
    """The example ids of global row `row`, in their order within the row."""
    epoch, k = self._locate(row)
    order, offsets = self._plan(epoch)
    return order[offsets[k]:offsets[k + 1]]

  def longest(self, start: int, stop: int) -> int:
    """The most positions any of global rows start .. stop - 1 holds."""
    return max(int(self._lengths[self.examples(r)].sum()) for r in range(start, stop))


class GlobalRows(grain.MapDataset):
  """One dataset's endless global row stream (RowPlan), read by random access: row g -> arrays."""

  def __init__(self, source: ExampleSource, seed: int, max_len: int, packing: bool):
    super().__init__()
    self._source, self._packing = source, packing
    lengths = np.diff(source._offsets) - 1  # Positions per row.  # pylint: disable=protected-access
    self.plan = RowPlan(lengths, seed, max_len, packing)

  def __len__(self) -> int:
    return sys.maxsize // 2  # Endless in practice; halved so slicing cannot overflow.

  def __str__(self) -> str:
    return f'GlobalRows({len(self._source)} examples, packing={self._packing})'

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    rows = [to_row(self._source[int(i)]) for i in self.plan.examples(index)]
    return pack_rows(rows) if self._packing else rows[0]

  def _getitems(self, indices):
    return [self[i] for i in indices]


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """How one host cuts a dataset's global rows into its batches."""
  dataset_id: int
  rows: int  # Host-local rows per batch.
  max_len: int
  pad_id: int
  buckets: tuple = ()
  process_index: int = 0
  process_count: int = 1
  token_example_ids: bool = False  # Add each token's example id (reward batches).


def host_batch(rows: GlobalRows, start: int, spec: BlockSpec, longest: int | None = None) -> dict:
  """This host's slice of the global batch of global rows start .. start + rows * hosts - 1,
  cropped to the bucket that holds the longest row of the whole global batch (or `longest`)."""
  width = spec.rows * spec.process_count
  if spec.buckets and longest is None:
    longest = rows.plan.longest(start, start + width)
  first = start + spec.process_index * spec.rows
  got = rows._getitems(range(first, first + spec.rows))  # pylint: disable=protected-access
  batch = crop(stack(got, spec.max_len, spec.pad_id), [spec.dataset_id] * spec.rows,
               spec.max_len, spec.buckets, longest)
  return _with_token_example_ids(batch, got) if spec.token_example_ids else batch


class HostBlocks(grain.MapDataset):
  """Block k = this host's part of the k-th global batch drawn from one dataset (mixing per batch
  takes whole global batches from a dataset, so each host's sequence of blocks is fixed)."""

  def __init__(self, rows: GlobalRows, spec: BlockSpec):
    super().__init__()
    self._rows, self._spec = rows, spec

  def __len__(self) -> int:
    return sys.maxsize // (2 * self._spec.rows * self._spec.process_count)

  def __str__(self) -> str:
    return f'HostBlocks({self._rows}, rows={self._spec.rows})'

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return host_batch(self._rows, index * self._spec.rows * self._spec.process_count, self._spec)


def to_row(example: dict) -> dict:
  """An example -> one unpadded row: inputs, next-token targets and their loss mask."""
  ids = example['ids']
  n = len(ids) - 1
  return {
      'tokens': ids[:-1].astype(np.int32),
      'targets': ids[1:].astype(np.int32),
      'loss_mask': example['trained'][1:].astype(np.float32),
      'positions': np.arange(n, dtype=np.int32),
      'segment_ids': np.ones(n, np.int32),
      'example_id': example['example_id'],
  }


def stack(rows: list[dict], length: int, pad_id: int) -> dict:
  """Rows -> arrays [n, length] padded with pad_id / 0, plus `example_ids` and `lengths` [n]."""
  n = len(rows)
  block = {
      'tokens': np.full((n, length), pad_id, np.int32),
      'targets': np.full((n, length), pad_id, np.int32),
      'loss_mask': np.zeros((n, length), np.float32),
      'positions': np.zeros((n, length), np.int32),
      'segment_ids': np.zeros((n, length), np.int32),
  }
  for r, row in enumerate(rows):
    k = len(row['tokens'])
    for key in ROW_KEYS:
      block[key][r, :k] = row[key]
  block['example_ids'] = np.asarray([row['example_id'] for row in rows], np.int32)
  block['lengths'] = np.asarray([len(row['tokens']) for row in rows], np.int32)
  return block


def pick_length(lengths, max_len: int, buckets) -> int:
  """max_len, or the smallest bucket that holds the longest row."""
  longest = max(lengths)
  for b in sorted(buckets):
    if b >= longest:
      return min(b, max_len)
  return max_len


def crop(block: dict, dataset_ids, max_len: int, buckets, longest: int | None = None) -> dict:
  """A stacked block -> a batch (docs/interfaces.md): padded to max_len or the smallest bucket
  that holds the longest row (`longest` if given: every host's), with dataset ids."""
  length = pick_length([longest] if longest else block['lengths'], max_len, buckets)
  batch = {key: np.ascontiguousarray(block[key][:, :length]) for key in ROW_KEYS}
  batch['dataset_ids'] = np.asarray(dataset_ids, np.int32).reshape(len(block['lengths']))
  batch['example_ids'] = block['example_ids']
  return batch


def padding_row(row: dict) -> dict:
  """A copy of a real row with nothing to train on: fills the last batch of a finite pass
  (a real sequence keeps attention well defined where an all-padding row might not)."""
  return dict(row, loss_mask=np.zeros_like(row['loss_mask']), example_id=-1)


def _next_fit(lengths, max_len: int) -> list[list[int]]:
  """Consecutive examples packed in order: a new row starts when the next one does not fit."""
  rows, used = [], max_len + 1
  for i, n in enumerate(lengths):
    if used + n > max_len:
      rows.append([])
      used = 0
    rows[-1].append(i)
    used += n
  return rows


def pack_rows(rows: list[dict]) -> dict:
  """Unpadded rows -> one row holding them all, segment ids 1..k (example_id -1; each token's
  example in `token_example_ids`)."""
  out = {key: np.concatenate([row[key] for row in rows]) for key in ('tokens', 'targets',
                                                                   'loss_mask', 'positions')}
  out['segment_ids'] = np.concatenate(
      [np.full(len(row['tokens']), k + 1, np.int32) for k, row in enumerate(rows)])
  out['token_example_ids'] = np.concatenate(
      [np.full(len(row['tokens']), row['example_id'], np.int32) for row in rows])
  out['example_id'] = -1
  return out


def _with_token_example_ids(batch: dict, rows: list[dict]) -> dict:
  """Adds `token_example_ids` [n, length]: each token's example id, -1 on padding."""
  ids = np.full(batch['tokens'].shape, -1, np.int32)
  for r, row in enumerate(rows):
    per_token = row.get('token_example_ids')
    if per_token is None:
      per_token = np.full(len(row['tokens']), row['example_id'], np.int32)
    k = min(len(per_token), ids.shape[1])
    ids[r, :k] = per_token[:k]
  batch['token_example_ids'] = ids
  return batch


def finite_batches(source: ExampleSource, dataset_id: int, rows_per_batch: int, pad_id: int,
                   max_len: int, buckets, process_index: int = 0, process_count: int = 1,
                   packing: bool = False, token_example_ids: bool = False):
  """Every example of this host's shard once, in order; every host yields the same number of
  batches (ceil of the largest shard), the last padded with rows whose loss_mask is 0.

  With packing, consecutive examples share rows (in order); each host works out every host's
  row count from the example lengths, so all agree on the number of batches without talking.
  `token_example_ids` adds each token's example id (-1 = padding or filler) as a [rows, L] key.
  """
  def emit(rows, longest=None):
    batch = crop(stack(rows, max_len, pad_id), [dataset_id] * rows_per_batch, max_len, buckets,
                 longest)
    return _with_token_example_ids(batch, rows) if token_example_ids else batch

  total = len(source)
  if total == 0:
    return
  lengths = np.diff(source._offsets) - 1  # Positions per row.  # pylint: disable=protected-access
  filler = padding_row(to_row(source[0]))
  # Every host's rows as lists of examples, and each row's length (known to all hosts alike).
  if packing:
    groups = [[[p + i * process_count for i in g]
               for g in _next_fit(lengths[p::process_count], max_len)]
              for p in range(process_count)]
  else:
    groups = [[[i] for i in range(p, total, process_count)] for p in range(process_count)]
  row_len = lambda group: int(sum(lengths[i] for i in group))
  num_batches = -(-max(len(g) for g in groups) // rows_per_batch)
  for k in range(num_batches):
    longest = None
    if buckets and process_count > 1:  # Crop to what every host's rows need.
      parts = [host[k * rows_per_batch:(k + 1) * rows_per_batch] for host in groups]
      longest = max(row_len(g) for part in parts for g in part)
      if any(len(part) < rows_per_batch for part in parts):
        longest = max(longest, len(filler['tokens']))
    rows = [pack_rows([to_row(source[i]) for i in g]) if packing else to_row(source[g[0]])
            for g in groups[process_index][k * rows_per_batch:(k + 1) * rows_per_batch]]
    rows += [filler] * (rows_per_batch - len(rows))
    yield emit(rows, longest)
