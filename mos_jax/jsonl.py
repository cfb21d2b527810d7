"""Reading a user's JSON-lines file (prompts, questions) with errors that name the file and line."""

from __future__ import annotations

import json
import os
from typing import Iterator


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
