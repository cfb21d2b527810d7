"""Reading raw records through Hugging Face `datasets`, remembering where each record came from.

A dataset path may be a json/jsonl/parquet/arrow file, a folder of such files, a folder written by
`save_to_disk`, or a hub id (loaded where the network allows). Every record keeps its file and
line (or row) so that a bad one can be named precisely.
"""

import bisect
import dataclasses
import glob
import json
import os

_DATA_EXTENSIONS = ('.jsonl', '.json', '.parquet', '.arrow')


@dataclasses.dataclass
class _Segment:
  file: str
  start: int  # Index of its first record among all records of the dataset.
  count: int
  lines: list[int] | None  # 1-based line of each record when known (JSON lines files).
  unit: str  # 'line' for JSON lines, 'record' for JSON arrays, 'row' for tables.


@dataclasses.dataclass
class Records:
  """The raw records of one dataset and where they came from."""
  rows: list[dict]
  segments: list[_Segment]
  skipped: int  # Malformed lines dropped under on_error='skip'.

  def where(self, index: int) -> str:
    """'file:line N' (or 'file record N' / 'row N') of record `index`."""
    k = bisect.bisect_right([s.start for s in self.segments], index) - 1
    seg = self.segments[k]
    offset = index - seg.start
    if seg.unit == 'line':
      if seg.lines is None:
        seg.lines = _nonblank_lines(seg.file)
      return f'{seg.file}:{seg.lines[offset]}'
    return f'{seg.file} {seg.unit} {offset}'


def _nonblank_lines(path: str) -> list[int]:
  with open(path, 'rb') as f:  # Bytes: a line with invalid UTF-8 still counts as a line.
    return [n for n, line in enumerate(f, 1) if line.strip()]


def _scan_json_lines(path: str, on_error: str) -> tuple[list[dict], list[int], int]:
  """Parses JSON lines ourselves: finds the bad line, or skips bad lines when asked."""
  rows, lines, skipped = [], [], 0
  with open(path, 'rb') as f:
    for n, raw in enumerate(f, 1):
      if not raw.strip():
        continue
      try:
        row = json.loads(_utf8(raw, path, n))
        if not isinstance(row, dict):
          raise ValueError(f'expected a JSON object, got {type(row).__name__}')
      except ValueError as e:
        if on_error == 'skip':
          skipped += 1
          continue
        if isinstance(e, _NotUtf8):
          raise
        raise ValueError(f'{path}:{n}: malformed JSON line ({e})') from None
      rows.append(row)
      lines.append(n)
  return rows, lines, skipped


class _NotUtf8(ValueError):
  """Bytes that are not UTF-8 text, with the file, line and column."""


def _utf8(raw: bytes, path: str, line: int) -> str:
  try:
    return raw.decode('utf-8')
  except UnicodeDecodeError as e:
    raise _NotUtf8(f'{path}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column '
                   f'{e.start + 1}); re-encode the file as UTF-8, or set data.on_error=skip to '
                   f'skip such lines') from None


def _first_bad_utf8(path: str) -> None:
  """Raises _NotUtf8 naming the first line of `path` that is not UTF-8 (a JSON array file)."""
  with open(path, 'rb') as f:
    for n, raw in enumerate(f, 1):
      _utf8(raw, path, n)


def _hf():
  # Imported on use: Grain worker processes import this package and never need `datasets`.
  import datasets  # pylint: disable=g-import-not-at-top
  return datasets


def _read_json(path: str, on_error: str) -> tuple[list[dict], _Segment, int]:
  with open(path, 'rb') as f:
    head = f.read(4096).lstrip()
  if not head:
    return [], _Segment(path, 0, 0, [], 'line'), 0
  if head.startswith(b'['):  # One JSON array of records (one bad byte spoils the whole array).
    try:
      with open(path, encoding='utf-8') as f:
        rows = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}:{e.lineno}: malformed JSON ({e.msg}, column {e.colno})') from None
    except UnicodeDecodeError:
      _first_bad_utf8(path)
      raise
    if not all(isinstance(r, dict) for r in rows):
      bad = next(k for k, r in enumerate(rows) if not isinstance(r, dict))
      raise ValueError(f'{path} record {bad}: expected a JSON object')
    return rows, _Segment(path, 0, len(rows), None, 'record'), 0
  hf = _hf()
  quiet = hf.utils.are_progress_bars_disabled()
  hf.disable_progress_bars()  # A bar per small local file is noise.
  try:
    table = hf.load_dataset('json', data_files=path, split='train')
    rows = table.to_list()
    return rows, _Segment(path, 0, len(rows), None, 'line'), 0
  except Exception:  # pylint: disable=broad-except
    # Arrow's reader reports neither the line nor lets us skip it (nor checks UTF-8 the same
    # way): find it ourselves.
    rows, lines, skipped = _scan_json_lines(path, on_error)
    return rows, _Segment(path, 0, len(rows), lines, 'line'), skipped
  finally:
    if not quiet:
      hf.enable_progress_bars()


