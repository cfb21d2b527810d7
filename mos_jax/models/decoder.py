"""The decoder (Llama / Qwen2 / Qwen3 / Mistral / Gemma 1-3) in Flax NNX: one module, families
as ModelConfig options (QK-norm, sandwich norms, soft-capping, sliding-window layers).

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
from flax import nnx

from mos_jax.models import loss as loss_lib
from mos_jax.infra import sharding as sharding_lib
from mos_jax.models import kv_cache
from mos_jax.models import attention as attention_lib
from mos_jax.models.config import ModelConfig
from mos_jax.models.rope import apply_rope, rope_tables

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
  """Over the hidden size, or over head_dim (`per_head`: Qwen3 / Gemma 3 QK-norm)."""

  def __init__(self, config: ModelConfig, per_head: bool = False):
    self.eps = config.rms_norm_eps
    self.plus_one = config.gemma_norm
    init = jnp.zeros if self.plus_one else jnp.ones
    size = config.head_dim if per_head else config.hidden_size
    self.weight = _param(init((size,), config.param_dtype), 'head_dim' if per_head else 'norm')

  def __call__(self, x):  # [..., D]
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    if self.plus_one:  # Gemma multiplies in float32, then casts.
      return (normed * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)
    return self.weight[...].astype(x.dtype) * normed.astype(x.dtype)  # Llama casts, then multiplies.


class Attention(nnx.Module):
  """Grouped-query attention with RoPE. `local`: this layer's kind (True = sliding window and
  the local RoPE), or None in a stacked block whose layers differ (then given per call)."""

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs, local: bool | None = None):
    c = config
    self.config = c
    self.local = local
    d, n, k, h, pd = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.param_dtype
    self.q_proj = _param(_normal(rngs, (d, n, h), pd), 'embed', 'heads', 'head_dim')
    self.k_proj = _param(_normal(rngs, (d, k, h), pd), 'embed', 'kv_heads', 'head_dim')
    self.v_proj = _param(_normal(rngs, (d, k, h), pd), 'embed', 'kv_heads', 'head_dim')
    self.o_proj = _param(_normal(rngs, (n, h, d), pd), 'heads', 'head_dim', 'embed')
    if c.qkv_bias:
      self.q_bias = _param(jnp.zeros((n, h), pd), 'heads', 'head_dim')
      self.k_bias = _param(jnp.zeros((k, h), pd), 'kv_heads', 'head_dim')
      self.v_bias = _param(jnp.zeros((k, h), pd), 'kv_heads', 'head_dim')
    if c.qk_norm:
      self.q_norm = RMSNorm(c, per_head=True)
      self.k_norm = RMSNorm(c, per_head=True)

  def __call__(self, x, rope, segment_ids, local=None, cache=None):
    # x [B, L, D]; rope: rope.Rope; segment_ids [B, L] or None; with a cache (decoding), the 3rd
    # argument is the cache's masks (kv_cache.advance) instead. `local` (traced) only when
    # self.local is None.
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
    if self.config.qk_norm:  # Per head, before RoPE (Qwen3Attention, Gemma3Attention).
      q, k = self.q_norm(q), self.k_norm(k)
    local = self.local if self.local is not None else local
    cos, sin = rope.pick(local)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    c = self.config
    if cache is not None:  # Decoding: attend over the KV cache (kv_cache.LayerCache).
      out, cache = kv_cache.attend(q, k, v, segment_ids, cache, local, scale=c.attention_scale,
                                   softcap=c.attn_logit_softcap)
      # The same projection as below (a QLoRA weight is no Param; the delta keeps dtype dt).
      return jnp.einsum('BLNH,NHD->BLD', out, _weight(self.o_proj, dt)).astype(dt), cache
    # Causal within segments (and the window), grouped-query (K < N); the kernel per platform.
    def run(window):
      return lambda q, k, v, seg: attention_lib.attend(
          q, k, v, seg, c.attention_impl, scale=c.attention_scale, softcap=c.attn_logit_softcap,
          window=window)
    if isinstance(local, bool):
      out = run(c.sliding_window if local else None)(q, k, v, segment_ids)  # [B, L, N, H]
    else:  # A scanned stack of mixed layers: each kernel keeps a static window.
      out = jax.lax.cond(local, run(c.sliding_window), run(None), q, k, v, segment_ids)
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
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)); with post_norms (Gemma 2
  / 3) the attention and MLP outputs are normed too: x + norm(attn(norm(x)))."""

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs, local: bool | None = None):
    self.attn_norm = RMSNorm(config)
    self.attn = Attention(config, rngs, local)
    self.mlp_norm = RMSNorm(config)
    self.mlp = MLP(config, rngs)
    if config.post_norms:
      self.attn_post_norm = RMSNorm(config)
      self.mlp_post_norm = RMSNorm(config)

  def _post(self, name, y):
    return getattr(self, name)(y) if self.attn.config.post_norms else y

  def __call__(self, x, rope, segment_ids, local=None, cache=None):
    if cache is not None:  # Decoding: (x, cache) out (kv_cache.LayerCache); segment_ids = masks.
      attn, cache = self.attn(self.attn_norm(x), rope, segment_ids, local, cache)
      x = x + self._post('attn_post_norm', attn)
      return x + self._post('mlp_post_norm', self.mlp(self.mlp_norm(x))), cache
    x = x + self._post('attn_post_norm', self.attn(self.attn_norm(x), rope, segment_ids, local))
    return x + self._post('mlp_post_norm', self.mlp(self.mlp_norm(x)))


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
    kinds = c.local_layers
    if c.scan_layers:
      # One Block whose every parameter has a leading [Y] axis, named 'layers' for sharding. Its
      # layer kind is static when all layers share it; else each step of the scan is told.
      uniform = kinds[0] if len(set(kinds)) == 1 else None
      @nnx.split_rngs(splits=c.num_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
      def stacked(rngs):
        return Block(c, rngs, uniform)
      self.layers = stacked(rngs)
    else:
      self.layers = nnx.List([Block(c, rngs, kinds[i]) for i in range(c.num_layers)])
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
      positions, mask, cache = kv_cache.advance(cache, attention_mask, x.shape[:2],
                                                c.sliding_window)
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
    rope = rope_tables(c, positions)
    kinds = jnp.asarray(c.local_layers)  # [Y] bool, read by a scanned stack of mixed layers
    # Pin activations to batch sharding: left to propagation from the FSDP-sharded weights,
    # every device would compute the whole batch (README: "Memory per device"). No-op without a mesh.
    x = sharding_lib.constrain(x, 'batch', None, 'embed')

    def apply(block, x, rope, segment_ids, local):
      return sharding_lib.constrain(block(x, rope, segment_ids, local), 'batch', None, 'embed')
    if c.remat != 'none':
      apply = nnx.remat(apply, policy=REMAT_POLICIES[c.remat])
    if cache is not None:
      x, cache = kv_cache.run_layers(self.layers, c.scan_layers, x, rope, mask, cache, kinds)
    elif c.scan_layers:
      @nnx.scan(in_axes=(0, nnx.Carry, None, None, 0), out_axes=nnx.Carry)
      def scan_body(block, x, rope, segment_ids, local):
        return apply(block, x, rope, segment_ids, local)
      x = scan_body(self.layers, x, rope, segment_ids, kinds)
    else:
      for block in self.layers:
        x = apply(block, x, rope, segment_ids, None)
    hidden = self.final_norm(x)
    return hidden if cache is None else (hidden, cache)

  def head_weight(self):
    """The LM head and its layout: ([V, D] embedding table, True) if tied, else ([D, V], False)."""
    if self.config.tie_embeddings:
      return self.embed[...], True
    return self.lm_head[...], False

  def logits(self, hidden):
    """[B, L, D] -> [B, L, V] float32, soft-capped with final_logit_softcap (the whole
    vocabulary at once; losses use
    mos_jax.models.loss.chunked_token_nll instead)."""
    weight, vocab_first = self.head_weight()
    return loss_lib.lm_head(hidden, weight, vocab_first, self.config.dtype,
                            self.config.final_logit_softcap)


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
