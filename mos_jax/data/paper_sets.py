"""The paper's four training sets (§4.1, Table 1), drawn reproducibly from their sources.

For each dataset: read the source (hub id of the paper's footnote, or a local copy), convert every
record to a conversation, draw a seeded random `fraction` (10%) as the training set, a dev set
of `dev` (1K) examples from the *rest* and a test set of `test` (1K) distinct examples from the rest
again (none equal to a train or dev example), and write them as `messages` JSON lines:

    OUT/<name>/train.jsonl   OUT/<name>/dev.jsonl   OUT/<name>/test.jsonl   OUT/manifest.json

P3 is first reduced to `per_task` (1K) random examples of every prompted task (subset); the
fraction and the dev set are then drawn from that pool. The same arguments give the same bytes.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import zlib
from typing import Callable

import numpy as np

from mos_jax.data import formats
from mos_jax.data import sources
from mos_jax.infra import jsonl


@dataclasses.dataclass(frozen=True)
class PaperSource:
  """One dataset of §4.1: where it comes from and what Table 1 reports."""
  hub: str  # The paper's footnote (hub id, or hf:// file for ShareGPT).
  format: str  # Record format of the source ('' = detect from the fields).
  table1: int  # Training examples in Table 1.
  what: str  # For messages and the manifest.
  per_task: bool = False  # P3: sample `per_task` examples from every subset first.


PAPER = {
    'math': PaperSource('TIGER-Lab/MathInstruct', 'alpaca', 26_200, 'MathInstruct (Yue et al.)'),
    'medicine': PaperSource('casey-martin/MedInstruct', '', 5_200, 'MedInstruct (Zhang et al.)'),
    'general': PaperSource(
        'hf://datasets/anon8231489123/ShareGPT_Vicuna_unfiltered/'
        'ShareGPT_V3_unfiltered_cleaned_split.json', 'sharegpt', 9_300, 'ShareGPT'),
    'nlp': PaperSource('bigscience/P3', 'inputs_targets', 62_600, 'P3 (Sanh et al.)',
                       per_task=True),
}
_TABLE_EXTENSIONS = ('.parquet', '.jsonl', '.json', '.arrow')
# P3 subsets store text under these columns; *_pretokenized are the strings.
_P3_COLUMNS = (('inputs_pretokenized', 'targets_pretokenized'), ('inputs', 'targets'))


def _rng(seed: int, *names: str) -> np.random.Generator:
  """A generator seeded by the seed and names (dataset, P3 task): independent per dataset."""
  return np.random.default_rng(
      np.random.SeedSequence([abs(int(seed))] + [zlib.crc32(n.encode()) for n in names]))


def _missing(name: str, source: str, why: str) -> FileNotFoundError:
  return FileNotFoundError(
      f'dataset {name!r} ({PAPER[name].what}): cannot read {source} ({why}). Download it and '
      f'pass --source {name}=PATH (see README "Reproducing the paper").')


# ---- reading the sources -------------------------------------------------------------------

def _hub_records(name: str, source: str) -> list[dict]:
  import datasets  # pylint: disable=g-import-not-at-top
  try:
    if source.startswith('hf://'):
      return datasets.load_dataset('json', data_files=source, split='train').to_list()
    return datasets.load_dataset(source, split='train').to_list()
  except Exception as e:  # pylint: disable=broad-except
    raise _missing(name, source, f'{type(e).__name__}: {e}') from None


def _read_plain(name: str, source: str, local: bool) -> list[dict]:
  if not local:
    return _hub_records(name, source)
  if not os.path.exists(os.path.expanduser(source)):
    raise _missing(name, source, 'no such file or folder')
  return sources.load_records(name, source, 'train').rows


def _task_files(folder: str) -> list[str]:
  """A P3 subset's train files: `<task>/train*.{parquet,jsonl,...}` or `<task>/train/*`."""
  found = []
  for f in sorted(glob.glob(os.path.join(folder, '**', '*'), recursive=True)):
    rel = os.path.relpath(f, folder).split(os.sep)
    if os.path.isfile(f) and f.endswith(_TABLE_EXTENSIONS) and any(
        part.startswith('train') for part in rel):
      found.append(f)
  return found


def _rows_of_file(path: str) -> int:
  if path.endswith('.parquet'):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    return pq.ParquetFile(path).metadata.num_rows
  return -1  # Unknown without reading.


