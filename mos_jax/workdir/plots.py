"""Run plots from metrics.jsonl: `mixture.png` (paper Figure 2) and `loss.png` (Figure 3).

Missing series (no dev evaluation yet, a static mixture that logs nothing) are left out; a plot
with nothing to show is not written.
"""

import os

import matplotlib

matplotlib.use('Agg')  # No display on training hosts.
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

from mos_jax.workdir.metrics import read_metrics


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of the rows that logged `key`."""
  points = [(r['step'], r[key]) for r in rows if r.get(key) is not None]
  return [s for s, _ in points], [v for _, v in points]


def _names(rows: list[dict], prefix: str, suffix: str = '') -> list[str]:
  """Dataset names appearing as `prefix<name>suffix`, in first-seen order."""
  names = {}
  for row in rows:
    for key in row:
      if key.startswith(prefix) and key.endswith(suffix):
        names[key[len(prefix):len(key) - len(suffix)]] = None
  return list(names)


def _plot_mixture(rows: list[dict], path: str) -> bool:
  names = _names(rows, 'mixture/')
  if not names:
    return False
  fig, ax = plt.subplots(figsize=(6, 4))
  for name in names:
    ax.plot(*_series(rows, f'mixture/{name}'), label=name)
  ax.set_ylim(0, 1)
  ax.set_xlabel('step')
  ax.set_ylabel('sampling probability')
  ax.set_title('Dataset distribution')
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return True


def _plot_loss(rows: list[dict], path: str) -> bool:
  train = _series(rows, 'train/loss')
  names = _names(rows, 'eval/', '/loss')
  if not train[0] and not names:
    return False
  fig, (ax_train, ax_dev) = plt.subplots(1, 2, figsize=(10, 4))
  if train[0]:
    ax_train.plot(*train, label='train')
  ax_train.set_title('Training loss')
  for name in names:
    ax_dev.plot(*_series(rows, f'eval/{name}/loss'), marker='o', label=name)
  ax_dev.set_title('Dev loss per dataset')
  for ax in (ax_train, ax_dev):
    ax.set_xlabel('step')
    ax.set_ylabel('loss')
    if ax.get_legend_handles_labels()[0]:
      ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return True


def write_plots(workdir: str) -> list[str]:
  """Writes mixture.png and loss.png into workdir from its metrics.jsonl; returns the paths written."""
  rows = read_metrics(workdir)
  written = []
  for name, plot in (('mixture.png', _plot_mixture), ('loss.png', _plot_loss)):
    path = os.path.join(workdir, name)
    if plot(rows, path):
      written.append(path)
  return written
