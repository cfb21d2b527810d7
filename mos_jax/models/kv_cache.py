"""A fixed-size key/value cache for decoding, and attention over it.

The cache has S slots per row. Every call of the decoder with a cache writes its L new tokens into
slots [end, end + L) of every row at once (so rows stay aligned; left padding fills the first slots
of shorter prompts) and attends from those tokens to every valid slot at or before their own.

  cache = kv_cache.init(model.config, batch=B, length=S)
  out = model(tokens, attention_mask=mask, cache=cache)   # prefill: tokens [B, P]
  out.cache ... model(next_tokens, cache=out.cache)        # decode:  tokens [B, 1]

Sliding-window layers (Mistral, Gemma 2 / 3, Qwen3 with use_sliding_window) keep every slot and
*mask* the keys outside the window (by position: a query at position p sees keys at positions
> p - sliding_window), so the cache is as long as for global layers; transformers' sliding cache
keeps only the last window and attends to the same keys.

Shape letters as in decoder.py (S = cache slots, Y = layers).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mos_jax.infra import sharding as sharding_lib
from mos_jax.models import attention as attention_lib


class KVCache(NamedTuple):
  k: jax.Array        # [Y, B, S, K, H] keys of every layer, after RoPE
  v: jax.Array        # [Y, B, S, K, H] values of every layer
  valid: jax.Array    # [B, S] bool: the slot holds a real (not padding) token
  lengths: jax.Array  # [B] int32: real tokens so far = the position of the row's next token
  end: jax.Array      # [] int32: slots written so far (the same for every row)

  @property
  def size(self) -> int:
    return self.k.shape[2]


def init(config, batch: int, length: int, dtype=None) -> KVCache:
  """An empty cache of `length` slots for `batch` rows (dtype defaults to the compute dtype)."""
  shape = (config.num_layers, batch, length, config.num_kv_heads, config.head_dim)
  dtype = dtype or config.dtype
  k = _constrain_kv(jnp.zeros(shape, dtype))
  v = _constrain_kv(jnp.zeros(shape, dtype))
  return KVCache(k=k, v=v, valid=jnp.zeros((batch, length), bool),
                 lengths=jnp.zeros((batch,), jnp.int32), end=jnp.zeros((), jnp.int32))


def _constrain_kv(x):  # [Y, B, S, K, H]
  return sharding_lib.constrain(x, 'layers', 'batch', None, 'kv_heads', 'head_dim')


class LayerCache(NamedTuple):
  """What one layer's attention reads and writes: the whole stacked cache and its own index."""
  k: jax.Array      # [Y, B, S, K, H]
  v: jax.Array      # [Y, B, S, K, H]
  layer: jax.Array  # [] int32
  end: jax.Array    # [] int32: the first slot to write


class Masks(NamedTuple):
  """What the new tokens attend to, [B, 1, L, S] bool: on global layers and on local ones."""
  full: jax.Array
  local: jax.Array

  def pick(self, local):
    if isinstance(local, bool):
      return self.local if local else self.full
    return jnp.where(local, self.local, self.full)  # A scanned stack of mixed layers.


def advance(cache: KVCache, attention_mask, shape, window: int | None = None):
  """Bookkeeping for new tokens of `shape` (B, L): (positions [B, L], Masks, cache with the new
  slots marked valid). `attention_mask` [B, L]: 1 = real token, 0 = padding (None = all real).
  `window`: the sliding window of local layers. `run_layers` writes k/v at the old `end` and
  moves it.
  """
  real = (jnp.ones(shape, bool) if attention_mask is None
          else attention_mask.astype(bool))  # [B, L]
  length = shape[1]
  # Positions continue each row's count of real tokens; padding gets the next one (it is masked).
  positions = cache.lengths[:, None] + jnp.cumsum(real, axis=1, dtype=jnp.int32) - real
  valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, real, cache.end, axis=1)  # [B, S]
  query_slot = cache.end + jnp.arange(length, dtype=jnp.int32)  # [L]
  key_slot = jnp.arange(cache.size, dtype=jnp.int32)  # [S]
  causal = key_slot[None, :] <= query_slot[:, None]  # [L, S]
  # A padding query sees itself only, so no row is fully masked (and its output is unused).
  own = key_slot[None, None, :] == query_slot[None, :, None]  # [1, L, S]
  mask = (valid[:, None, :] | own) & causal  # [B, L, S]
  local = mask
  if window is not None:  # By position: slots of padding between real tokens do not count.
    key_pos = jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1  # [B, S]
    local = mask & ((positions[:, :, None] - key_pos[:, None, :] < window) | own)
  cache = cache._replace(valid=valid,
                         lengths=cache.lengths + real.sum(axis=1, dtype=jnp.int32))
  return positions, Masks(mask[:, None], local[:, None]), cache


def attend(q, k, v, masks: Masks, cache: LayerCache, local, *, scale: float,
           softcap: float | None = None):
  """Writes k, v [B, L, K, H] into the cache at (layer, :, end) and attends to that layer's slots.

  q [B, L, N, H] (grouped-query when K < N); masks from `advance`, `local` picks one (a bool, or
  traced under a scan of mixed layers); scores scaled and soft-capped as in attention.dense.
  Returns (out [B, L, N, H], the cache with this layer written).
  """
  at = (cache.layer, 0, cache.end, 0, 0)
  ks = _constrain_kv(jax.lax.dynamic_update_slice(cache.k, k[None].astype(cache.k.dtype), at))
  vs = _constrain_kv(jax.lax.dynamic_update_slice(cache.v, v[None].astype(cache.v.dtype), at))
  layer_k = jax.lax.dynamic_index_in_dim(ks, cache.layer, axis=0, keepdims=False)  # [B, S, K, H]
  layer_v = jax.lax.dynamic_index_in_dim(vs, cache.layer, axis=0, keepdims=False)
  out = attention_lib.dense(q, layer_k.astype(q.dtype), layer_v.astype(q.dtype),
                            masks.pick(local), scale=scale, softcap=softcap)
  return out, cache._replace(k=ks, v=vs)


def run_layers(layers, scanned: bool, x, rope, masks: Masks, cache: KVCache, kinds):
  """The decoder blocks over x [B, L, D] with the cache; returns (x, cache with `end` moved).
  kinds [Y] bool: which layers are local (read where a scanned block's kind is not static)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  def apply(block, x, layer_cache):
    x, layer_cache = block(x, rope, masks, kinds[layer_cache.layer], layer_cache)
    return sharding_lib.constrain(x, 'batch', None, 'embed'), layer_cache

  layer_cache = LayerCache(cache.k, cache.v, jnp.zeros((), jnp.int32), cache.end)
  if scanned:  # The stacked cache is carried (updated in place), the layer index is scanned.
    @nnx.scan(in_axes=(0, nnx.Carry, 0), out_axes=nnx.Carry)
    def body(block, carry, layer):
      x, layer_cache = carry
      return apply(block, x, layer_cache._replace(layer=layer))
    x, layer_cache = body(layers, (x, layer_cache),
                          jnp.arange(cache.k.shape[0], dtype=jnp.int32))
  else:
    for y, block in enumerate(layers):
      x, layer_cache = apply(block, x, layer_cache._replace(layer=jnp.asarray(y, jnp.int32)))
  return x, cache._replace(k=layer_cache.k, v=layer_cache.v, end=cache.end + x.shape[1])
