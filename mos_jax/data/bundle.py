"""build_data: read, convert, template, tokenize every dataset once, and wire up the loaders."""

import dataclasses
import hashlib
import json
import os
import zlib

import numpy as np

from mos_jax.data import demo_skills
from mos_jax.data import formats
from mos_jax.data import mixture
from mos_jax.data import pipeline
from mos_jax.data import sources
from mos_jax.data import splits
from mos_jax.data import templates
from mos_jax.data import tokenize as tokenize_lib


@dataclasses.dataclass
class _Dataset:
  train: pipeline.ExampleSource
  dev: pipeline.ExampleSource
  dev_records: list[dict]  # Raw records of the dev split, aligned with dev example ids.
  fingerprint: str
  train_records: list[dict] | None = None  # Raw train records (build_data(keep_records=True)).
  # The held-out test split (empty without test_examples/test_path) and its hash.
  test: pipeline.ExampleSource | None = None
  test_fingerprint: str = ''


class DataBundle:
  """Everything the trainer needs from the data (see docs/interfaces.md)."""

  def __init__(self, names, datasets, tokenizer, stats, train, settings):
    self.names: list[str] = list(names)
    self.sizes: list[int] = [len(datasets[n].train) for n in names]  # Training examples.
    self.tokenizer = tokenizer
    self.stats: dict[str, dict] = stats
    self.train: mixture.MixtureIterator = train
    self._datasets = datasets
    self._s = settings

  def unit_sizes(self) -> list[int]:
    """Each dataset's size in the mixture's unit (mixing.unit): what the prior q_tau (Eq. 3)
    weighs. Examples for 'example' and for 'row' (the meaning before mixing.unit: p drew rows, its
    prior weighed examples); every example's positions for 'token'."""
    unit = self.train.unit
    sizes = (self.sizes if unit in ('example', 'row') else
             [rows.plan.tokens for rows in self.train.train_streams])
    for name, size in zip(self.names, sizes):
      if size <= 0:
        raise ValueError(f'dataset {name!r} has no {unit}s to mix by (mixing.unit={unit!r}).')
    return list(sizes)

  def _index(self, name: str) -> int:
    if name not in self._datasets:
      raise KeyError(f'unknown dataset {name!r}; datasets: {self.names}')
    return self.names.index(name)

  def dev_batches(self, name: str):
    """This host's eval_batch_size // process_count rows per batch over the dev split, in order
    (packed like training rows when data.packing is on: the dev loss is a token-weighted sum)."""
    s = self._s
    return pipeline.finite_batches(
        self._datasets[name].dev, self._index(name), s['eval_rows'], s['pad_id'], s['max_len'],
        s['buckets'], s['process_index'], s['process_count'], packing=s['packing'])

  def test_batches(self, name: str):
    """Like dev_batches over the held-out test split (empty when the dataset has none). Only the
    loop's evaluation after the last step reads it: no strategy, reward or checkpoint sees it."""
    s = self._s
    source = self._datasets[name].test
    if source is None or not len(source):
      return iter(())
    return pipeline.finite_batches(
        source, self._index(name), s['eval_rows'], s['pad_id'], s['max_len'],
        s['buckets'], s['process_index'], s['process_count'], packing=s['packing'])

  def test_fingerprint(self, name: str) -> str:
    """Hash of the tokenized test split ('' when the dataset has none)."""
    self._index(name)
    return self._datasets[name].test_fingerprint

  def dev_window(self, name: str, index: int, batch_size: int) -> dict:
    """The `index`-th window of batch_size // process_count rows of this host's dev shard,
    wrapping around (reward batches from the dev split: a function of `index`, so a resumed run
    sees the same ones)."""
    s = self._s
    rows = _host_rows(batch_size, s['process_count'], 'data.reward_batch_size')
    source = self._datasets[name].dev
    mine = range(s['process_index'], len(source), s['process_count'])
    if not len(mine):
      raise ValueError(f'dataset {name!r} has no dev examples on process {s["process_index"]}; '
                       f'this mixing strategy reads dev batches: raise its dev_examples.')
    start = index * rows
    chosen = [mine[(start + k) % len(mine)] for k in range(rows)]
    block = pipeline.stack([pipeline.to_row(source[i]) for i in chosen], s['max_len'], s['pad_id'])
    # Padded to max_len: the windows of every dataset (and host) are stacked into one batch.
    return pipeline.crop(block, [self._index(name)] * rows, s['max_len'], s['buckets'],
                         s['max_len'])

  def full_pass_batches(self, name: str, batch_size: int, examples=None):
    """Every train example once, in order, batch_size // process_count rows per host and batch;
    host p holds examples p, p + P, ... (the shard its reward batches come from). Packed when
    data.packing is on; `token_example_ids` [rows, L] names each token's example (-1 = none).
    `examples`, an ExampleSource aligned with the train split (e.g. a variant of each example),
    replaces it."""
    s = self._s
    rows = _host_rows(batch_size, s['process_count'], 'full_pass_batches(batch_size)')
    source = self._datasets[name].train if examples is None else examples
    return pipeline.finite_batches(
        source, self._index(name), rows, s['pad_id'], s['max_len'],
        s['buckets'], s['process_index'], s['process_count'], packing=s['packing'],
        token_example_ids=True)

  def fingerprint(self, name: str) -> str:
    """Hash of the tokenized train split and the settings that shaped it."""
    self._index(name)
    return self._datasets[name].fingerprint

  def example(self, name: str, index: int, split: str = 'train') -> dict:
    """One tokenized example: {'ids', 'trained', 'example_id'} (for inspection and tests)."""
    self._index(name)
    return getattr(self._datasets[name], split)[index]

  def dev_records(self, name: str) -> list[dict]:
    """The raw dev records (with e.g. an `answer` field), indexed by dev example id."""
    self._index(name)
    return self._datasets[name].dev_records

  def train_records(self, name: str) -> list[dict]:
    """The raw train records, indexed by train example id (needs build_data(keep_records=True))."""
    self._index(name)
    if self._datasets[name].train_records is None:
      raise ValueError('train_records needs build_data(..., keep_records=True)')
    return self._datasets[name].train_records

  def close(self) -> None:
    self.train.close()


