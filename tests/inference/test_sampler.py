"""KV-cache generation against recomputing the whole sequence, and against transformers' generate."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from mos_jax.inference import sampler
from mos_jax import models
from mos_jax.models import ModelConfig

FAMILY_CONFIGS = {
    'llama': dict(family='llama', activation='silu', num_kv_heads=2, head_dim=8,
                  rope_scaling={'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0,
                                'high_freq_factor': 4.0, 'original_max_position_embeddings': 16}),
    'qwen2': dict(family='qwen2', activation='silu', num_kv_heads=2, head_dim=8, qkv_bias=True,
                  tie_embeddings=True),
    'gemma': dict(family='gemma', activation='gelu_tanh', num_kv_heads=1, head_dim=16,
                  tie_embeddings=True),
}
VOCAB = 97
# Prompts of different lengths, left-padded into one batch.
PROMPTS = [[5, 17, 33, 2, 9, 61, 70], [44, 3], [8, 8, 19, 90, 1]]


def _config(family, **overrides):
  return ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2,
                     num_heads=4, **{**FAMILY_CONFIGS[family], **overrides})


def _tokenizer_stub(pad=0, eos=None):
  return types.SimpleNamespace(pad_token_id=pad, eos_token_id=eos)


def _greedy_by_recompute(model, prompts, steps):
  """Reference: each prompt alone, the whole sequence through the model at every step (one
  fixed-width buffer; causal attention makes the later, unfilled slots irrelevant)."""
  graphdef, state = nnx.split(model)
  step = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens).logits[0])
  forward = lambda tokens: step(state, tokens)
  out = []
  for prompt in prompts:
    buf = np.zeros((1, len(prompt) + steps), np.int32)
    buf[0, :len(prompt)] = prompt
    for t in range(len(prompt), len(prompt) + steps):
      buf[0, t] = int(jnp.argmax(forward(jnp.asarray(buf))[t - 1]))
    out.append(buf[0, len(prompt):].tolist())
  return out


@pytest.mark.parametrize('family,scan', [('llama', False), ('qwen2', False), ('gemma', False),
                                         ('llama', True)])
def test_cache_decoding_equals_recomputing(family, scan):
  model = models.init_model(_config(family, scan_layers=scan), seed=3)
  gen = sampler.Generator(model, _tokenizer_stub(), stop_ids=[])
  got = gen.generate_ids(PROMPTS, max_new_tokens=12)
  # Each prompt alone and unpadded, recomputed from scratch at every step.
  assert got == _greedy_by_recompute(model, PROMPTS, 12)


def test_cache_logits_equal_full_forward_with_left_padding():
  model = models.init_model(_config('qwen2'), seed=1)
  from mos_jax.models import kv_cache
  tokens = np.zeros((3, 7), np.int32)
  mask = np.zeros((3, 7), np.int32)
  for i, p in enumerate(PROMPTS):
    tokens[i, 7 - len(p):], mask[i, 7 - len(p):] = p, 1
  cache = kv_cache.init(model.config, 3, 10)
  out = model(jnp.asarray(tokens[:, :4]), attention_mask=jnp.asarray(mask[:, :4]), cache=cache)
  out2 = model(jnp.asarray(tokens[:, 4:]), attention_mask=jnp.asarray(mask[:, 4:]), cache=out.cache)
  full = model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)).logits
  cached = jnp.concatenate([out.logits, out2.logits], axis=1)
  np.testing.assert_allclose(cached * mask[..., None], full * mask[..., None], atol=1e-5)
  assert out2.cache.lengths.tolist() == [7, 2, 5] and int(out2.cache.end) == 7


def test_stop_tokens_end_rows_early():
  model = models.init_model(_config('llama'), seed=3)
  free = sampler.Generator(model, _tokenizer_stub(), stop_ids=[]).generate_ids(PROMPTS, 10)
  stop = free[0][3]  # The 4th token of row 0 becomes a stop token.
  got = sampler.Generator(model, _tokenizer_stub(), stop_ids=[stop]).generate_ids(PROMPTS, 10)
  for row, ref in zip(got, free):
    cut = ref.index(stop) if stop in ref else len(ref)
    assert row == ref[:cut]
  assert len(got[0]) == free[0].index(stop) <= 3


def test_sampling_filters():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 512, jnp.float32))
  keys = jax.random.key(0)
  greedy = sampler.sample(logits, keys, sampler.Sampling())
  assert set(greedy.tolist()) == {0}
  topk = sampler.sample(logits, keys, sampler.Sampling(temperature=1.0, top_k=2))
  assert set(topk.tolist()) == {0, 1}
  # top_p 0.6: tokens 0 (0.5) and 1 (0.5 + 0.3 reaches it) are kept, 2 and 3 never drawn.
  topp = sampler.sample(logits, keys, sampler.Sampling(temperature=1.0, top_p=0.6))
  assert set(topp.tolist()) == {0, 1}
  full = sampler.sample(logits, keys, sampler.Sampling(temperature=1.0))
  assert set(full.tolist()) == {0, 1, 2, 3}
  frac0 = float(np.mean(np.asarray(full) == 0))
  assert abs(frac0 - 0.5) < 0.08


def test_sampled_generation_depends_on_seed_only():
  model = models.init_model(_config('gemma'), seed=0)
  gen = sampler.Generator(model, _tokenizer_stub(), stop_ids=[])
  hot = sampler.Sampling(temperature=1.5)
  a = gen.generate_ids(PROMPTS, 8, hot, seed=1)
  assert a == gen.generate_ids(PROMPTS, 8, hot, seed=1)
  assert a != gen.generate_ids(PROMPTS, 8, hot, seed=2)


def test_greedy_tokens_equal_transformers_generate(tmp_path):
  torch.manual_seed(0)
  hf_config = transformers.Qwen2Config(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
  torch_model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
  with torch.no_grad():
    for name, p in torch_model.named_parameters():  # Random biases and norms, so they matter.
      if 'norm' in name or name.endswith('bias'):
        p.add_(0.5 * torch.randn_like(p))
  torch_model.save_pretrained(tmp_path)
  model = models.load_hf(tmp_path)
  got = sampler.Generator(model, _tokenizer_stub(), stop_ids=[]).generate_ids(PROMPTS, 16)

  width = max(map(len, PROMPTS))
  ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
  mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
  with torch.no_grad():
    ref = torch_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16,
                               min_new_tokens=16, do_sample=False, pad_token_id=0,
                               eos_token_id=None)
  assert got == ref[:, width:].tolist()


_SHARDED = r'''
import jax, json, sys
import numpy as np
assert jax.device_count() == 4
from mos_jax.inference import sampler
from mos_jax import models
from mos_jax.infra import sharding
from mos_jax.models import ModelConfig
import types
config = ModelConfig(family='qwen2', vocab_size=97, hidden_size=32, intermediate_size=48,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True)
tok = types.SimpleNamespace(pad_token_id=0, eos_token_id=None)
prompts = json.loads(sys.argv[1])
single = sampler.Generator(models.init_model(config, 5), tok, stop_ids=[])
out = {'single': single.generate_ids(prompts, 10)}
for shape in ((1, 4, 1), (2, 1, 2)):
  mesh = sharding.make_mesh(dict(zip(('data', 'fsdp', 'tensor'), shape)))
  model = models.init_model(config, 5, mesh=mesh)
  out[str(shape)] = sampler.Generator(model, tok, mesh=mesh, stop_ids=[]).generate_ids(prompts, 10)
print(json.dumps(out))
'''


def test_generation_on_a_mesh_equals_one_device():
  import json
  import os
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=4',
         'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': repo}
  done = subprocess.run([sys.executable, '-c', _SHARDED, json.dumps(PROMPTS)], env=env,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  out = json.loads(done.stdout.strip().splitlines()[-1])
  assert out['(1, 4, 1)'] == out['single'] and out['(2, 1, 2)'] == out['single']
