"""Run infrastructure: metrics file and resume, plots, checkpoints, recipes, config CLI, docs."""

import glob
import importlib.util
import json
import os
import subprocess
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mos_jax.infra import cli
from mos_jax import config_doc
from mos_jax.config import recipes
from mos_jax.workdir.checkpoint import Checkpointer
from mos_jax.infra.sharding import sharded_abstract
from mos_jax.config import base_config, config_to_json
from mos_jax.workdir.metrics import MetricsWriter, read_metrics
from mos_jax.workdir.plots import write_plots

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _strict_json(line):
  def reject(constant):
    raise ValueError(f'non-standard JSON constant {constant}')
  return json.loads(line, parse_constant=reject)


def _log(writer, steps):
  for step in steps:
    writer.write(step, {'train/loss': np.float32(1.0 / (step + 1)),
                        'mixture/math': jnp.asarray(0.25 + step / 1000),
                        'reward/math': float('nan') if step == 20 else step * 0.5})


# --- metrics -------------------------------------------------------------------------------------

def test_metrics_resume_equals_uninterrupted_run(tmp_path):
  straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
  with MetricsWriter(str(straight)) as w:
    _log(w, range(0, 60, 10))
  # The interrupted run logged up to 40, but its last checkpoint is step 20.
  with MetricsWriter(str(resumed)) as w:
    _log(w, range(0, 50, 10))
  with MetricsWriter(str(resumed), resume_step=20) as w:
    assert [r['step'] for r in read_metrics(str(resumed))] == [0, 10, 20]
    _log(w, range(30, 60, 10))

  text = (straight / 'metrics.jsonl').read_text()
  assert (resumed / 'metrics.jsonl').read_text() == text
  rows = [_strict_json(line) for line in text.splitlines()]
  assert [r['step'] for r in rows] == [0, 10, 20, 30, 40, 50]
  assert rows[2]['reward/math'] == 'nan'
  assert np.isnan(read_metrics(str(straight))[2]['reward/math'])
  assert read_metrics(str(straight))[1]['mixture/math'] == pytest.approx(0.26)
  assert glob.glob(str(straight / 'tb' / 'events.out.tfevents.*'))


def test_fresh_run_starts_a_new_metrics_file(tmp_path):
  with MetricsWriter(str(tmp_path)) as w:
    _log(w, [0, 10])
  with MetricsWriter(str(tmp_path)) as w:  # No checkpoint: the run starts over.
    _log(w, [0])
  assert [r['step'] for r in read_metrics(str(tmp_path))] == [0]


def test_disabled_writer_creates_no_files(tmp_path):
  workdir = tmp_path / 'run'
  with MetricsWriter(str(workdir), enabled=False) as w:
    _log(w, [0, 10])
    w.flush()
  assert not workdir.exists()


# --- plots ---------------------------------------------------------------------------------------

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


# --- checkpoints ---------------------------------------------------------------------------------

def _toy_iterator():
  return iter(grain.MapDataset.range(100).shuffle(seed=1).to_iter_dataset())


def _toy_state(offset):
  return {'w': jnp.arange(8.0).reshape(2, 4) + offset, 'opt': {'count': jnp.int32(offset)}}


def test_checkpoint_restores_state_meta_and_loader_position(tmp_path):
  it = _toy_iterator()
  with Checkpointer(str(tmp_path / 'ckpt'), keep=2, async_save=False) as ckpt:
    assert ckpt.latest_step() is None
    [next(it) for _ in range(7)]
    ckpt.save(7, _toy_state(7), it, {'names': ['a', 'b'], 'tau': 'inf'})
    expected = [next(it) for _ in range(5)]  # What the uninterrupted run reads next.
    assert ckpt.latest_step() == 7

    fresh = _toy_iterator()
    target = _toy_state(0)
    state, meta = ckpt.restore(
        7, sharded_abstract(target, jax.tree.map(lambda x: x.sharding, target)), fresh)
  assert [next(fresh) for _ in range(5)] == expected
  np.testing.assert_array_equal(state['w'], _toy_state(7)['w'])
  assert int(state['opt']['count']) == 7 and state['opt']['count'].dtype == jnp.int32
  assert meta == {'names': ['a', 'b'], 'tau': 'inf'}


