"""The decoder (Llama / Qwen2 / Gemma) in Flax NNX.

Shape letters used in einsum strings and `# [..]` comments:
  B batch, L sequence (queries), S sequence (keys), D hidden, V vocab, F mlp,
  N query heads, K key/value heads, H head_dim, Y layers (stacked when scanning).
Weights are stored input-first ([D, N, H], [D, F], [F, D], [N, H, D], [V, D]); hf_io.py maps them to
HF's [out, in] layout.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mos_jax.models import loss as loss_lib
from mos_jax.infra import sharding as sharding_lib
from mos_jax.models import kv_cache
from mos_jax.models import attention as attention_lib
from mos_jax.models.config import ModelConfig

INIT_STD = 0.02  # HF `initializer_range` of all three families.
# model.remat names -> what each layer keeps for the backward pass (jax.checkpoint_policies);
# 'none' keeps everything (no rematerialisation).
REMAT_POLICIES = {
    'full': jax.checkpoint_policies.nothing_saveable,  # Recompute the whole layer.
    'save_dots': jax.checkpoint_policies.dots_saveable,  # Keep every matmul output.
    # Keep matmul outputs without batch dimensions (projections, not attention scores).
    'save_dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class DecoderOutput(NamedTuple):
  logits: jax.Array  # [B, L, V] float32
  hidden: jax.Array  # [B, L, D] after the final norm, compute dtype
  cache: Any = None  # kv_cache.KVCache after this call's tokens, when called with a cache


def _param(value, *names):
  # Logical axis names only; mos_jax.infra.sharding maps them to mesh axes in one table.
  return nnx.Param(value, out_sharding=names, eager_sharding=False)


def _weight(param, dt):
  """A projection weight in the compute dtype. A weight that qwix quantized (QLoRA) is no longer
  an nnx.Param: it goes into the einsum as it is, where qwix intercepts it."""
  return param[...].astype(dt) if isinstance(param, nnx.Variable) else param


def _normal(rngs: nnx.Rngs, shape, dtype):
  return INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32).astype(dtype)


class RMSNorm(nnx.Module):

  def __init__(self, config: ModelConfig):
    self.eps = config.rms_norm_eps
    self.plus_one = config.gemma_norm
    init = jnp.zeros if self.plus_one else jnp.ones
    self.weight = _param(init((config.hidden_size,), config.param_dtype), 'norm')

  def __call__(self, x):  # [..., D]
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    if self.plus_one:  # Gemma multiplies in float32, then casts.
      return (normed * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)
    return self.weight[...].astype(x.dtype) * normed.astype(x.dtype)  # Llama casts, then multiplies.


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
  """Inverse frequencies [H/2] (float32), with the llama3 long-context rescaling if configured."""
  h = config.head_dim
  inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, h, 2, dtype=np.float32) / h))
  inv_freq = inv_freq.astype(np.float32)
  if config.rope_scaling is None:
    return inv_freq
  s = config.rope_scaling_dict  # llama3: divide low frequencies by `factor`, interpolate the middle.
  factor, low, high = s['factor'], s['low_freq_factor'], s['high_freq_factor']
  old_len = s['original_max_position_embeddings']
  wavelen = 2 * np.pi / inv_freq
  scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(config: ModelConfig, positions):
  """cos, sin [B, L, H] in the compute dtype (HF's half-split layout: freqs repeated twice)."""
  freqs = positions.astype(jnp.float32)[..., None] * rope_inv_freq(config)  # [B, L, H/2]
  freqs = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(freqs).astype(config.dtype), jnp.sin(freqs).astype(config.dtype)


def apply_rope(x, cos, sin):  # x [B, L, N, H]; cos, sin [B, L, H]
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


class Attention(nnx.Module):

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    c = config
    self.config = c
    d, n, k, h, pd = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.param_dtype
    self.q_proj = _param(_normal(rngs, (d, n, h), pd), 'embed', 'heads', 'head_dim')
    self.k_proj = _param(_normal(rngs, (d, k, h), pd), 'embed', 'kv_heads', 'head_dim')
    self.v_proj = _param(_normal(rngs, (d, k, h), pd), 'embed', 'kv_heads', 'head_dim')
    self.o_proj = _param(_normal(rngs, (n, h, d), pd), 'heads', 'head_dim', 'embed')
    if c.qkv_bias:
      self.q_bias = _param(jnp.zeros((n, h), pd), 'heads', 'head_dim')
      self.k_bias = _param(jnp.zeros((k, h), pd), 'kv_heads', 'head_dim')
      self.v_bias = _param(jnp.zeros((k, h), pd), 'kv_heads', 'head_dim')

  def __call__(self, x, cos, sin, segment_ids, cache=None):
    # x [B, L, D]; segment_ids [B, L] or None; with a cache (decoding), the 4th argument is the
    # cache's mask [B, 1, L, S] (kv_cache.advance) instead.
    # Projections end in .astype(dt): a no-op here, it keeps qwix LoRA deltas (stored in the
    # parameter dtype) from promoting the activations.
    dt = self.config.dtype
    q = jnp.einsum('BLD,DNH->BLNH', x, _weight(self.q_proj, dt)).astype(dt)
    k = jnp.einsum('BSD,DKH->BSKH', x, _weight(self.k_proj, dt)).astype(dt)
    v = jnp.einsum('BSD,DKH->BSKH', x, _weight(self.v_proj, dt)).astype(dt)
    if self.config.qkv_bias:
      q = q + self.q_bias[...].astype(dt)
      k = k + self.k_bias[...].astype(dt)
      v = v + self.v_bias[...].astype(dt)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if cache is not None:  # Decoding: attend over the KV cache (kv_cache.LayerCache).
      out, cache = kv_cache.attend(q, k, v, segment_ids, cache)
      # The same projection as below (a QLoRA weight is no Param; the delta keeps dtype dt).
      return jnp.einsum('BLNH,NHD->BLD', out, _weight(self.o_proj, dt)).astype(dt), cache
    # Causal within segments, grouped-query (K < N), scale 1/sqrt(H); the kernel per platform.
    out = attention_lib.attend(q, k, v, segment_ids, self.config.attention_impl)  # [B, L, N, H]
    return jnp.einsum('BLNH,NHD->BLD', out, _weight(self.o_proj, dt)).astype(dt)


class MLP(nnx.Module):

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    c = config
    self.config = c
    d, f, pd = c.hidden_size, c.intermediate_size, c.param_dtype
    self.gate_proj = _param(_normal(rngs, (d, f), pd), 'embed', 'mlp')
    self.up_proj = _param(_normal(rngs, (d, f), pd), 'embed', 'mlp')
    self.down_proj = _param(_normal(rngs, (f, d), pd), 'mlp', 'embed')

  def __call__(self, x):  # [B, L, D]
    dt = self.config.dtype
    gate = jnp.einsum('BLD,DF->BLF', x, _weight(self.gate_proj, dt)).astype(dt)
    up = jnp.einsum('BLD,DF->BLF', x, _weight(self.up_proj, dt)).astype(dt)
    if self.config.activation == 'silu':
      act = jax.nn.silu(gate)
    else:  # GeGLU with the tanh approximation (HF gelu_pytorch_tanh).
      act = jax.nn.gelu(gate, approximate=True)
    return jnp.einsum('BLF,FD->BLD', act * up, _weight(self.down_proj, dt)).astype(dt)


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(config)
    self.attn = Attention(config, rngs)
    self.mlp_norm = RMSNorm(config)
    self.mlp = MLP(config, rngs)

  def __call__(self, x, cos, sin, segment_ids, cache=None):
    if cache is not None:  # Decoding: (x, cache) out (kv_cache.LayerCache); segment_ids = mask.
      attn, cache = self.attn(self.attn_norm(x), cos, sin, segment_ids, cache)
      x = x + attn
      return x + self.mlp(self.mlp_norm(x)), cache
    x = x + self.attn(self.attn_norm(x), cos, sin, segment_ids)
    return x + self.mlp(self.mlp_norm(x))


def segment_positions(segment_ids):
  """0-based position of each token within its run of equal segment ids. [B, L] -> [B, L]."""
  idx = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)[None, :]
  starts = jnp.concatenate(
      [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
  return idx - start_idx


class Decoder(nnx.Module):
  """Token ids [B, L] -> DecoderOutput(logits [B, L, V] float32, hidden [B, L, D])."""

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    c = config
    self.config = c
    self.embed = _param(_normal(rngs, (c.vocab_size, c.hidden_size), c.param_dtype),
                        'vocab', 'embed')
    if c.scan_layers:
      # One Block whose every parameter has a leading [Y] axis, named 'layers' for sharding.
      @nnx.split_rngs(splits=c.num_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
      def stacked(rngs):
        return Block(c, rngs)
      self.layers = stacked(rngs)
    else:
      self.layers = nnx.List([Block(c, rngs) for _ in range(c.num_layers)])
    self.final_norm = RMSNorm(c)
    self.lm_head = (None if c.tie_embeddings else
                    _param(_normal(rngs, (c.hidden_size, c.vocab_size), c.param_dtype),
                           'embed', 'vocab'))

  def embed_tokens(self, tokens):
    """int32 [B, L] -> [B, L, D] in the compute dtype (Gemma: times sqrt(D))."""
    dt = self.config.dtype
    x = jnp.take(self.embed[...], tokens, axis=0).astype(dt)
    if self.config.scale_embeddings:
      # HF casts the normaliser to the compute dtype first (sqrt(2048) -> 45.25 in bf16).
      x = x * jnp.asarray(self.config.hidden_size ** 0.5, dt)
    return x

  def __call__(self, tokens, positions=None, segment_ids=None, attention_mask=None, cache=None):
    return self.from_embeddings(self.embed_tokens(tokens), positions, segment_ids, attention_mask,
                                cache)

  def from_embeddings(self, x, positions=None, segment_ids=None, attention_mask=None, cache=None):
    """The decoder after the embedding lookup: x [B, L, D] (already scaled for Gemma).

    segment_ids [B, L]: 1..k per packed sequence, 0 = padding; attention_mask [B, L] (1 = real
    token) is the unpacked alternative. Tokens attend causally within their own segment only.
    Positions default to 0, 1, ... within each segment (or arange(L) with neither given).
    With a `cache` (kv_cache.KVCache), the tokens continue the cached ones: positions and the
    mask come from the cache (attention_mask [B, L] marks left padding), and the output carries
    the updated cache.
    """
    if cache is None:
      hidden = self.hidden_states(x, positions, segment_ids, attention_mask)
    else:
      hidden, cache = self.hidden_states(x, positions, segment_ids, attention_mask, cache)
    return DecoderOutput(logits=self.logits(hidden), hidden=hidden, cache=cache)

  def hidden_states(self, x, positions=None, segment_ids=None, attention_mask=None, cache=None):
    """from_embeddings without the LM head: the final-norm hidden states [B, L, D]; with a
    `cache`, (hidden states, the cache moved past these tokens).

    Every forward goes through this method: qwix's LoRA/QLoRA interception wraps it
    (mos_jax.models.lora).
    """
    c = self.config
    if cache is not None:
      positions, mask, cache = kv_cache.advance(cache, attention_mask, x.shape[:2])
    elif attention_mask is not None:
      ones = jnp.ones(attention_mask.shape, jnp.int32)
      segment_ids = jnp.where(attention_mask.astype(bool),
                              ones if segment_ids is None else segment_ids, 0)
    if positions is None:
      if segment_ids is None:
        positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
      else:
        positions = segment_positions(segment_ids)
    # Attention stays within segments (mos_jax.models.attention). Padding (segment 0) attends to
    # padding, and causality keeps the diagonal, so padded rows stay finite (no NaN gradients).
    cos, sin = rope_tables(c, positions)
    # Pin activations to batch sharding: left to propagation from the FSDP-sharded weights,
    # every device would compute the whole batch (README: "Memory per device"). No-op without a mesh.
    x = sharding_lib.constrain(x, 'batch', None, 'embed')

    def apply(block, x, cos, sin, segment_ids):
      return sharding_lib.constrain(block(x, cos, sin, segment_ids), 'batch', None, 'embed')
    if c.remat != 'none':
      apply = nnx.remat(apply, policy=REMAT_POLICIES[c.remat])
    if cache is not None:
      x, cache = kv_cache.run_layers(self.layers, c.scan_layers, x, cos, sin, mask, cache)
    elif c.scan_layers:
      @nnx.scan(in_axes=(0, nnx.Carry, None, None, None), out_axes=nnx.Carry)
      def scan_body(block, x, cos, sin, segment_ids):
        return apply(block, x, cos, sin, segment_ids)
      x = scan_body(self.layers, x, cos, sin, segment_ids)
    else:
      for block in self.layers:
        x = apply(block, x, cos, sin, segment_ids)
    hidden = self.final_norm(x)
    return hidden if cache is None else (hidden, cache)

  def head_weight(self):
    """The LM head and its layout: ([V, D] embedding table, True) if tied, else ([D, V], False)."""
    if self.config.tie_embeddings:
      return self.embed[...], True
    return self.lm_head[...], False

  def logits(self, hidden):
    """[B, L, D] -> [B, L, V] float32 (the whole vocabulary at once; losses use
    mos_jax.models.loss.chunked_token_nll instead)."""
    weight, vocab_first = self.head_weight()
    return loss_lib.lm_head(hidden, weight, vocab_first, self.config.dtype)


def abstract_model(config: ModelConfig) -> Decoder:
  """The model with ShapeDtypeStruct leaves: no memory, any size."""
  return nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))


def init_model(config: ModelConfig, seed: int = 0, mesh: jax.sharding.Mesh | None = None) -> Decoder:
  """A randomly initialised model, each parameter created directly on its sharding."""
  graphdef, abstract_state = nnx.split(abstract_model(config))
  shardings = None if mesh is None else sharding_lib.state_shardings(abstract_state, mesh)
  create = lambda: nnx.state(Decoder(config, rngs=nnx.Rngs(seed)))
  state = jax.jit(create, out_shardings=shardings)()
  return nnx.merge(graphdef, state)
