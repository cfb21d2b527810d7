"""Named model sizes: the published architectures, and `tiny` for tests and demos."""

from __future__ import annotations

import math

import jax
from flax import nnx

from mos_jax.models.config import ModelConfig
from mos_jax.models.decoder import abstract_model

_TINY = ModelConfig(
    family='llama', vocab_size=512, hidden_size=64, intermediate_size=256, num_layers=4,
    num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5,
    tie_embeddings=False, activation='silu', max_position_embeddings=2048)
_ALTERNATING = ('sliding_attention', 'full_attention') * 2  # Gemma 2's pattern, 4 layers.

PRESETS: dict[str, ModelConfig] = {
    # Qwen/Qwen1.5-0.5B: 463,987,712 parameters (tied embeddings counted once).
    'qwen1.5-0.5b': ModelConfig(
        family='qwen2', vocab_size=151936, hidden_size=1024, intermediate_size=2816, num_layers=24,
        num_heads=16, num_kv_heads=16, head_dim=64, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_embeddings=True, qkv_bias=True, activation='silu', max_position_embeddings=32768,
        bos_token_id=151643, eos_token_id=151643),
    # google/gemma-2b: 2,506,172,416 parameters.
    'gemma-2b': ModelConfig(
        family='gemma', vocab_size=256000, hidden_size=2048, intermediate_size=16384, num_layers=18,
        num_heads=8, num_kv_heads=1, head_dim=256, rope_theta=10000.0, rms_norm_eps=1e-6,
        tie_embeddings=True, activation='gelu_tanh', max_position_embeddings=8192,
        bos_token_id=2, eos_token_id=1, pad_token_id=0),
    # meta-llama/Meta-Llama-3-8B: 8,030,261,248 parameters.
    'llama-3-8b': ModelConfig(
        family='llama', vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0, rms_norm_eps=1e-5,
        tie_embeddings=False, activation='silu', max_position_embeddings=8192,
        bos_token_id=128000, eos_token_id=128001),
    # Qwen/Qwen3-8B: 8,190,735,360 parameters.
    'qwen3-8b': ModelConfig(
        family='qwen3', vocab_size=151936, hidden_size=4096, intermediate_size=12288,
        num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=1e6,
        rms_norm_eps=1e-6, tie_embeddings=False, qk_norm=True, activation='silu',
        max_position_embeddings=40960, bos_token_id=151643, eos_token_id=151645),
    # google/gemma-2-9b: 9,241,705,984 parameters; local (4096) and global layers alternate.
    'gemma-2-9b': ModelConfig(
        family='gemma2', vocab_size=256000, hidden_size=3584, intermediate_size=14336,
        num_layers=42, num_heads=16, num_kv_heads=8, head_dim=256, rope_theta=10000.0,
        rms_norm_eps=1e-6, tie_embeddings=True, activation='gelu_tanh', post_norms=True,
        query_pre_attn_scalar=256.0, attn_logit_softcap=50.0, final_logit_softcap=30.0,
        sliding_window=4096, layer_types=('sliding_attention', 'full_attention') * 21,
        max_position_embeddings=8192, bos_token_id=2, eos_token_id=1, pad_token_id=0),
    # The text model of google/gemma-3-4b-pt (Gemma3ForCausalLM): 3,880,263,168 parameters.
    'gemma-3-4b': ModelConfig(
        family='gemma3_text', vocab_size=262208, hidden_size=2560, intermediate_size=10240,
        num_layers=34, num_heads=8, num_kv_heads=4, head_dim=256, rope_theta=1e6,
        rope_scaling={'rope_type': 'linear', 'factor': 8.0}, rope_local_theta=10000.0,
        rms_norm_eps=1e-6, tie_embeddings=True, activation='gelu_tanh', qk_norm=True,
        post_norms=True, query_pre_attn_scalar=256.0, sliding_window=1024,
        layer_types=tuple('full_attention' if (i + 1) % 6 == 0 else 'sliding_attention'
                          for i in range(34)),
        max_position_embeddings=131072, bos_token_id=2, eos_token_id=1, pad_token_id=0),
    # mistralai/Mistral-7B-v0.3: 7,248,023,552 parameters (no sliding window since v0.2).
    'mistral-7b': ModelConfig(
        family='mistral', vocab_size=32768, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=1e6,
        rms_norm_eps=1e-5, tie_embeddings=False, activation='silu',
        max_position_embeddings=32768, bos_token_id=1, eos_token_id=2),
    # ~312K parameters, Llama layout; vocab fits a small demo tokenizer (override it from yours).
    'tiny': _TINY,
    # The same size with each newer family's options on (windows of 8 tokens, soft-caps).
    'tiny-qwen3': _TINY.replace(family='qwen3', qk_norm=True, sliding_window=8,
                                layer_types=('full_attention',) * 2 + ('sliding_attention',) * 2),
    'tiny-gemma2': _TINY.replace(family='gemma2', activation='gelu_tanh', tie_embeddings=True,
                                 post_norms=True, query_pre_attn_scalar=16.0,
                                 attn_logit_softcap=50.0, final_logit_softcap=30.0,
                                 sliding_window=8, layer_types=_ALTERNATING),
    'tiny-gemma3': _TINY.replace(family='gemma3_text', activation='gelu_tanh',
                                 tie_embeddings=True, qk_norm=True, post_norms=True,
                                 query_pre_attn_scalar=16.0, sliding_window=8,
                                 layer_types=_ALTERNATING, rope_theta=1e6,
                                 rope_local_theta=10000.0,
                                 rope_scaling={'rope_type': 'linear', 'factor': 8.0}),
    'tiny-mistral': _TINY.replace(family='mistral', sliding_window=8),
}


def get_preset(name: str, **overrides) -> ModelConfig:
  """PRESETS[name] with fields replaced, e.g. get_preset('tiny', vocab_size=tok_vocab, dtype='bfloat16')."""
  if name not in PRESETS:
    raise KeyError(f'Unknown model preset {name!r}; available: {", ".join(sorted(PRESETS))}.')
  return PRESETS[name].replace(**overrides)


def param_count(config: ModelConfig) -> int:
  """Number of parameters, read off the abstract model (tied embeddings counted once)."""
  shapes = jax.tree.leaves(nnx.state(abstract_model(config.replace(scan_layers=True)), nnx.Param))
  return sum(math.prod(s.shape) for s in shapes)
