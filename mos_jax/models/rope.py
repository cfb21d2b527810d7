"""Rotary position embeddings: inverse frequencies (default, llama3, linear), cos/sin tables, and
their application in HF's half-split layout.

Gemma 3 has two RoPEs: global layers use `rope_theta` with `rope_scaling`, local (sliding-window)
layers `rope_local_theta` unscaled (transformers/models/gemma3/modeling_gemma3.py,
Gemma3RotaryEmbedding; modeling_rope_utils.py for the scaled kinds).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mos_jax.models.config import ModelConfig


def _default_inv_freq(theta: float, h: int) -> np.ndarray:
  return (1.0 / (theta ** (np.arange(0, h, 2, dtype=np.float32) / h))).astype(np.float32)


def rope_inv_freq(config: ModelConfig, local: bool = False) -> np.ndarray:
  """Inverse frequencies [H/2] (float32) of global layers, with `rope_scaling` applied, or of
  local layers (`local`: rope_local_theta unscaled when set, else the global ones)."""
  if local and config.rope_local_theta is not None:
    return _default_inv_freq(config.rope_local_theta, config.head_dim)
  inv_freq = _default_inv_freq(config.rope_theta, config.head_dim)
  if config.rope_scaling is None:
    return inv_freq
  s = config.rope_scaling_dict
  if s['rope_type'] == 'linear':  # Positions divided by `factor`.
    return (inv_freq / np.float32(s['factor'])).astype(np.float32)
  # llama3: divide low frequencies by `factor`, interpolate the middle.
  factor, low, high = s['factor'], s['low_freq_factor'], s['high_freq_factor']
  old_len = s['original_max_position_embeddings']
  wavelen = 2 * np.pi / inv_freq
  scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
  return np.where(medium, smoothed, scaled).astype(np.float32)


class Rope(NamedTuple):
  """cos, sin [B, L, H] in the compute dtype for global and for local layers (the same arrays
  when both use one RoPE)."""
  cos: jax.Array
  sin: jax.Array
  local_cos: jax.Array
  local_sin: jax.Array

  def pick(self, local):
    """(cos, sin) of a layer: `local` a Python bool, or a traced one under a layer scan."""
    if isinstance(local, bool):
      return (self.local_cos, self.local_sin) if local else (self.cos, self.sin)
    return (jnp.where(local, self.local_cos, self.cos), jnp.where(local, self.local_sin, self.sin))


def _table(inv_freq, positions, dtype):
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, H/2]
  freqs = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(freqs).astype(dtype), jnp.sin(freqs).astype(dtype)


def rope_tables(config: ModelConfig, positions) -> Rope:
  """The tables at `positions` [B, L] (HF's half-split layout: freqs repeated twice)."""
  cos, sin = _table(rope_inv_freq(config), positions, config.dtype)
  if config.rope_local_theta is None or not any(config.local_layers):
    return Rope(cos, sin, cos, sin)
  return Rope(cos, sin, *_table(rope_inv_freq(config, local=True), positions, config.dtype))


def apply_rope(x, cos, sin):  # x [B, L, N, H]; cos, sin [B, L, H]
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]
