"""mixing.unit: a mixture probability counts examples (the paper), tokens or packed rows; the loader
turns p into row draws so that each dataset's share of the drawn units is p."""

import os
import sys

import numpy as np
import pytest

from mos_jax.config import check as config_check
from mos_jax.data import build_data
from mos_jax.mixing import prior_probs

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from test_data_common import char_tokenizer, pr, small_config, write_jsonl  # noqa: E402  # pylint: disable=g-import-not-at-top,wrong-import-position

# Short examples (~40 tokens with the chat template) pack ~6 per 256-token row, long ones (~190)
# one: rows and examples disagree.
SHAPES = {'short': (120, 1), 'mid': (60, 60), 'long': (40, 150)}


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp('units')
  tok_dir = char_tokenizer(str(root / 'tok'))
  paths = {name: write_jsonl(str(root / f'{name}.jsonl'),
                             [pr(f'q{i}', 'z' * (width + i % 3)) for i in range(n)])
           for name, (n, width) in SHAPES.items()}
  return tok_dir, paths


def _data(files, unit, **kw):
  tok_dir, paths = files
  kw.setdefault('batch_size', 8)
  kw.setdefault('max_len', 256)
  config = small_config(tok_dir, paths, packing=kw.pop('packing', True), **kw)
  config.mixing.unit = unit
  return build_data(config)


def _drawn(data, steps):
  """(examples drawn, tokens drawn) per dataset over `steps` training batches."""
  tokens = np.zeros(len(data.names))
  for _ in range(steps):
    batch = next(data.train)
    for i in range(len(data.names)):
      tokens[i] += (batch['segment_ids'][batch['dataset_ids'] == i] > 0).sum()
  return np.asarray(data.train.get_state()['examples'], np.float64), tokens


def _prop(data):
  return prior_probs(data.unit_sizes(), 1.0)


@pytest.mark.slow
def test_prop_over_examples_visits_every_dataset_for_the_same_epochs(files):
  data = _data(files, 'example', mix_per='example', batch_size=64)
  data.train.set_probabilities(_prop(data))
  examples, _ = _drawn(data, 800)  # 51,200 row draws: each share within ~0.6% (one sd).
  epochs = examples / np.asarray(data.sizes)
  assert epochs.max() / epochs.min() < 1.03, epochs
  # Drawing rows with p itself (the meaning before mixing.unit) is far from that.
  rows = _data(files, 'row', mix_per='example')
  rows.train.set_probabilities(_prop(rows))
  epochs_rows = _drawn(rows, 300)[0] / np.asarray(rows.sizes)
  assert epochs_rows.max() / epochs_rows.min() > 2, epochs_rows
  data.close()
  rows.close()


def test_draw_distribution_divides_p_by_units_per_row(files):
  data = _data(files, 'example')
  p = np.array([0.5, 0.3, 0.2])
  data.train.set_probabilities(p)
  plans = [rows.plan for rows in data.train.train_streams]
  u = np.array([plan.examples_per_epoch / plan.rows_in_epoch(0) for plan in plans])
  np.testing.assert_allclose(data.train.draw_probabilities(), (p / u) / (p / u).sum())
  np.testing.assert_allclose(data.train.get_state()['draw'], (p / u) / (p / u).sum())
  short, long = data.names.index('short'), data.names.index('long')
  assert u[short] > 4 * u[long]  # The short answers do pack many per row.
  data.close()


def test_token_unit_gives_token_shares_proportional_to_token_counts(files):
  data = _data(files, 'token', mix_per='example')
  sizes = np.asarray(data.unit_sizes(), np.float64)
  data.train.set_probabilities(prior_probs(sizes, 1.0))
  _, tokens = _drawn(data, 1500)
  np.testing.assert_allclose(tokens / tokens.sum(), sizes / sizes.sum(), rtol=0.03)
  data.close()


@pytest.mark.parametrize('mix_per', ['batch', 'example'])
def test_without_packing_examples_and_rows_draw_the_same_batches(files, mix_per):
  runs = [_data(files, unit, packing=False, mix_per=mix_per) for unit in ('example', 'row')]
  for data in runs:
    data.train.set_probabilities([0.2, 0.5, 0.3])
  for _ in range(40):
    a, b = (next(data.train) for data in runs)
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  for data in runs:
    data.close()


def test_position_restores_the_draws_and_the_example_count(files):
  data = _data(files, 'example', mix_per='example')
  data.train.set_probabilities([0.2, 0.5, 0.3])
  for _ in range(7):
    next(data.train)
  state = data.train.get_state()
  want = [next(data.train)['example_ids'] for _ in range(5)]
  other = _data(files, 'example', mix_per='example')
  other.train.set_state(state)
  assert other.train.get_state() == state
  got = [next(other.train)['example_ids'] for _ in range(5)]
  for w, g in zip(want, got):
    np.testing.assert_array_equal(w, g)
  legacy = {k: v for k, v in state.items() if k not in ('unit', 'draw', 'examples')}
  other.train.set_state(legacy)  # A position from before mixing.unit: examples are recounted.
  assert other.train.get_state()['examples'] == state['examples']
  data.close()
  other.close()


def test_bad_unit_is_named(files):
  tok_dir, paths = files
  config = small_config(tok_dir, paths)
  config.mixing.unit = 'sentence'
  with pytest.raises(ValueError, match="mixing.unit='sentence' must be 'example', 'token' or 'row'"):
    config_check.validate(config)


def test_a_dataset_without_units_is_refused_in_one_line_naming_it(files, tmp_path):
  """mixing.unit='token' with an empty dataset: nothing to measure, refused naming the dataset
  (before a model or a workdir exists)."""
  tok_dir, paths = files
  empty = write_jsonl(str(tmp_path / 'nothing.jsonl'), [])
  config = small_config(tok_dir, {'short': paths['short'], 'nothing': empty})
  config.mixing.unit = 'token'
  with pytest.raises(ValueError, match=r"dataset 'nothing' is empty") as info:
    build_data(config)
  assert '\n' not in str(info.value)
