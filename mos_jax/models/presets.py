"""Named model sizes: the published architectures, and `tiny` for tests and demos."""

from __future__ import annotations

import math

import jax
from flax import nnx

from mos_jax.models.config import ModelConfig
from mos_jax.models.decoder import abstract_model

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
    # ~312K parameters, Llama layout; vocab fits a small demo tokenizer (override it from yours).
    'tiny': ModelConfig(
        family='llama', vocab_size=512, hidden_size=64, intermediate_size=256, num_layers=4,
        num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_embeddings=False, activation='silu', max_position_embeddings=2048),
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
