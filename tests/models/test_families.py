"""Qwen3, Gemma 2, Gemma 3 (text) and Mistral against transformers' PyTorch models.

Tiny random checkpoints with odd shapes (head_dim independent of hidden / heads, GQA), a sliding
window shorter than the sequence, soft-capping on (Gemma 2; Gemma 3's final one forced on), norms
perturbed so that a wrong convention shows: hidden states and logits in float32 within rel 1e-5
with padding and with packing, the scanned stack of mixed local / global layers, greedy generation
over the KV cache equal to transformers' greedy generate, and the export round trip.
"""

import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx

from mos_jax import models
from mos_jax.inference import sampler
from test_models import _torch_forward, save_torch_models

VOCAB = 97
WINDOW = 5  # Shorter than every sequence below.
_COMMON = dict(vocab_size=VOCAB, hidden_size=40, intermediate_size=56, num_attention_heads=4,
               num_key_value_heads=2, head_dim=12)
HF_CONFIGS = {
    # Layers from max_window_layers (1) on are local.
    'qwen3': lambda: transformers.Qwen3Config(
        **_COMMON, num_hidden_layers=3, rope_theta=1e6, use_sliding_window=True,
        sliding_window=WINDOW, max_window_layers=1, tie_word_embeddings=False),
    # Local / global alternating, both soft-caps (low, so they bite), query_pre_attn_scalar != H.
    'gemma2': lambda: transformers.Gemma2Config(
        **_COMMON, num_hidden_layers=3, sliding_window=WINDOW, query_pre_attn_scalar=20,
        attn_logit_softcapping=3.0, final_logit_softcapping=2.5),
    # A layer pattern from layer_types, local and global RoPE bases, linear scaling on global
    # layers, final soft-capping forced on (Gemma3TextConfig has it, off by default; its
    # attn_logit_softcapping is never applied by Gemma3Attention, so load_hf refuses it).
    'gemma3_text': lambda: transformers.Gemma3TextConfig(
        **_COMMON, num_hidden_layers=4, sliding_window=WINDOW, query_pre_attn_scalar=24,
        layer_types=['sliding_attention', 'full_attention', 'sliding_attention',
                     'sliding_attention'],
        rope_theta=1e5, rope_local_base_freq=300.0,
        rope_scaling={'rope_type': 'linear', 'factor': 4.0}, final_logit_softcapping=6.0),
    'mistral': lambda: transformers.MistralConfig(
        **_COMMON, num_hidden_layers=2, sliding_window=WINDOW, rope_theta=1e6),
}
FAMILIES = tuple(HF_CONFIGS)


def _torch_model(family, seed=0):
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(
      HF_CONFIGS[family](), dtype=torch.float32, attn_implementation='eager').eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name:
        p.add_(0.5 * torch.randn_like(p))
      if 'q_proj' in name or 'k_proj' in name:  # Scores of several units: the soft-cap bites.
        p.mul_(25.0)
  return model


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
  """family -> (folder, torch model)."""
  return save_torch_models(tmp_path_factory, FAMILIES, _torch_model)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens, segment_ids=None, attention_mask=None):
  return nnx.merge(graphdef, state)(tokens, segment_ids=segment_ids, attention_mask=attention_mask)


def forward(model, tokens, **kw):
  return _forward(*nnx.split(model), jnp.asarray(tokens), **kw)


