"""mixture.png and loss.png from metrics.jsonl, full or partial."""

import os

from mos_jax.workdir.metrics import MetricsWriter
from mos_jax.workdir.plots import write_plots


def _is_png(path):
  with open(path, 'rb') as f:
    return f.read(8) == b'\x89PNG\r\n\x1a\n' and os.path.getsize(path) > 1000


def test_plots_from_full_metrics(tmp_path):
  with MetricsWriter(str(tmp_path)) as w:
    for step in range(0, 200, 10):
      scalars = {'train/loss': 2.0 - step / 200, 'mixture/math': 0.5 + step / 1000,
                 'mixture/chat': 0.5 - step / 1000}
      if step % 100 == 0:
        scalars.update({'eval/math/loss': 2.0, 'eval/chat/loss': float('nan')})
      w.write(step, scalars)
  written = write_plots(str(tmp_path))
  assert sorted(os.path.basename(p) for p in written) == ['loss.png', 'mixture.png']
  assert all(_is_png(p) for p in written)


def test_plots_with_partial_metrics(tmp_path):
  assert write_plots(str(tmp_path)) == []  # No metrics yet: nothing to draw.
  with MetricsWriter(str(tmp_path)) as w:
    w.write(0, {'train/loss': 3.0})
    w.write(10, {'train/loss': 2.5})
  assert [os.path.basename(p) for p in write_plots(str(tmp_path))] == ['loss.png']
  assert _is_png(tmp_path / 'loss.png') and not (tmp_path / 'mixture.png').exists()
