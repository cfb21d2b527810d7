"""Reading and writing .safetensors files one tensor at a time, with numpy (bfloat16 included).

Format: 8-byte little-endian header length n, n bytes of JSON {name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {...}}, then the raw little-endian tensor bytes
(offsets relative to the end of the header). The `safetensors` package's numpy backend cannot
return bfloat16, so this small reader/writer is ours.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Callable, Iterable, Mapping

import ml_dtypes
import numpy as np

_DTYPES = {
    'F64': np.dtype(np.float64),
    'F32': np.dtype(np.float32),
    'F16': np.dtype(np.float16),
    'BF16': np.dtype(ml_dtypes.bfloat16),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsError(ValueError):
  """A .safetensors file is truncated, corrupt, or holds something we cannot read."""


class SafetensorsReader:
  """Parses and checks the header on construction; `read(name)` reads only that tensor's bytes."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    if not os.path.isfile(self.path):
      raise FileNotFoundError(f'Safetensors file not found: {self.path}')
    size = os.path.getsize(self.path)
    try:
      with open(self.path, 'rb') as f:
        raw = f.read(8)
        if len(raw) < 8:
          raise SafetensorsError('file is shorter than the 8-byte header length')
        (n,) = struct.unpack('<Q', raw)
        if n > size - 8:
          raise SafetensorsError(f'header length {n} exceeds the file size {size}')
        header = json.loads(f.read(n))
      if not isinstance(header, dict):
        raise SafetensorsError('header is not a JSON object')
      self.metadata = header.pop('__metadata__', None) or {}
      self._data_start = 8 + n
      self._entries = {name: self._check_entry(name, e, size - self._data_start)
                       for name, e in header.items()}
    except SafetensorsError as e:
      raise SafetensorsError(f'Corrupt safetensors file {self.path}: {e}') from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise SafetensorsError(f'Corrupt safetensors file {self.path}: bad JSON header ({e})') from None

  @staticmethod
  def _check_entry(name, entry, data_size):
    try:
      dtype, shape, (begin, end) = entry['dtype'], tuple(entry['shape']), entry['data_offsets']
    except (KeyError, TypeError, ValueError):
      raise SafetensorsError(f'tensor {name!r} has a malformed header entry {entry!r}') from None
    if dtype not in _DTYPES:
      raise SafetensorsError(f'tensor {name!r} has dtype {dtype}; readable: {sorted(_DTYPES)}')
    nbytes = math.prod(shape) * _DTYPES[dtype].itemsize
    if not 0 <= begin <= end <= data_size or end - begin != nbytes:
      raise SafetensorsError(
          f'tensor {name!r} ({dtype} {list(shape)}) has data offsets [{begin}, {end}] that do not '
          f'fit its size {nbytes} or the {data_size} data bytes (truncated file?)')
    return _DTYPES[dtype], shape, begin

  def keys(self) -> list[str]:
    return list(self._entries)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._entries[name][1]

  def read(self, name: str) -> np.ndarray:
    dtype, shape, begin = self._entries[name]
    count = math.prod(shape)
    array = np.fromfile(self.path, dtype=dtype, count=count, offset=self._data_start + begin)
    if array.size != count:
      raise SafetensorsError(f'Corrupt safetensors file {self.path}: tensor {name!r} is truncated')
    return array.reshape(shape)


def write_safetensors(path: str | os.PathLike, specs: Iterable[tuple[str, np.dtype, tuple]],
                      produce: Callable[[str], np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
  """Writes tensors named in `specs` (name, dtype, shape), asking `produce(name)` for each in turn.

  The header is computed from the specs first, so only one tensor is in host memory at a time.
  """
  specs = list(specs)
  header, offset = {}, 0
  for name, dtype, shape in specs:
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    header[name] = {'dtype': _NAMES[np.dtype(dtype)], 'shape': list(shape),
                    'data_offsets': [offset, offset + nbytes]}
    offset += nbytes
  if metadata:
    header['__metadata__'] = dict(metadata)
  blob = json.dumps(header, separators=(',', ':')).encode()
  blob += b' ' * (-len(blob) % 8)  # Pad so that the data starts 8-byte aligned.
  with open(path, 'wb') as f:
    f.write(struct.pack('<Q', len(blob)))
    f.write(blob)
    for name, dtype, shape in specs:
      array = np.ascontiguousarray(produce(name))
      if array.dtype != np.dtype(dtype) or array.shape != tuple(shape):
        raise ValueError(f'{name}: produced {array.dtype} {array.shape}, declared {dtype} {shape}')
      f.write(array.tobytes())