def test_checkpoint_async_keeps_last_k(tmp_path):
  directory = tmp_path / 'ckpt'
  it = _toy_iterator()
  with Checkpointer(str(directory), keep=2, async_save=True) as ckpt:
    for step in (10, 20, 30):
      next(it)
      ckpt.save(step, _toy_state(step), it, {'step': step})
    ckpt.wait()
    assert ckpt.all_steps() == [20, 30]
    assert ckpt.read_meta() == {'step': 30}
  assert sorted(os.listdir(directory)) == ['20', '30']
  with Checkpointer(str(directory), keep=2) as again:  # A restarted run finds the latest.
    assert again.latest_step() == 30


def test_checkpoint_restores_onto_another_sharding(tmp_path):
  with Checkpointer(str(tmp_path / 'ckpt'), keep=1, async_save=False) as ckpt:
    ckpt.save(1, _toy_state(1), None, {})
    mesh = jax.make_mesh((1,), ('fsdp',), devices=jax.devices()[:1])
    target = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shardings = jax.tree.map(lambda _: target, _toy_state(0))
    state, _ = ckpt.restore(1, sharded_abstract(_toy_state(0), shardings))
  assert state['w'].sharding == target
  np.testing.assert_array_equal(state['w'], _toy_state(1)['w'])


_MESH_MOVE = """
import sys, jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from mos_jax.workdir.checkpoint import Checkpointer
from mos_jax.infra.sharding import sharded_abstract
four = jax.make_mesh((4,), ('fsdp',), devices=jax.devices()[:4])
w = jax.device_put(np.arange(32.0).reshape(8, 4), NamedSharding(four, P('fsdp')))
with Checkpointer(sys.argv[1], keep=1, async_save=True) as ckpt:
  ckpt.save(5, {'w': w}, None, {})
two = jax.make_mesh((2,), ('tensor',), devices=jax.devices()[4:6])
target = NamedSharding(two, P(None, 'tensor'))
with Checkpointer(sys.argv[1], keep=1) as ckpt:
  state, _ = ckpt.restore(5, sharded_abstract({'w': w}, {'w': target}))
assert state['w'].sharding == target, state['w'].sharding
assert {d.id for d in state['w'].devices()} == {4, 5}
np.testing.assert_array_equal(state['w'], np.arange(32.0).reshape(8, 4))
print('moved')
"""


def test_checkpoint_moves_between_meshes(tmp_path):
  env = {**os.environ, 'PYTHONPATH': REPO, 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  run = subprocess.run([sys.executable, '-c', _MESH_MOVE, str(tmp_path / 'ckpt')],
                       capture_output=True, text=True, env=env)
  assert run.returncode == 0 and 'moved' in run.stdout, run.stderr[-2000:]


# --- recipes and the config command line ---------------------------------------------------------

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
  assert len(_variants(os.path.join(REPO, 'configs', 'paper.py'))) == 6


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


def test_unknown_override_names_the_key():
  recipe = os.path.join(REPO, 'configs', 'paper.py')
  with pytest.raises(cli.UnknownConfigKeyError, match=r"'train\.lrr'.*did you mean 'train\.lr'"):
    cli.load_config(recipe, ['--config.train.lrr=1e-3'])
  inf = cli.load_config(recipe, ['--config.mixing.strategy=static',
                                 '--config.mixing.prior_temperature=10'])
  assert inf.mixing.prior_temperature == 10.0


def test_command_line_error_is_one_clear_line():
  main = ('from absl import app; from mos_jax.infra import cli; c = cli.define_config_flag(); '
          'app.run(lambda argv: print(c.value.train.lr), flags_parser=cli.parse_flags)')
  recipe = os.path.join(REPO, 'configs', 'paper.py') + ':qwen-diff'
  run = subprocess.run([sys.executable, '-c', main, f'--config={recipe}',
                        '--config.mixing.rewrd=cossim'], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, 'PYTHONPATH': REPO})
  assert run.returncode == 1
  assert run.stderr.strip() == (
      "error: Unknown config key 'mixing.rewrd' "
      "(from --config.mixing.rewrd=cossim); did you mean 'mixing.reward'?")


def test_config_json_is_strict_and_keeps_inf():
  data = _strict_json(config_to_json(base_config()))
  assert data['mixing']['prior_temperature'] == 'inf'
  assert data['train']['lr'] == 1e-5


def test_docs_hold_the_current_config_reference():
  with open(config_doc.DOC_PATH) as f:
    docs = f.read()
  assert config_doc.reference_table() in docs, 'run: python -m mos_jax.config_doc --write'
  keys = _keys(base_config())
  leaves = [k for k in keys if not any(other.startswith(k + '.') for other in keys)]
  assert len(leaves) > 50
  for key in leaves:
    assert f'| `{key}` |' in docs, key
