"""Background prefetching changes no batch: the same metrics as an inline loader, draws wait for
the mixture changes they must see, and checkpoints get the position of the last batch taken."""

import json
import os

import pytest

from mos_jax.workdir import metrics as metrics_lib
from mos_jax import training
from mos_jax.data import prefetch
from demo_run import demo_config


class _Loader:
  """Yields (draw index, current setting); its state is the draw count."""

  def __init__(self):
    self.draws, self.setting = 0, 'a'

  def __next__(self):
    self.draws += 1
    return (self.draws, self.setting)

  def get_state(self):
    return {'draws': self.draws, 'setting': self.setting}


@pytest.mark.parametrize('depth', [0, 1, 3])
def test_draws_wait_for_the_loop_after_hold_steps(depth):
  loader = _Loader()
  feed = prefetch.Prefetcher(loader, lambda b: b, first_step=1, last_step=6, depth=depth,
                             hold_after=lambda step: step == 2)
  got = []
  for step in range(1, 7):
    got.append(feed.next(step))
    if step == 2:
      loader.setting = 'b'  # What the loop does between steps: a new mixture.
      feed.resume()
    # The position after the last batch taken (not the prefetched one), with the loop's change.
    assert json.loads(feed.get_state()) == {'draws': step, 'setting': 'a' if step < 2 else 'b'}
  feed.close()
  assert got == [(1, 'a'), (2, 'a'), (3, 'b'), (4, 'b'), (5, 'b'), (6, 'b')]
  assert loader.draws == 6  # Nothing drawn past the last step.


def test_worker_errors_reach_the_loop():
  class Broken(_Loader):
    def __next__(self):
      raise ValueError('bad record')
  feed = prefetch.Prefetcher(Broken(), lambda b: b, first_step=1, last_step=3, depth=2)
  with pytest.raises(ValueError, match='bad record'):
    feed.next(1)
  feed.close()


def _lines(workdir):
  rows = metrics_lib.read_metrics(os.path.join(workdir, 'metrics.jsonl'))
  perf = [r for r in rows if 'perf/data_wait_fraction' in r]
  assert perf and all(0 <= r['perf/data_wait_fraction'] <= 1 for r in perf)
  assert all(0 < r['perf/real_token_fraction'] <= 1 for r in perf)
  return [{k: v for k, v in r.items() if not k.startswith('perf/')} for r in rows]


def test_training_with_and_without_prefetch_gives_identical_metrics(tmp_path):
  lines = {}
  for depth in (0, 2):
    config = demo_config(tmp_path, train__steps=8, train__log_every=2, train__eval_every=4,
                         train__eval_batches=1, train__checkpoint_every=0, data__prefetch=depth,
                         mixing__update_every=3)
    workdir = str(tmp_path / f'depth{depth}')
    training.train(training.build(config, workdir))
    lines[depth] = _lines(workdir)
  assert lines[0] == lines[2]
  assert sum('reward/' in k for line in lines[2] for k in line) >= 3  # Scorer moved at 1, 4, 7.
