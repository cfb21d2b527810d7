"""Run metrics: one JSON object per logged step in `metrics.jsonl`, the same scalars in TensorBoard.

Only process 0 writes (`enabled=False` elsewhere creates no files). `resume_step=k` keeps the lines
with step <= k and drops later ones (written after the checkpoint the run resumes from), so a resumed
run's file equals an uninterrupted run's; `resume_step=None` (a fresh run) starts an empty file.
"""

import json
import math
import os
from typing import Any, Mapping

import numpy as np

METRICS_FILE = 'metrics.jsonl'
TB_DIR = 'tb'


def _to_float(value: Any) -> float:
  """numpy/jax scalars and 0-d arrays -> Python float."""
  return float(np.asarray(value).item())


def _json_value(x: float) -> float | str:
  # json.dumps writes NaN/Infinity, which strict JSON readers reject: store them as strings.
  if math.isfinite(x):
    return x
  return 'nan' if math.isnan(x) else ('inf' if x > 0 else '-inf')


def _from_json(value: Any) -> Any:
  if value in ('nan', 'inf', '-inf'):
    return float(value)
  return value


def read_metrics(path: str) -> list[dict[str, Any]]:
  """All lines of a metrics.jsonl (or of `path/metrics.jsonl` for a run folder); [] if absent.

  Non-finite values come back as floats. A torn last line (crash mid-write) is ignored.
  """
  if os.path.isdir(path):
    path = os.path.join(path, METRICS_FILE)
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      rows.append({k: _from_json(v) for k, v in row.items()})
  return rows


class MetricsWriter:
  """Appends `{'step': s, name: value, ...}` to metrics.jsonl and to TensorBoard under tb/."""

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int | None = None):
    self.enabled = enabled
    self._path = os.path.join(workdir, METRICS_FILE)
    self._file = None
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._truncate(resume_step)
    self._file = open(self._path, 'a', buffering=1)  # Line-buffered: whole lines reach disk.
    # Imported here so processes other than 0 never touch TensorBoard.
    from tensorboardX import SummaryWriter
    # purge_step hides events of the abandoned run past the restored step (or all, when fresh).
    self._tb = SummaryWriter(os.path.join(workdir, TB_DIR),
                             purge_step=0 if resume_step is None else resume_step + 1)

  def _truncate(self, resume_step: int | None) -> None:
    """Keeps the lines with step <= resume_step; a fresh run (None) starts an empty file."""
    if not os.path.exists(self._path):
      return
    kept = [] if resume_step is None else [
        r for r in read_metrics(self._path) if r['step'] <= resume_step]
    tmp = self._path + '.tmp'
    with open(tmp, 'w') as f:
      for row in kept:
        f.write(_dumps(row))
    os.replace(tmp, self._path)

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Logs the scalars of one step (one jsonl line); a no-op when disabled."""
    if not self.enabled:
      return
    values = {k: _to_float(v) for k, v in scalars.items()}
    self._file.write(_dumps({'step': int(step), **values}))
    for name, x in values.items():
      self._tb.add_scalar(name, x, int(step))

  def flush(self) -> None:
    if self.enabled:
      self._file.flush()
      self._tb.flush()

  def close(self) -> None:
    if self.enabled and self._file is not None:
      self._file.close()
      self._tb.close()
      self._file = self._tb = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _dumps(row: Mapping[str, Any]) -> str:
  return json.dumps({k: _json_value(v) if isinstance(v, float) else v
                     for k, v in row.items()}, allow_nan=False) + '\n'