def _host_rows(global_rows: int, process_count: int, key: str) -> int:
  if global_rows <= 0 or global_rows % process_count:
    raise ValueError(f'{key}={global_rows} must be a positive multiple of the process count '
                     f'({process_count})')
  return global_rows // process_count


def _seed(*parts) -> int:
  return int(np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(1)[0])


def tokenizer_path(config) -> str:
  """The tokenizer folder a config uses: data.tokenizer, else the checkpoint's, else the demo's."""
  path = config.data.tokenizer or config.model.get('hf_checkpoint', '')
  if not path and config.data.demo_dir:
    path = demo_skills.tokenizer_dir(config.data.demo_dir)
  if not path:
    raise ValueError('no tokenizer: set data.tokenizer (or model.hf_checkpoint) to a local folder')
  return path


def load_tokenizer(path: str):
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(os.path.expanduser(path)):
    raise ValueError(f'tokenizer folder {path} does not exist')
  tok = AutoTokenizer.from_pretrained(os.path.expanduser(path))
  if not tok.is_fast:
    raise ValueError(f'tokenizer at {path} has no fast (Rust) version; offsets are needed for '
                     'the loss mask')
  return tok


def _convert(name: str, records: sources.Records, fmt: str, on_error: str):
  """Records -> (conversations, their record indices, number skipped)."""
  convs, kept, skipped = [], [], 0
  for i, row in enumerate(records.rows):
    try:
      convs.append(formats.to_conversation(row, fmt))
      kept.append(i)
    except formats.RecordError as e:
      if on_error == 'skip':
        skipped += 1
        continue
      raise ValueError(f'dataset {name!r}: {records.where(i)}: {e} (format {fmt})') from None
  return convs, kept, skipped


def _render(name: str, template, convs, where):
  out = []
  for k, conv in enumerate(convs):
    try:
      out.append(template.render(conv))
    except templates.TemplateError as e:
      raise ValueError(f'dataset {name!r}: {where(k)}: {e}') from None
  return out


SAMPLES = ('first', 'random')


class _Sample:
  """A seeded random subset of a dataset's records that still names each record's file and line."""

  def __init__(self, records: sources.Records, keep: np.ndarray):
    self._records, self._keep = records, keep
    self.rows = [records.rows[i] for i in keep]
    self.skipped = records.skipped

  def where(self, index: int) -> str:
    return self._records.where(int(self._keep[index]))


def random_sample(name: str, n: int, k: int, seed: int) -> np.ndarray:
  """Sorted indices of a random k of n records, seeded by (seed, dataset name)."""
  rng = np.random.default_rng(np.random.SeedSequence([abs(int(seed)), zlib.crc32(name.encode())]))
  return np.sort(rng.choice(n, size=min(k, n), replace=False))


def _resolve(root: str, path: str) -> str:
  """`path` under data.root when it is relative and root is set (hub ids are never relative)."""
  if root and path and not os.path.isabs(os.path.expanduser(path)):
    return os.path.join(os.path.expanduser(root), path)
  return path