def _read_rows(path: str, wanted: np.ndarray, name: str) -> list[dict]:
  """Rows `wanted` (sorted, within this file) of one P3 file; parquet reads only their groups."""
  if path.endswith('.parquet'):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    pf = pq.ParquetFile(path)
    columns = next((list(c) for c in _P3_COLUMNS if set(c) <= set(pf.schema_arrow.names)), None)
    if columns is None:
      raise ValueError(f'dataset {name!r}: {path} has none of the columns '
                       f'{[list(c) for c in _P3_COLUMNS]}')
    starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows
                              for g in range(pf.num_row_groups)])
    groups = sorted(set(np.searchsorted(starts, wanted, side='right') - 1))
    table = pf.read_row_groups(groups, columns=columns)
    base = np.concatenate([np.arange(starts[g], starts[g + 1]) for g in groups])
    local = np.searchsorted(base, wanted)
    return table.take(local).to_pylist()
  rows = sources.load_records(name, path).rows
  return [rows[i] for i in wanted]


def _p3_pool(name: str, root: str, per_task: int, seed: int, log) -> list[dict]:
  """`per_task` random examples of every P3 subset under `root` (one folder per subset)."""
  if not os.path.isdir(os.path.expanduser(root)):
    raise _missing(name, root, 'not a folder with one sub-folder per P3 subset')
  root = os.path.expanduser(root)
  tasks = sorted(t for t in os.listdir(root) if os.path.isdir(os.path.join(root, t)))
  pool = []
  for task in tasks:
    files = _task_files(os.path.join(root, task))
    if not files:
      continue  # A subset without a train split.
    counts = [_rows_of_file(f) for f in files]
    if min(counts) < 0:  # JSON lines / arrow: read them all.
      rows = []
      for f in files:
        rows += sources.load_records(name, f).rows
      keep = np.sort(_rng(seed, name, task).permutation(len(rows))[:per_task])
      chosen = [rows[i] for i in keep]
    else:
      total = sum(counts)
      keep = np.sort(_rng(seed, name, task).permutation(total)[:per_task])
      starts = np.cumsum([0] + counts)
      chosen = []
      for k, f in enumerate(files):
        part = keep[(keep >= starts[k]) & (keep < starts[k + 1])] - starts[k]
        if len(part):
          chosen += _read_rows(f, part, name)
    for row in chosen:
      pool.append({'inputs': _p3_text(row, 0, name, task), 'targets': _p3_text(row, 1, name, task),
                   'task': task})
  if not pool:
    raise _missing(name, root, 'no P3 subset folder with train files (.parquet/.jsonl/.arrow) in '
                   "it; P3's own tfrecord files need converting first")
  log(f'{name}: {len(pool)} examples from {len(tasks)} P3 subsets ({per_task} per subset at most)')
  return pool


def _p3_text(row: dict, k: int, name: str, task: str) -> str:
  for cols in _P3_COLUMNS:
    value = row.get(cols[k])
    if isinstance(value, str):
      return value
  raise ValueError(f'dataset {name!r}: P3 subset {task!r} has no text column '
                   f'{_P3_COLUMNS[0][k]!r} or {_P3_COLUMNS[1][k]!r}')


# ---- the draw -------------------------------------------------------------------------------

def _conversations(name: str, rows: list[dict], fmt: str) -> tuple[list[dict], int]:
  """Rows -> `messages` records (P3 keeps its subset as `task`), and the count of unusable rows."""
  if not fmt:
    fields = set().union(*(r.keys() for r in rows[:100])) if rows else set()
    fmt = formats.detect_format(fields)
    if not fmt:
      raise ValueError(f'dataset {name!r}: cannot tell the format from fields {sorted(fields)}')
  out, bad = [], 0
  for row in rows:
    try:
      conv = formats.to_conversation(row, fmt)
    except formats.RecordError:
      bad += 1
      continue
    if not any(t['role'] == 'assistant' and t['content'].strip() for t in conv):
      bad += 1  # Nothing to train on.
      continue
    record = {'messages': conv}
    if 'task' in row:
      record['task'] = row['task']
    out.append(record)
  return out, bad


def split_indices(name: str, n: int, fraction: float, dev: int, seed: int, test: int = 0,
                  hashes=None):
  """Sorted train, dev and test indices of n records, seeded by (seed, name): a random
  int(fraction * n) for training, `dev` others for the dev set and `test` others for the test set.
  The dev set is the tail of the permutation, so it is the same for every fraction and test size
  (1.0 keeps all but the dev and test sets, e.g. as the pool for select). The test set is taken
  from the end of the rest, skipping records whose `hashes` (content) equal a train or dev one."""
  perm = _rng(seed, name).permutation(n)
  dev = min(dev, n - 1)
  test = min(test, n - dev - 1)
  k = min(int(fraction * n), n - dev - test)
  train, dev_idx = perm[:k], perm[n - dev:]
  hashes = hashes if hashes is not None else list(range(n))
  taken = {hashes[i] for i in train} | {hashes[i] for i in dev_idx}
  test_idx = []
  for i in perm[k:n - dev][::-1]:
    if len(test_idx) == test:
      break
    if hashes[i] not in taken:
      test_idx.append(i)
      taken.add(hashes[i])
  return np.sort(train), np.sort(dev_idx), np.sort(np.asarray(test_idx, np.int64))


