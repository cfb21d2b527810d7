"""A fixed-size key/value cache for decoding, and attention over it.

The cache has S slots per row. Every call of the decoder with a cache writes its L new tokens into
slots [end, end + L) of every row at once (so rows stay aligned; left padding fills the first slots
of shorter prompts) and attends from those tokens to every valid slot at or before their own.

  cache = kv_cache.init(model.config, batch=B, length=S)
  out = model(tokens, attention_mask=mask, cache=cache)   # prefill: tokens [B, P]
  out.cache ... model(next_tokens, cache=out.cache)        # decode:  tokens [B, 1]

Shape letters as in decoder.py (S = cache slots, Y = layers).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mos_jax.infra import sharding as sharding_lib


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


def advance(cache: KVCache, attention_mask, shape):
  """Bookkeeping for new tokens of `shape` (B, L): (positions [B, L], mask [B, 1, L, S], cache
  with the new slots marked valid). `attention_mask` [B, L]: 1 = real token, 0 = padding (None =
  all real). `run_layers` writes k/v at the old `end` and moves it.
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
  mask = (valid[:, None, :] | (key_slot[None, None, :] == query_slot[None, :, None])) & causal
  cache = cache._replace(valid=valid,
                         lengths=cache.lengths + real.sum(axis=1, dtype=jnp.int32))
  return positions, mask[:, None], cache


def attend(q, k, v, mask, cache: LayerCache):
  """Writes k, v [B, L, K, H] into the cache at (layer, :, end) and attends to that layer's slots.

  q [B, L, N, H] (grouped-query when K < N); mask [B, 1, L, S] from `advance`.
  Returns (out [B, L, N, H], the cache with this layer written).
  """
  at = (cache.layer, 0, cache.end, 0, 0)
  ks = _constrain_kv(jax.lax.dynamic_update_slice(cache.k, k[None].astype(cache.k.dtype), at))
  vs = _constrain_kv(jax.lax.dynamic_update_slice(cache.v, v[None].astype(cache.v.dtype), at))
  layer_k = jax.lax.dynamic_index_in_dim(ks, cache.layer, axis=0, keepdims=False)  # [B, S, K, H]
  layer_v = jax.lax.dynamic_index_in_dim(vs, cache.layer, axis=0, keepdims=False)
  out = jax.nn.dot_product_attention(q, layer_k.astype(q.dtype), layer_v.astype(q.dtype),
                                     mask=mask)
  return out, cache._replace(k=ks, v=vs)


def run_layers(layers, scanned: bool, x, cos, sin, mask, cache: KVCache):
  """The decoder blocks over x [B, L, D] with the cache; returns (x, cache with `end` moved)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  def apply(block, x, layer_cache):
    x, layer_cache = block(x, cos, sin, mask, layer_cache)
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