def rel_err(ours, ref, real=None):
  """max |ours - ref| / max |ref| over the real (not padding) positions."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  if real is not None:
    ours, ref = ours[real.astype(bool)], ref[real.astype(bool)]
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _padded_batch(rng, batch=3, length=13):
  """Row 0 left-padded, row 1 right-padded, row 2 full: every row longer than the window."""
  tokens = rng.randint(0, VOCAB, (batch, length)).astype(np.int32)
  mask = np.ones((batch, length), np.int32)
  mask[0, :3] = 0
  mask[1, 10:] = 0
  return tokens, mask


@pytest.mark.parametrize('scan', [False, True], ids=['loop', 'scan'])
@pytest.mark.parametrize('family', FAMILIES)
def test_matches_transformers_fp32(checkpoints, family, scan):
  folder, torch_model = checkpoints[family]
  tokens, mask = _padded_batch(np.random.RandomState(1))
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  ref_logits, ref_hidden = _torch_forward(torch_model, tokens, mask, positions)
  model = models.load_hf(folder, scan_layers=scan)
  c = model.config
  assert c.family == family and c.sliding_window == WINDOW
  assert any(c.local_layers) and (family == 'mistral' or not all(c.local_layers))
  out = forward(model, tokens, attention_mask=jnp.asarray(mask))
  assert rel_err(out.logits, ref_logits, mask) <= 1e-5
  assert rel_err(out.hidden, ref_hidden, mask) <= 1e-5
  assert np.isfinite(np.asarray(out.logits)).all()

  # Packing: one row of two sequences (each longer than the window) against each one alone.
  rng = np.random.RandomState(2)
  a, b = rng.randint(0, VOCAB, (1, 8)), rng.randint(0, VOCAB, (1, 9))
  packed = np.concatenate([a, b, np.zeros((1, 3), int)], axis=1).astype(np.int32)
  seg = np.array([[1] * 8 + [2] * 9 + [0] * 3], np.int32)
  out = forward(model, packed, segment_ids=jnp.asarray(seg))
  for part, sl in ((a, slice(0, 8)), (b, slice(8, 17))):
    ref_logits, ref_hidden = _torch_forward(torch_model, part, np.ones_like(part))
    assert rel_err(out.logits[:, sl], ref_logits) <= 1e-5
    assert rel_err(out.hidden[:, sl], ref_hidden) <= 1e-5


def test_the_options_matter(checkpoints):
  """The parity above would not notice an option that changed nothing on these checkpoints."""
  tokens, mask = _padded_batch(np.random.RandomState(3))
  for family, off in (('qwen3', dict(sliding_window=None, layer_types=None)),
                      ('gemma2', dict(attn_logit_softcap=None)),
                      ('gemma2', dict(final_logit_softcap=None)),
                      ('gemma2', dict(query_pre_attn_scalar=None)),
                      ('gemma3_text', dict(rope_local_theta=1e5)),
                      ('gemma3_text', dict(rope_scaling=None)),
                      ('mistral', dict(sliding_window=None))):
    model = models.load_hf(checkpoints[family][0])
    base = forward(model, tokens, attention_mask=jnp.asarray(mask)).logits
    changed = nnx.merge(nnx.graphdef(models.Decoder(model.config.replace(**off),
                                                    rngs=nnx.Rngs(0))), nnx.state(model))
    other = forward(changed, tokens, attention_mask=jnp.asarray(mask)).logits
    assert rel_err(other, base, mask) > 1e-3, (family, off)


def _tokenizer_stub():
  return type('Tok', (), {'pad_token_id': 0, 'eos_token_id': None})()


@pytest.mark.parametrize('family,scan', [(f, False) for f in FAMILIES] + [('gemma3_text', True)])
def test_greedy_generation_equals_transformers(checkpoints, family, scan):
  """The KV cache masks keys outside the window (transformers' sliding cache drops them)."""
  folder, torch_model = checkpoints[family]
  prompts = [[5, 17, 33, 2, 9, 61, 70], [44, 3], [8, 8, 19, 90, 1]]
  got = sampler.Generator(models.load_hf(folder, scan_layers=scan), _tokenizer_stub(),
                          stop_ids=[]).generate_ids(prompts, 12)
  width = max(map(len, prompts))
  ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
  mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
  with torch.no_grad():
    ref = torch_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12,
                               min_new_tokens=12, do_sample=False, pad_token_id=0,
                               eos_token_id=None)
  assert got == ref[:, width:].tolist()


@pytest.mark.parametrize('family', FAMILIES)
def test_export_round_trip(checkpoints, family, tmp_path):
  folder, torch_model = checkpoints[family]
  tokens, mask = _padded_batch(np.random.RandomState(4))
  ref_logits, _ = _torch_forward(torch_model, tokens, mask)
  model = models.load_hf(folder, scan_layers=family == 'gemma3_text')
  models.save_hf(model, tmp_path / 'out')
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / 'out', dtype=torch.float32, attn_implementation='eager').eval()
  assert type(reloaded) is type(torch_model)
  for name, p in torch_model.state_dict().items():
    assert torch.equal(reloaded.state_dict()[name], p), name
  got, _ = _torch_forward(reloaded, tokens, mask)
  assert rel_err(got, ref_logits, mask) <= 1e-6
  again = models.load_hf(tmp_path / 'out')
  assert again.config == model.config.replace(scan_layers=False)


