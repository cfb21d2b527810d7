"""Causal self-attention within segments, by one of several kernels chosen per platform.

Every path computes the same thing: query i of row b attends to keys j <= i with
segment_ids[b, j] == segment_ids[b, i] (padding is segment 0; it only meets other padding, so no
row is fully masked and padded rows stay finite), and with a sliding `window` W only to keys
i - j < W (the query itself included, as transformers' sliding_window_overlay). Scores are q.k
times `scale` (default head_dim**-0.5), then soft-capped to cap * tanh(s / cap) with a `softcap`
(Gemma 2). Only 'xla' materialises a mask.

  'xla'        jax.nn.dot_product_attention with a dense [B, 1, L, S] mask: the reference, any device.
  'cudnn'      cuDNN flash attention (jax.nn.dot_product_attention) with per-row sequence lengths.
               Only right-padded single-segment rows fit that description, so a batch where any
               row is packed (or left-padded) goes to the Triton kernel instead (a runtime branch);
               so do fp32 inputs and head dims cuDNN's flash kernel does not take on the GPU.
  'triton'     Pallas flash attention for GPUs (jax.experimental.pallas.ops.gpu.attention) with
               segment ids.
  'splash'     Pallas splash attention for TPUs with a causal mask and segment ids (as MaxText).
  ''/None      auto: 'splash' on TPU, 'cudnn' on GPU, 'xla' elsewhere.

Window and soft-cap per kernel: 'xla' and 'splash' (LocalMask, attn_logits_soft_cap) do both;
'cudnn' does the window (local_window_size) but not the soft-cap; 'triton' does neither. A layer
that needs what its kernel lacks runs on 'xla' instead and says so once in the log (never a
silently different result): Gemma 2 on GPUs runs attention on 'xla'.

'triton' and 'splash' run on the CPU in Pallas interpret mode (slow; it is how tests check them).
The Pallas kernels see one device's rows: under a mesh they run inside `shard_map`, rows split as
the batch is ('batch' axis) and heads as tensor parallelism splits them ('heads').

Shapes: q [B, L, N, H], k and v [B, S, K, H] (K divides N: grouped-query attention), segment_ids
[B, L] int (L == S). Output [B, L, N, H].
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from mos_jax.infra import sharding as sharding_lib

IMPLS = (None, 'xla', 'cudnn', 'triton', 'splash')
_BLOCK = 128  # Pallas tiles: sequences are padded to a multiple of this (or a power of two below).


def resolve(impl: str | None, platform: str | None = None) -> str:
  """The kernel an `attention_impl` setting means on `platform` (default: jax's backend)."""
  if impl not in IMPLS + ('',):
    raise ValueError(f'attention_impl {impl!r} is not one of {IMPLS}.')
  if impl:
    return impl
  platform = platform or jax.default_backend()
  return {'tpu': 'splash', 'gpu': 'cudnn', 'cuda': 'cudnn', 'rocm': 'xla'}.get(platform, 'xla')


# What each kernel cannot do; a layer that needs it falls back to 'xla' (module docstring).
_LACKS = {'triton': ('window', 'softcap'), 'cudnn': ('softcap',)}
_said: set = set()


def _fallback(kind: str, needs: tuple[str, ...]) -> str:
  missing = [n for n in needs if n in _LACKS.get(kind, ())]
  if not missing:
    return kind
  message = (f'attention_impl {kind!r} has no {" / ".join(missing)}: these layers run on the xla '
             'attention instead (docs/models.md).')
  if message not in _said:
    _said.add(message)
    logging.getLogger(__name__).warning(message)
  return 'xla'


def attend(q, k, v, segment_ids, impl: str | None = None, *, scale: float | None = None,
           softcap: float | None = None, window: int | None = None):
  """Causal attention within segments (and a sliding `window`, soft-capped scores); see the
  module docstring. Returns [B, L, N, H]."""
  interpret = jax.default_backend() == 'cpu'
  scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
  needs = tuple(n for n, x in (('window', window), ('softcap', softcap)) if x is not None)
  kind = _fallback(resolve(impl), needs)
  if kind == 'xla':
    return _xla(q, k, v, segment_ids, scale, softcap, window)
  if segment_ids is None:
    segment_ids = jnp.ones(q.shape[:2], jnp.int32)
  options = dict(scale=scale, softcap=softcap, window=window)
  if kind == 'cudnn':
    if _cudnn_fits(q):
      return _cudnn_or_other(q, k, v, segment_ids, **options)
    kind = _fallback('triton', needs)  # fp32, or a head_dim cuDNN's flash kernel does not take.
    if kind == 'xla':
      return _xla(q, k, v, segment_ids, scale, softcap, window)
  kernel = functools.partial({'triton': _triton, 'splash': _splash}[kind], **options)
  return _per_shard(functools.partial(_padded, kernel, interpret=interpret), q, k, v, segment_ids)


def dense(q, k, v, mask, *, scale: float, softcap: float | None = None):
  """The reference attention over an explicit mask [B, 1, L, S] (True = attend; None = all).

  q [B, L, N, H], k and v [B, S, K, H]: scores in fp32 (as jax.nn.dot_product_attention's xla
  path), soft-capped before masking (as transformers' eager_attention_forward), softmax in fp32.
  """
  b, length, n, h = q.shape
  groups = n // k.shape[2]
  q = q.reshape(b, length, k.shape[2], groups, h)
  scores = jnp.einsum('BLKGH,BSKH->BKGLS', q, k, preferred_element_type=jnp.float32)
  scores = scores * jnp.float32(scale)
  if softcap is not None:
    scores = jnp.float32(softcap) * jnp.tanh(scores / jnp.float32(softcap))
  if mask is not None:
    scores = jnp.where(mask[:, :, None], scores, jnp.float32(-0.7 * np.finfo(np.float32).max))
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum('BKGLS,BSKH->BLKGH', probs, v).reshape(b, length, n, h)


def causal_mask(segment_ids, length: int, window: int | None = None):
  """[B or 1, 1, L, L] bool: causal, within segments (None: one segment), within the window."""
  i = jnp.arange(length)[:, None]
  j = jnp.arange(length)[None, :]
  mask = (j <= i) if window is None else (j <= i) & (i - j < window)  # [L, S]
  mask = mask[None, None]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
  return mask


def _xla(q, k, v, segment_ids, scale, softcap, window):
  return dense(q, k, v, causal_mask(segment_ids, q.shape[1], window), scale=scale,
               softcap=softcap)


def _cudnn_fits(q) -> bool:
  """cuDNN flash attention takes bf16/fp16 with head_dim a multiple of 8, at most 128 (256 from
  Hopper, compute capability 9.0, on)."""
  if q.dtype not in (jnp.bfloat16, jnp.float16) or q.shape[-1] % 8:
    return False
  capability = getattr(jax.devices()[0], 'compute_capability', '0')
  return q.shape[-1] <= (256 if float(capability) >= 9.0 else 128)


def _cudnn_or_other(q, k, v, segment_ids, *, scale, softcap, window):
  """cuDNN with sequence lengths where every row is one right-padded sequence, else Triton
  (or 'xla' where Triton lacks the window)."""
  lengths = (segment_ids > 0).sum(axis=1).astype(jnp.int32)  # [B]
  prefix = jnp.arange(segment_ids.shape[1])[None, :] < lengths[:, None]  # [B, L]
  simple = jnp.all(segment_ids == prefix.astype(segment_ids.dtype))

  def cudnn(q, k, v, segment_ids):
    out = jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=True, query_seq_lengths=lengths,
        key_value_seq_lengths=lengths, implementation='cudnn',
        local_window_size=None if window is None else (window - 1, 0))
    # Padded queries have no keys under sequence lengths; the reference gives them padding's
    # attention. They carry no loss; zeros keep them finite.
    return jnp.where(prefix[:, :, None, None], out, 0).astype(q.dtype)

  def other(q, k, v, segment_ids):
    if _fallback('triton', ('window',) if window is not None else ()) == 'xla':
      return _xla(q, k, v, segment_ids, scale, softcap, window)
    kernel = functools.partial(_triton, scale=scale, softcap=softcap, window=window)
    return _per_shard(functools.partial(_padded, kernel, interpret=False), q, k, v, segment_ids)

  return jax.lax.cond(simple, cudnn, other, q, k, v, segment_ids)


