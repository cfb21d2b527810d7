"""JSON-lines files: reading a user's (prompts, questions) with errors that name the file and line,
and the one atomic writer every command that writes JSONL uses."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable, Iterator


def records(path: str, what: str) -> Iterator[tuple[int, object]]:
  """(line number, parsed JSON value) of every non-blank line of `path`, a `what` file.

  A missing file, bytes that are not UTF-8 and lines that are not JSON raise FileNotFoundError or
  ValueError naming `what`, the file and the line.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{what} {path} does not exist.')
  with open(path, 'rb') as f:
    for n, raw in enumerate(f, 1):
      if not raw.strip():
        continue
      try:
        yield n, json.loads(raw.decode('utf-8'))
      except UnicodeDecodeError as e:
        raise ValueError(f'{path}:{n}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column '
                         f'{e.start + 1}).') from None
      except json.JSONDecodeError as e:
        raise ValueError(f'{path}:{n}: not valid JSON ({e.msg}).') from None


def write(path: str, records: Iterable, sort_keys: bool = True) -> str:
  """Writes `records` as UTF-8 JSON lines, atomically (a reader never sees half a file); returns
  the file's sha256 (the manifests record it)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  digest = hashlib.sha256()
  tmp = path + '.tmp'
  with open(tmp, 'wb') as f:
    for record in records:
      line = (json.dumps(record, ensure_ascii=False, sort_keys=sort_keys) + '\n').encode('utf-8')
      digest.update(line)
      f.write(line)
  os.replace(tmp, path)
  return digest.hexdigest()