def _hf_config(checkpoints, family, **changes):
  hf = json.loads((checkpoints[family][0] / 'config.json').read_text())
  hf.update(changes)
  return hf


@pytest.mark.parametrize('family,changes,message', [
    ('gemma3_text', {'model_type': 'gemma3'}, r"'gemma3': Gemma 3 multimodal .*vision_config"),
    ('gemma3_text', {'vision_config': {'hidden_size': 8}}, r'multimodal checkpoint \(vision_config\)'),
    ('qwen3', {'model_type': 'qwen3_moe'}, r'Qwen3-MoE \(mixture of experts\)'),
    ('qwen3', {'model_type': 'qwen3_vl'}, r'Qwen3-VL \(multimodal\)'),
    ('qwen3', {'num_experts': 8}, r'mixture-of-experts \(num_experts=8\)'),
    ('mistral', {'attn_logit_softcapping': 50.0}, r"field 'attn_logit_softcapping' \(=50\.0\)"),
    ('gemma3_text', {'attn_logit_softcapping': 50.0}, r"attn_logit_softcapping \(transformers"),
    ('qwen3', {'rope_parameters': {'rope_type': 'yarn', 'rope_theta': 1e6, 'factor': 4.0}},
     r"rope type 'yarn' \(rope_parameters\)"),
    ('gemma2', {'rope_parameters': {'rope_type': 'linear', 'rope_theta': 1e4, 'factor': 2.0,
                                    'beta_fast': 3}}, r'rope_parameters\.beta_fast'),
    ('mistral', {'partial_rotary_factor': 0.5}, r'partial_rotary_factor=0\.5'),
    ('mistral', {'layer_types': ['sliding_attention', 'full_attention']}, r'layer_types'),
])
def test_unsupported_config_fields_are_named(checkpoints, family, changes, message):
  hf = _hf_config(checkpoints, family, **changes)
  with pytest.raises(models.CheckpointError, match=message) as e:
    models.config_from_hf(hf)
  assert '\n' not in str(e.value)


def test_published_config_layouts(checkpoints):
  """config.json as google/gemma-3-1b-pt and google/gemma-2-9b have it (classic rope fields,
  sliding_window_pattern, sliding_window_size, cache_implementation) reads as the new layout."""
  new = _hf_config(checkpoints, 'gemma3_text')
  classic = {k: v for k, v in new.items() if k not in ('rope_parameters', 'layer_types')}
  classic.update(rope_theta=1e5, rope_local_base_freq=300.0, cache_implementation='hybrid',
                 rope_scaling={'rope_type': 'linear', 'factor': 4.0}, sliding_window_pattern=2)
  got = models.config_from_hf(classic)
  assert got.local_layers == (True, False, True, False)  # sliding_window_pattern 2
  assert got == models.config_from_hf(new).replace(layer_types=got.layer_types)
  gemma2 = _hf_config(checkpoints, 'gemma2', sliding_window_size=WINDOW,
                      cache_implementation='hybrid')
  del gemma2['layer_types']  # Gemma2Config's default: local, global, local, ...
  assert models.config_from_hf(gemma2) == models.config_from_hf(_hf_config(checkpoints, 'gemma2'))


def test_tensor_shape_mismatch_names_the_first_tensor(checkpoints, tmp_path):
  folder, _ = checkpoints['qwen3']
  tensors = safetensors.numpy.load_file(folder / 'model.safetensors')
  tensors['model.layers.1.self_attn.q_norm.weight'] = np.zeros(16, np.float32)
  tensors['model.layers.2.mlp.up_proj.weight'] = np.zeros((3, 3), np.float32)
  safetensors.numpy.save_file(tensors, tmp_path / 'model.safetensors', metadata={'format': 'pt'})
  shutil.copy(folder / 'config.json', tmp_path / 'config.json')
  with pytest.raises(models.CheckpointError,
                     match=r'tensor model\.layers\.1\.self_attn\.q_norm\.weight: expected \[12\] '
                           r'\(from config\.json\), found \[16\]\.$'):
    models.load_hf(tmp_path)