def _padded(kernel, q, k, v, segment_ids, *, interpret):
  """Pads the sequence to the kernels' tile size; the pad is one more padding segment at the end
  (after every real token, so causality keeps it out of real rows)."""
  length = q.shape[1]
  target = _BLOCK * -(-length // _BLOCK)  # Splash tiles are multiples of 128 (TPU lanes).
  if kernel.func is _triton and length < _BLOCK:
    target = max(16, 1 << (length - 1).bit_length())  # Triton tiles: a power of two.
  if target != length:
    pad = lambda x: jnp.pad(x, [(0, 0), (0, target - length)] + [(0, 0)] * (x.ndim - 2))
    q, k, v, segment_ids = pad(q), pad(k), pad(v), pad(segment_ids)
  return kernel(q, k, v, segment_ids, interpret=interpret)[:, :length]


def _triton(q, k, v, segment_ids, *, interpret, scale, softcap, window):
  assert softcap is None and window is None, 'attend() sends these to xla'
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention
  groups = q.shape[2] // k.shape[2]
  if groups > 1:  # The kernel wants as many key/value heads as query heads.
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
  block = min(_BLOCK, q.shape[1])
  small = 32 if q.shape[-1] <= 128 else 16  # Backward tiles; head_dim 256 (Gemma) needs smaller.
  sizes = gpu_attention.BlockSizes(
      block_q=block if q.shape[-1] <= 128 else min(block, 64), block_k=min(block, 64),
      block_q_dkv=min(small, block), block_kv_dkv=min(small, block),
      block_q_dq=min(small, block), block_kv_dq=min(small, block))
  return gpu_attention.mha(q, k, v, segment_ids.astype(jnp.int32),
                           sm_scale=scale, causal=True, block_sizes=sizes,
                           interpret=interpret)


def _splash(q, k, v, segment_ids, *, interpret, scale, softcap, window):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
  _, length, n, h = q.shape
  block = _BLOCK
  causal = (masks.CausalMask(shape=(length, length)) if window is None else
            masks.LocalMask(shape=(length, length), window_size=(window - 1, 0), offset=0))
  kernel = splash.make_splash_mha(
      mask=masks.MultiHeadMask(masks=(causal,) * n), head_shards=1, q_seq_shards=1,
      attn_logits_soft_cap=softcap,
      block_sizes=splash.BlockSizes(
          block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block),
      interpret=interpret)
  to_heads = lambda x: x.swapaxes(1, 2)  # [B, L, N, H] -> [B, N, L, H]
  q = to_heads(q) * jnp.asarray(scale, q.dtype)  # Splash does not scale (it soft-caps q.k).
  ids = segment_ids.astype(jnp.int32)
  out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(q=s, kv=s)))(
      q, to_heads(k), to_heads(v), ids)
  return to_heads(out)


def _per_shard(fn, q, k, v, segment_ids):
  """Runs a Pallas kernel on each device's rows and heads (a custom call is not partitioned)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return fn(q, k, v, segment_ids)
  heads = sharding_lib.logical_to_mesh_spec(('batch', None, 'heads', None), q.shape, mesh)
  kv_heads = sharding_lib.logical_to_mesh_spec(('batch', None, 'heads', None), k.shape, mesh)
  if kv_heads[2] != heads[2]:  # Too few key/value heads to split like the queries: keep whole.
    heads = kv_heads = sharding_lib.logical_to_mesh_spec(('batch', None, None, None), q.shape, mesh)
  rows = jax.sharding.PartitionSpec(heads[0], None)
  return jax.shard_map(fn, mesh=mesh, in_specs=(heads, kv_heads, kv_heads, rows), out_specs=heads,
                       check_vma=False)(q, k, v, segment_ids)