def _read_table(path: str) -> list[dict]:
  if path.endswith('.parquet'):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    return _hf().Dataset(pq.read_table(path)).to_list()
  return _hf().Dataset.from_file(path).to_list()


def _data_files(folder: str, split: str) -> list[str]:
  files = sorted(f for f in glob.glob(os.path.join(folder, '**', '*'), recursive=True)
                 if f.endswith(_DATA_EXTENSIONS) and os.path.isfile(f))
  # Hub-style folders name files by split (train.jsonl, train-00000-of-00002.parquet).
  by_split = [f for f in files if os.path.basename(f).startswith(split)]
  return by_split or files


def _pick_split(loaded, split: str, name: str):
  if isinstance(loaded, _hf().DatasetDict):
    if split not in loaded:
      raise ValueError(f'dataset {name!r}: split {split!r} not found; it has {sorted(loaded)}')
    return loaded[split]
  return loaded


def _is_saved_dataset(folder: str) -> bool:
  return any(os.path.exists(os.path.join(folder, f))
             for f in ('dataset_dict.json', 'state.json', 'dataset_info.json'))


def load_records(name: str, path: str, split: str = 'train', max_examples: int = 0,
                 on_error: str = 'raise') -> Records:
  """Reads dataset `name` from `path`; errors name the dataset and, for bad records, the line."""
  if on_error not in ('raise', 'skip'):
    raise ValueError(f"data.on_error must be 'raise' or 'skip', got {on_error!r}")
  if not path:
    raise ValueError(f'dataset {name!r}: no path configured')
  local = os.path.expanduser(path)
  files: list[str] = []
  if os.path.isdir(local):
    if _is_saved_dataset(local):
      table = _pick_split(_hf().load_from_disk(local), split, name)
      rows = table.to_list()
      return _cap(Records(rows, [_Segment(local, 0, len(rows), None, 'row')], 0), max_examples)
    files = _data_files(local, split)
    if not files:
      raise ValueError(f'dataset {name!r}: folder {path} holds no {"/".join(_DATA_EXTENSIONS)} '
                       'files and is not a save_to_disk folder')
  elif os.path.isfile(local):
    files = [local]
  elif path.startswith(('/', '.', '~')) or path.count('/') > 1 or os.path.splitext(path)[1]:
    raise ValueError(f'dataset {name!r}: path {path} does not exist')
  else:
    try:
      table = _pick_split(_hf().load_dataset(path, split=split), split, name)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f'dataset {name!r}: {path} is not a local path and could not be loaded '
                       f'from the hub ({type(e).__name__}: {e})') from e
    rows = table.to_list()
    return _cap(Records(rows, [_Segment(path, 0, len(rows), None, 'row')], 0), max_examples)

  rows, segments, skipped = [], [], 0
  for f in files:
    if f.endswith(('.json', '.jsonl')):
      try:
        part, seg, bad = _read_json(f, on_error)
      except ValueError as e:
        raise ValueError(f'dataset {name!r}: {e}') from None
    elif f.endswith(('.parquet', '.arrow')):
      part, bad = _read_table(f), 0
      seg = _Segment(f, 0, len(part), None, 'row')
    else:
      raise ValueError(f'dataset {name!r}: {f} is not a {"/".join(_DATA_EXTENSIONS)} file')
    seg.start = len(rows)
    rows.extend(part)
    segments.append(seg)
    skipped += bad
    if max_examples and len(rows) >= max_examples:
      break
  return _cap(Records(rows, segments, skipped), max_examples)


def _cap(records: Records, max_examples: int) -> Records:
  if max_examples and len(records.rows) > max_examples:
    records.rows = records.rows[:max_examples]
  return records