def _read_dataset(name: str, entry, d, key: str, fmt: str = ''):
  """Reads entry[key] ('path' or 'dev_path') -> (records, conversations, record ids, format,
  number of records that do not fit the format)."""
  path = _resolve(d.get('root', ''), entry[key])
  sample = entry.get('sample', 'first')
  if sample not in SAMPLES:
    raise ValueError(f'dataset {name!r}: sample must be one of {SAMPLES}, got {sample!r}')
  cap = int(entry.get('max_examples', 0)) if key == 'path' else 0
  records = sources.load_records(name, path, entry.get('split', 'train'),
                                 cap if sample == 'first' else 0, d.on_error)
  if cap and sample == 'random' and len(records.rows) > cap:
    records = _Sample(records, random_sample(name, len(records.rows), cap,
                                             entry.get('sample_seed', 0)))
  if not records.rows:
    raise ValueError(f'dataset {name!r} is empty ({path})')
  fmt = fmt or entry.get('format', '')
  if not fmt:
    fields = set().union(*(r.keys() for r in records.rows[:100]))
    fmt = formats.detect_format(fields)
    if not fmt:
      raise ValueError(f'dataset {name!r}: cannot tell the format from fields {sorted(fields)}; '
                       f'set its format to one of {", ".join(formats.FORMATS)}')
  if fmt not in formats.FORMATS:
    raise ValueError(f'dataset {name!r}: unknown format {fmt!r}; '
                     f'known: {", ".join(formats.FORMATS)}')
  convs, record_ids, bad = _convert(name, records, fmt, d.on_error)
  if not convs:
    raise ValueError(f'dataset {name!r} is empty after skipping {bad} bad records ({path})')
  return records, convs, record_ids, fmt, bad


def _fingerprint(table, settings: dict) -> str:
  h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
  for column in ('input_ids', 'trained'):
    arr = table.column(column).combine_chunks()
    h.update(arr.offsets.to_numpy().tobytes())
    h.update(arr.values.to_numpy().tobytes())
  return h.hexdigest()


def _mean(total: int, count: int) -> float:
  return round(total / count, 2) if count else 0.0


