"""The shipped recipes: each variant loads with the schema; the paper recipe is §4.1."""

import glob
import importlib.util
import json
import os

import pytest

from mos_jax.config import base_config, config_to_json
from mos_jax.config import recipes
from mos_jax.infra import cli

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _strict_json(line):
  def reject(constant):
    raise ValueError(f'non-standard JSON constant {constant}')
  return json.loads(line, parse_constant=reject)

RECIPES = sorted(glob.glob(os.path.join(REPO, 'configs', '*.py')))


def _variants(path):
  """`path:arg` for each arg in the recipe's VARIANTS, or just `path`."""
  module_spec = importlib.util.spec_from_file_location('recipe', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  variants = getattr(module, 'VARIANTS', None)
  return [f'{path}:{v}' for v in variants] if variants else [path]


def _keys(config, prefix=''):
  """Dotted keys, inner nodes included; entries under data.datasets are the recipe's own."""
  return {prefix + k for k in config.keys()} | {
      key for k, v in config.items() if hasattr(v, 'items') and k != 'datasets'
      for key in _keys(v, prefix + k + '.')}


def test_recipes_are_shipped():
  names = {os.path.basename(p) for p in RECIPES}
  assert names == {'demo.py', 'paper.py', 'mospec_math.py'}  # Variants: paper.py:<variant>.
  assert len(_variants(os.path.join(REPO, 'configs', 'paper.py'))) == 12  # 6 models x 2 rewards


@pytest.mark.parametrize('path', RECIPES, ids=os.path.basename)
def test_recipe_loads_with_the_schema(path):
  schema = _keys(base_config())
  for spec in _variants(path):
    config = cli.load_config(spec, ['--config.train.steps=3'])
    assert config.train.steps == 3, spec
    assert _keys(config) == schema, spec  # No recipe adds or drops keys.
    assert config.mixing.strategy in ('static', 'mos', 'mospec'), spec
    assert config.mixing.reward in ('cossim', 'diff'), spec
    assert config.data.datasets, spec
    assert not config.mixing.target or config.mixing.target in config.data.datasets, spec
    _strict_json(config_to_json(config))


def test_paper_recipe_matches_section_4_1():
  config = cli.load_config(os.path.join(REPO, 'configs', 'paper.py:llama-diff'))
  assert config.train.epochs == 3 and config.train.steps == 4843  # ceil(3 * 103,300 / 64)
  # Batches of 8 packed 2048-token rows: about §4.1's 64 examples of Table 1's mean length.
  assert (config.train.lr, config.train.batch_size, config.train.warmup_fraction) == (1e-5, 8, 0.1)
  assert config.data.packing and config.data.reward_batch_size == 8
  assert (config.mixing.update_every, config.mixing.scorer_lr) == (100, 1e-4)
  assert config.mixing.reward == 'diff' and config.mixing.prior_temperature == float('inf')
  assert set(config.data.datasets) == set(recipes.PAPER_SIZES)
  assert config.data.root == 'data/paper'  # python -m mos_jax.data.prepare paper --out data/paper
  assert config.data.datasets.math.path == 'math/train.jsonl'
  assert config.data.datasets.math.dev_path == 'math/dev.jsonl'
  with pytest.raises(ValueError, match='llama-cossim'):
    recipes.paper_config_from_arg('llama-cosine')
