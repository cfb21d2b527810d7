"""Per-dataset Grain pipelines over the tokenized Arrow table, and batch assembly.

Rows are stacked into blocks padded to max_len; a batch is cropped to the smallest bucket that
holds its longest row (or kept at max_len).
This module imports only numpy, pyarrow and grain: worker processes unpickle what lives here.
"""

import dataclasses
import sys

import grain
import numpy as np
import pyarrow as pa

from grain import experimental as grain_experimental

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


class ShuffledRows(grain.MapDataset):
  """Rows of this host's shard, repeated forever; epoch e in the order of a permutation seeded
  by (seed, e).

  Grain's own `shuffle` computes every index with a cipher (~60 us per element here) and its
  per-element machinery costs as much again; here one cached numpy permutation serves a whole
  epoch and `_getitems` serves a batch at once.
  """

  def __init__(self, source: ExampleSource, seed: int, process_index: int = 0,
               process_count: int = 1):
    super().__init__()
    self._source = source
    self._shard = np.arange(process_index, len(source), process_count)
    if not len(self._shard):
      raise ValueError(f'host {process_index} of {process_count} has no examples to read')
    self._seed = seed
    self._epoch, self._perm = -1, None

  def __len__(self) -> int:
    return sys.maxsize // 2  # Endless in practice; halved so batching's round-up cannot overflow.

  def __str__(self) -> str:
    return f'ShuffledRows({len(self._shard)} examples, seed={self._seed})'

  def _row(self, index: int) -> dict:
    epoch, offset = divmod(index, len(self._shard))
    if epoch != self._epoch:
      self._epoch = epoch
      self._perm = np.random.default_rng([self._seed, epoch]).permutation(len(self._shard))
    return to_row(self._source[int(self._shard[self._perm[offset]])])

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._row(index)

  def _getitems(self, indices):
    return [self._row(i) for i in indices]


class RowLengths:
  """The lengths of every host's rows in ShuffledRows order, from the example offsets alone.

  With several processes and `data.buckets`, every host must crop a batch to the same length:
  each host works out the other hosts' rows (same seeds, their shards) instead of asking them.
  """

  def __init__(self, source: ExampleSource, seed: int, process_count: int):
    self._lengths = np.diff(source._offsets) - 1  # Positions per row.  # pylint: disable=protected-access
    self._shards = [np.arange(q, len(source), process_count) for q in range(process_count)]
    self._seed, self._perms = seed, {}

  def longest(self, start: int, n: int) -> int:
    """The longest of rows start .. start + n - 1 over every host's stream."""
    longest = 0
    for q, shard in enumerate(self._shards):
      for index in range(start, start + n):
        epoch, offset = divmod(index, len(shard))
        if (q, epoch) not in self._perms:
          self._perms = {k: v for k, v in self._perms.items() if k[1] >= epoch - 1}
          self._perms[(q, epoch)] = np.random.default_rng([self._seed, epoch]).permutation(
              len(shard))
        longest = max(longest, int(self._lengths[shard[self._perms[(q, epoch)][offset]]]))
    return longest


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


def _strip_id(row: dict) -> dict:
  return {k: row[k] for k in ('tokens', 'targets', 'loss_mask')}


def _from_packed(packed: dict) -> dict:
  return {
      'tokens': packed['tokens'], 'targets': packed['targets'], 'loss_mask': packed['loss_mask'],
      'positions': packed['tokens_positions'], 'segment_ids': packed['tokens_segment_ids'],
      'example_id': -1,
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


@dataclasses.dataclass(frozen=True)
class _Stack:
  """Picklable batch_fn: stacks rows padded to max_len."""
  length: int
  pad_id: int

  def __call__(self, rows):
    return stack(list(rows), self.length, self.pad_id)


@dataclasses.dataclass(frozen=True)
class StreamSpec:
  """What shapes one endless per-dataset stream."""
  seed: int
  block: int  # Rows per element of the stream (one host batch).
  max_len: int
  pad_id: int
  process_index: int = 0
  process_count: int = 1
  packing: bool = False
  num_workers: int = 0


def endless_blocks(source: ExampleSource, spec: StreamSpec) -> grain.IterDataset:
  """This host's shard, shuffled anew every epoch (seeded), repeated forever, as blocks of rows.

  Blocks, not rows, are the stream's elements: Grain's per-element overhead (and with worker
  processes the inter-process transfer) is paid once per batch.
  """
  rows = ShuffledRows(source, spec.seed, spec.process_index, spec.process_count)
  to_block = _Stack(spec.max_len, spec.pad_id)
  # Data is in memory: reader threads would only contend for the GIL.
  read = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  if spec.packing:
    length = spec.max_len
    it = grain_experimental.FirstFitPackIterDataset(
        rows.map(_strip_id).to_iter_dataset(read),
        length_struct={'tokens': length, 'targets': length, 'loss_mask': length},
        num_packing_bins=_PACKING_BINS, shuffle_bins=False).map(_from_packed)
    it = it.batch(spec.block, batch_fn=to_block)
  else:
    it = rows.batch(spec.block, batch_fn=to_block).to_iter_dataset(read)
  if spec.num_workers:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=spec.num_workers))
  return it


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