def _hub_revision(source: str) -> str | None:
  """The hub commit of a dataset repo when the network allows; None otherwise."""
  try:
    from huggingface_hub import HfApi  # pylint: disable=g-import-not-at-top
    repo = source[len('hf://datasets/'):].split('/')[:2] if source.startswith('hf://') else None
    return HfApi().dataset_info('/'.join(repo) if repo else source).sha
  except Exception:  # pylint: disable=broad-except
    return None


def prepare_paper(out: str, seed: int = 0, local_sources: dict[str, str] | None = None,
                  fraction: float = 0.1, dev: int = 1000, per_task: int = 1000,
                  names=None, log: Callable[[str], None] = print,
                  test: int | None = None) -> dict:
  """Writes OUT/<name>/{train,dev,test}.jsonl and OUT/manifest.json for the paper's datasets
  (test=None: as many test examples as dev)."""
  test = dev if test is None else test
  if test < 0 or dev < 0:
    raise ValueError(f'--dev and --test must be >= 0, got {dev} and {test}')
  local_sources = dict(local_sources or {})
  unknown = sorted(set(local_sources) - set(PAPER))
  if unknown:
    raise ValueError(f'--source names unknown dataset(s) {unknown}; the paper has {list(PAPER)}')
  if not 0 < fraction <= 1:
    raise ValueError(f'--fraction must be in (0, 1], got {fraction}')
  names = list(names or PAPER)
  if set(names) - set(PAPER):
    raise ValueError(f'unknown dataset(s) {sorted(set(names) - set(PAPER))}; the paper has '
                     f'{list(PAPER)}')
  for name in names:  # Fail before any long read when a local copy is missing.
    if name in local_sources and not os.path.exists(os.path.expanduser(local_sources[name])):
      raise _missing(name, local_sources[name], 'no such file or folder')
    if PAPER[name].per_task and name not in local_sources:
      raise _missing(name, PAPER[name].hub, 'P3 is read from a local copy, one folder per subset')
  manifest = {'seed': seed, 'fraction': fraction, 'dev': dev, 'test': test,
              'p3_per_task': per_task,
              'format': 'messages', 'datasets': {}}
  for name in names:
    spec = PAPER[name]
    local = name in local_sources
    source = local_sources.get(name, spec.hub)
    if spec.per_task:
      if not local:
        raise _missing(name, spec.hub, 'P3 is read from a local copy, one folder per subset')
      rows = _p3_pool(name, source, per_task, seed, log)
    else:
      rows = _read_plain(name, source, local)
    records, bad = _conversations(name, rows, spec.format)
    del rows
    hashes = [json.dumps(r['messages'], sort_keys=True) for r in records]
    train_idx, dev_idx, test_idx = split_indices(name, len(records), fraction, dev, seed, test,
                                                 hashes)
    folder = os.path.join(out, name)
    os.makedirs(folder, exist_ok=True)
    sha = {split: jsonl.write(os.path.join(folder, f'{split}.jsonl'),
                              (records[i] for i in idx))
           for split, idx in (('train', train_idx), ('dev', dev_idx), ('test', test_idx))}
    manifest['datasets'][name] = {
        'source': source, 'local': local,
        'revision': None if local else _hub_revision(source),
        'records': len(records) + bad, 'unusable_records': bad, 'pool': len(records),
        'train': len(train_idx), 'dev': len(dev_idx), 'test': len(test_idx),
        'table1_train': spec.table1,
        'files': {f'{name}/{split}.jsonl': {'sha256': sha[split]} for split in sha},
    }
    log(f'{name}: {len(train_idx)} train (Table 1: {spec.table1}), {len(dev_idx)} dev, '
        f'{len(test_idx)} test, '
        f'from {len(records)} usable records of {source}')
  with open(os.path.join(out, 'manifest.json'), 'w', encoding='utf-8') as f:
    f.write(json.dumps(manifest, indent=2, sort_keys=True) + '\n')
  return manifest


def table(manifest: dict) -> str:
  """Counts next to Table 1's."""
  lines = [f'{"dataset":<10}{"train":>10}{"Table 1":>10}{"dev":>7}{"test":>7}{"pool":>10}  source']
  for name, m in manifest['datasets'].items():
    lines.append(f'{name:<10}{m["train"]:>10,}{m["table1_train"]:>10,}{m["dev"]:>7,}'
                 f'{m.get("test", 0):>7,}{m["pool"]:>10,}  {m["source"]}')
  total = sum(m['train'] for m in manifest['datasets'].values())
  table1 = sum(m['table1_train'] for m in manifest['datasets'].values())
  lines.append(f'{"total":<10}{total:>10,}{table1:>10,}')
  return '\n'.join(lines)