def build_data(config, process_index: int = 0, process_count: int = 1,
               keep_records: bool = False) -> DataBundle:
  """Reads, tokenizes and wires up every dataset of `config.data` (see docs/interfaces.md).

  keep_records=True also keeps each train example's raw record (`DataBundle.train_records`).
  """
  d = config.data
  names = list(d.datasets.keys())
  if not names:
    raise ValueError('config.data.datasets is empty: add at least one dataset(...)')
  if d.mix_per not in mixture.MIX_PER:
    raise ValueError(f'data.mix_per must be one of {mixture.MIX_PER}, got {d.mix_per!r}')
  if d.max_len <= 0:
    raise ValueError(f'data.max_len must be positive, got {d.max_len}')
  rows = _host_rows(config.train.batch_size, process_count, 'train.batch_size')
  reward_rows = _host_rows(d.reward_batch_size, process_count, 'data.reward_batch_size')
  eval_rows = _host_rows(d.eval_batch_size, process_count, 'data.eval_batch_size')
  buckets = tuple(int(b) for b in d.buckets)
  if d.demo_dir:
    demo_skills.ensure_demo(d.demo_dir)
  tokenizer = load_tokenizer(tokenizer_path(config))
  pad_id = tokenizer.pad_token_id
  if pad_id is None:
    pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0

  datasets, stats = {}, {}
  for name in names:
    entry = d.datasets[name]
    records, convs, record_ids, fmt, bad = _read_dataset(name, entry, d, 'path')
    try:
      template = templates.make_template(tokenizer, d.template)
      if isinstance(template, templates.HFTemplate):
        template.check_against(convs[0])
    except templates.TemplateError as e:
      raise ValueError(f'dataset {name!r}: {e}') from None
    if entry.get('dev_path', ''):  # An explicit dev file: nothing is held out of the train file.
      dev = _read_dataset(name, entry, d, 'dev_path', fmt)
      skipped = records.skipped + bad + dev[0].skipped + dev[4]
      parts = {'train': (records, convs, record_ids), 'dev': dev[:3]}
    else:
      train_idx, dev_idx = splits.split_dev(name, len(convs), int(entry.get('dev_examples', 0)))
      skipped = records.skipped + bad
      parts = {split: (records, [convs[i] for i in idx], [record_ids[i] for i in idx])
               for split, idx in (('train', train_idx), ('dev', dev_idx))}
    test_copies, test_where = 0, ''
    if entry.get('test_path', ''):  # An explicit test file: nothing more is held out.
      test = _read_dataset(name, entry, d, 'test_path', fmt)
      skipped += test[0].skipped + test[4]
      parts['test'] = test[:3]
      test_where = _resolve(d.get('root', ''), entry.test_path)
    elif int(entry.get('test_examples', 0)) > 0:
      recs, train_convs, train_ids = parts['train']
      hashes = [splits.example_hash(c) for c in train_convs]
      keep, held, test_copies = splits.split_test(
          name, hashes, range(len(train_convs)), {splits.example_hash(c) for c in parts['dev'][1]},
          int(entry.test_examples))
      parts['train'] = (recs, [train_convs[i] for i in keep], [train_ids[i] for i in keep])
      parts['test'] = (recs, [train_convs[i] for i in held], [train_ids[i] for i in held])
      test_where = f'held out of {entry.path}'
    if 'test' in parts:
      splits.check_disjoint(name, {k: [splits.example_hash(c) for c in v[1]] for k, v in parts.items()},
                      test_where)
    split_tables, split_records, counts = {}, {}, tokenize_lib.Counts()
    for split, (recs, split_convs, ids) in parts.items():
      where = lambda k: recs.where(ids[k])  # pylint: disable=cell-var-from-loop
      rendered = _render(name, template, split_convs, where)
      table, kept, c = tokenize_lib.tokenize(rendered, tokenizer, d.max_len, d.truncation,
                                             d.train_on_prompt)
      split_tables[split] = table
      counts.add(c)
      if split == 'dev' or keep_records:
        split_records[split] = [recs.rows[ids[k]] for k in kept]
    left = len(split_tables['train'])
    if left < max(process_count, 1):
      raise ValueError(
          f'dataset {name!r}: {left} training examples left after tokenization '
          f'({counts.dropped_too_long} dropped as too long, {counts.dropped_no_target} with '
          f'nothing to train on within data.max_len={d.max_len}); {process_count} hosts need one '
          'each at least')
    settings = {'path': entry.path, 'format': fmt, 'max_examples': entry.get('max_examples', 0),
                'dev_examples': entry.get('dev_examples', 0), 'max_len': d.max_len,
                'truncation': d.truncation, 'train_on_prompt': d.train_on_prompt,
                'template': d.template or tokenizer.chat_template}
    if 'test' in parts:  # Only then: a run without a test split keeps its old fingerprint.
      settings.update(test_examples=entry.get('test_examples', 0),
                      test_path=entry.get('test_path', ''))
    if entry.get('sample', 'first') != 'first' or entry.get('dev_path', ''):
      settings.update(sample=entry.get('sample', 'first'), sample_seed=entry.get('sample_seed', 0),
                      dev_path=entry.get('dev_path', ''))
    datasets[name] = _Dataset(
        train=pipeline.ExampleSource(split_tables['train']),
        dev=pipeline.ExampleSource(split_tables['dev']),
        dev_records=split_records['dev'],
        fingerprint=_fingerprint(split_tables['train'], settings),
        train_records=split_records.get('train'),
        test=pipeline.ExampleSource(split_tables['test']) if 'test' in split_tables else None,
        test_fingerprint=(_fingerprint(split_tables['test'], settings)
                          if 'test' in split_tables else ''))
    stats[name] = {
        'format': fmt,
        'records': len(records.rows),
        'skipped_records': skipped,
        'train_examples': len(split_tables['train']),
        'dev_examples': len(split_tables['dev']),
        'test_examples': len(split_tables['test']) if 'test' in split_tables else 0,
        # Train copies of test examples dropped with them (repeated records).
        'test_copies_dropped': test_copies,
        'tokens': counts.prompt_tokens + counts.response_tokens,
        'mean_prompt_len': _mean(counts.prompt_tokens, counts.kept),
        'mean_response_len': _mean(counts.response_tokens, counts.kept),
        'truncated': counts.truncated,
        'dropped_too_long': counts.dropped_too_long,
        'dropped_no_target': counts.dropped_no_target,
    }

  if d.num_workers:
    _parse_flags_for_workers()
  # Every dataset's training and reward rows, planned alike on every host (own seeds each).
  train_streams = [pipeline.GlobalRows(datasets[n].train, _seed(config.seed, i, 1), d.max_len,
                                    d.packing) for i, n in enumerate(names)]
  reward_streams = [pipeline.GlobalRows(datasets[n].train, _seed(config.seed, i, 2), d.max_len,
                                      d.packing) for i, n in enumerate(names)]
  spec = mixture.MixtureSpec(
      names=tuple(names), seed=int(config.seed), rows=rows, reward_rows=reward_rows,
      max_len=d.max_len, pad_id=int(pad_id), buckets=buckets, mix_per=d.mix_per,
      process_index=process_index, process_count=process_count, num_workers=d.num_workers,
      unit=config.mixing.get('unit', 'row'), draws=d.get('draws', 'random'))
  train = iter(mixture.MixtureIterDataset(train_streams, reward_streams, spec))
  settings = {'eval_rows': eval_rows, 'pad_id': int(pad_id), 'max_len': d.max_len,
              'packing': bool(d.packing),
              'buckets': buckets, 'process_index': process_index, 'process_count': process_count}
  return DataBundle(names, datasets, tokenizer, stats, train, settings)


def _parse_flags_for_workers() -> None:
  """Grain's worker processes read absl flags; outside an absl app nobody has parsed them."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(['mos_jax'], known_only=True)
