"""Presets, HF checkpoint error handling, atomic saving, and loading onto a mesh."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx

from mos_jax import models
from mos_jax.infra import sharding
from mos_jax.models import hf_io
from mos_jax.models.decoder import abstract_model

PUBLISHED_COUNTS = {'qwen1.5-0.5b': 463_987_712, 'gemma-2b': 2_506_172_416,
                    'llama-3-8b': 8_030_261_248, 'qwen3-8b': 8_190_735_360,
                    'gemma-3-4b': 3_880_263_168, 'mistral-7b': 7_248_023_552,
                    'gemma-2-9b': 9_241_705_984}


@pytest.mark.parametrize('name', sorted(PUBLISHED_COUNTS))
def test_preset_parameter_counts(name):
  count = models.param_count(models.PRESETS[name])
  assert abs(count - PUBLISHED_COUNTS[name]) <= 0.01 * PUBLISHED_COUNTS[name], count
  # The plain-loop layout (no scan) builds abstractly too, with the same count.
  abstract = nnx.eval_shape(lambda: models.Decoder(models.PRESETS[name], rngs=nnx.Rngs(0)))
  leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
  assert sum(x.size for x in leaves) == count
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)


def test_tiny_preset_and_overrides():
  tiny = models.get_preset('tiny', vocab_size=300)
  assert tiny.family == 'llama' and tiny.vocab_size == 300
  assert 100_000 < models.param_count(models.PRESETS['tiny']) < 1_000_000
  with pytest.raises(KeyError, match='available: gemma-2-9b, gemma-2b, gemma-3-4b, llama-3-8b, mistral-7b, '
                                     'qwen1.5-0.5b, qwen3-8b, tiny, tiny-gemma2'):
    models.get_preset('gpt2')
  with pytest.raises(TypeError, match='no field'):
    models.get_preset('tiny', hidden=3)


def test_every_parameter_has_logical_axes():
  abstract = nnx.eval_shape(lambda: models.Decoder(
      models.get_preset('qwen1.5-0.5b', scan_layers=True), rngs=nnx.Rngs(0)))
  specs = nnx.get_partition_spec(nnx.state(abstract, nnx.Param))
  flat = dict(nnx.to_flat_state(specs))
  assert tuple(flat[('embed',)].get_value()) == ('vocab', 'embed')
  assert tuple(flat[('layers', 'attn', 'q_proj')].get_value()) == (
      'layers', 'embed', 'heads', 'head_dim')
  assert tuple(flat[('layers', 'attn', 'k_bias')].get_value()) == ('layers', 'kv_heads', 'head_dim')
  assert tuple(flat[('layers', 'mlp', 'down_proj')].get_value()) == ('layers', 'mlp', 'embed')
  for path, spec in flat.items():
    names = tuple(spec.get_value())
    assert names and all(n in sharding.LOGICAL_RULES for n in names), (path, names)


@pytest.fixture(scope='module')
def llama_dir(tmp_path_factory):
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
      num_attention_heads=2, num_key_value_heads=1)
  folder = tmp_path_factory.mktemp('llama')
  transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
  return folder


def _copy_with(src, dst, mutate_tensors=None, mutate_config=None):
  dst.mkdir(exist_ok=True)
  config = json.loads((src / 'config.json').read_text())
  if mutate_config:
    mutate_config(config)
  (dst / 'config.json').write_text(json.dumps(config))
  tensors = safetensors.numpy.load_file(src / 'model.safetensors')
  if mutate_tensors:
    mutate_tensors(tensors)
  safetensors.numpy.save_file(tensors, dst / 'model.safetensors', metadata={'format': 'pt'})
  return dst


def test_unsupported_model_type(llama_dir, tmp_path):
  bad = _copy_with(llama_dir, tmp_path / 'm', mutate_config=lambda c: c.update(model_type='gpt2'))
  with pytest.raises(models.CheckpointError,
                     match=r"'gpt2'.*supported: gemma, gemma2, gemma3_text, llama, mistral, qwen2, "
                           r"qwen3\.$"):
    models.load_hf(bad)


def test_unsupported_rope_type():
  hf = {'model_type': 'llama', 'vocab_size': 8, 'hidden_size': 8, 'intermediate_size': 8,
        'num_hidden_layers': 1, 'num_attention_heads': 2,
        'rope_scaling': {'type': 'yarn', 'factor': 2.0}}
  with pytest.raises(models.CheckpointError, match="rope type 'yarn'"):
    models.config_from_hf(hf)
  del hf['rope_scaling'], hf['hidden_size']
  with pytest.raises(models.CheckpointError, match="required field 'hidden_size'"):
    models.config_from_hf(hf)


def test_missing_and_unexpected_tensors(llama_dir, tmp_path):
  def mutate(t):
    del t['model.layers.1.mlp.up_proj.weight']
    t['model.layers.0.mlp.extra.weight'] = np.zeros(3, np.float32)
  bad = _copy_with(llama_dir, tmp_path / 'm', mutate_tensors=mutate)
  with pytest.raises(models.CheckpointError) as e:
    models.load_hf(bad)
  assert "missing tensors ['model.layers.1.mlp.up_proj.weight']" in str(e.value)
  assert "unexpected tensors ['model.layers.0.mlp.extra.weight']" in str(e.value)


def test_shape_mismatch(llama_dir, tmp_path):
  def mutate(t):
    t['model.layers.0.self_attn.k_proj.weight'] = np.zeros((16, 16), np.float32)
  bad = _copy_with(llama_dir, tmp_path / 'm', mutate_tensors=mutate)
  with pytest.raises(models.CheckpointError,
                     match=r'tensor model\.layers\.0\.self_attn\.k_proj\.weight: expected '
                           r'\[8, 16\] \(from config\.json\), found \[16, 16\]\.$'):
    models.load_hf(bad)


def test_missing_and_corrupt_files(llama_dir, tmp_path):
  good = _copy_with(llama_dir, tmp_path / 'good')
  (good / 'config.json').rename(tmp_path / 'config.json')
  with pytest.raises(FileNotFoundError, match=str(good / 'config.json')):
    models.load_hf(good)
  (tmp_path / 'config.json').rename(good / 'config.json')

  weights = good / 'model.safetensors'
  data = weights.read_bytes()
  weights.write_bytes(data[:len(data) // 2])  # Truncated.
  with pytest.raises(models.SafetensorsError, match=str(weights)):
    models.load_hf(good)
  weights.write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{not json at all' + data[24:])
  with pytest.raises(models.SafetensorsError, match=str(weights)):
    models.load_hf(good)
  (good / 'config.json').write_text('{"model_type": ')
  with pytest.raises(models.CheckpointError, match=str(good / 'config.json')):
    models.load_hf(good)

  weights.unlink()
  (good / 'config.json').write_text((llama_dir / 'config.json').read_text())
  with pytest.raises(FileNotFoundError, match='No safetensors weights'):
    models.load_hf(good)
  # A sharded index naming a shard that is not there.
  (good / 'model.safetensors.index.json').write_text(json.dumps(
      {'weight_map': {'model.embed_tokens.weight': 'model-00001-of-00002.safetensors'}}))
  with pytest.raises(FileNotFoundError, match=str(good / 'model-00001-of-00002.safetensors')):
    models.load_hf(good)


def test_save_failure_leaves_nothing(llama_dir, tmp_path, monkeypatch):
  model = models.load_hf(llama_dir)
  dest = tmp_path / 'out'

  def failing_write(path, specs, produce, metadata=None):
    path.write_bytes(b'partial')
    raise OSError('disk full')

  monkeypatch.setattr(hf_io, 'write_safetensors', failing_write)
  with pytest.raises(OSError, match='disk full'):
    models.save_hf(model, dest)
  assert list(tmp_path.iterdir()) == []

  # An existing export is left as it was when replacing it fails.
  dest.mkdir()
  (dest / 'keep.txt').write_text('old')
  with pytest.raises(FileExistsError, match='overwrite=True'):
    models.save_hf(model, dest)
  with pytest.raises(OSError, match='disk full'):
    models.save_hf(model, dest, overwrite=True)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['out']
  assert [p.name for p in dest.iterdir()] == ['keep.txt']
  with pytest.raises(FileNotFoundError, match='No tokenizer files'):
    models.save_hf(model, tmp_path / 'other', tokenizer_dir=tmp_path / 'out')
  monkeypatch.undo()

  models.save_hf(model, dest, overwrite=True)
  assert sorted(p.name for p in dest.iterdir()) == ['config.json', 'model.safetensors']
  assert sorted(p.name for p in tmp_path.iterdir()) == ['out']


def test_load_onto_a_one_device_mesh(llama_dir):
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1})
  model = models.load_hf(llama_dir, mesh=mesh, scan_layers=True)
  state = nnx.state(model, nnx.Param)
  abstract = nnx.state(abstract_model(model.config), nnx.Param)
  expected = sharding.state_shardings(abstract, mesh)
  for (path, var), (_, want) in zip(nnx.to_flat_state(state), nnx.to_flat_state(expected)):
    assert var.get_value().sharding == want.get_value(), path
    assert var.get_value().sharding.mesh == mesh

  plain = models.load_hf(llama_dir)
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 6)), jnp.int32)
  f = jax.jit(lambda g, s, t: nnx.merge(g, s)(t).logits, static_argnums=0)
  np.testing.assert_allclose(f(*nnx.split(model), tokens), f(*nnx.split(plain), tokens), atol=1e-5)


def test_init_model_on_a_mesh():
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1})
  config = models.get_preset('tiny', num_layers=1, scan_layers=True)
  model = models.init_model(config, seed=0, mesh=mesh)
  embed = model.embed[...]
  assert embed.shape == (512, 64) and embed.sharding.mesh == mesh
  assert 0.015 < float(jnp.std(embed)) < 0.025  # HF's initializer_range.
  assert model.layers.attn.q_proj[...].sharding.mesh == mesh
  # Each parameter draws its own key.
  assert not np.allclose(model.layers.mlp.gate_proj[...], model.layers.mlp.up_proj[...])
  np.testing.assert_array_equal(model.layers.attn_norm.weight[...], 1.0)
