"""data.draws='balanced': each dataset's rows (or batches) drawn so far stay within about one of their
expected number, sum over steps of d_t times the rows of the step, whatever p does meanwhile."""

import numpy as np
import pytest

from mos_jax.config import check as config_check
from mos_jax.mixing import prior_probs
from test_data_common import small_config
from test_units import _data, files  # noqa: F401  # pylint: disable=unused-import


def _rows_per_dataset(batch, n):
  return np.bincount(np.asarray(batch['dataset_ids']).reshape(-1), minlength=n)


@pytest.mark.parametrize('mix_per', ['example', 'batch'])
def test_drawn_rows_track_their_expected_count_while_p_moves(files, mix_per):  # noqa: F811
  data = _data(files, 'example', mix_per=mix_per, draws='balanced')
  n, width, rng = len(data.names), 8, np.random.default_rng(0)
  expected, drawn, gaps = np.zeros(n), np.zeros(n), []
  for step in range(300):
    if step % 25 == 0:  # A learned mixture moves every few steps.
      data.train.set_probabilities(rng.dirichlet(np.ones(n)))
    d = data.train.draw_probabilities()
    rows = _rows_per_dataset(next(data.train), n)
    expected += d * (width if mix_per == 'example' else 1)
    drawn += rows if mix_per == 'example' else (rows > 0)
    gaps.append(expected - drawn)
  gaps = np.asarray(gaps)
  assert gaps.min() > -1 and gaps.max() < 1.5, (gaps.min(), gaps.max())
  data.close()


def test_prop_visits_every_dataset_for_the_same_epochs_in_a_short_run(files):  # noqa: F811
  runs = {draws: _data(files, 'example', mix_per='example', draws=draws)
          for draws in ('balanced', 'random')}
  spread = {}
  for draws, data in runs.items():
    data.train.set_probabilities(prior_probs(data.unit_sizes(), 1.0))
    for _ in range(60):
      next(data.train)
    epochs = np.asarray(data.train.get_state()['examples'], np.float64) / np.asarray(data.sizes)
    spread[draws] = epochs.max() / epochs.min()
    data.close()
  assert spread['balanced'] < 1.03, spread
  assert spread['random'] > spread['balanced'], spread


def test_position_with_credits_resumes_the_same_batches(files):  # noqa: F811
  data = _data(files, 'example', mix_per='example', draws='balanced')
  data.train.set_probabilities([0.2, 0.5, 0.3])
  for _ in range(7):
    next(data.train)
  state = data.train.get_state()
  assert any(c != 0 for c in state['credit'])
  want = [next(data.train)['example_ids'] for _ in range(6)]
  other = _data(files, 'example', mix_per='example', draws='balanced')
  other.train.set_state(state)
  got = [next(other.train)['example_ids'] for _ in range(6)]
  for w, g in zip(want, got):
    np.testing.assert_array_equal(w, g)
  data.close()
  other.close()


def test_bad_draws_is_named(files):  # noqa: F811
  tok_dir, paths = files
  config = small_config(tok_dir, paths)
  config.data.draws = 'stratified'
  with pytest.raises(ValueError, match="data.draws='stratified' must be 'random' or 'balanced'"):
    config_check.validate(config)
