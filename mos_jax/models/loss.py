"""Token-level negative log-likelihood with an explicit weight mask, and the chunked LM head."""

import functools

import jax
import jax.numpy as jnp

from mos_jax.infra import sharding as sharding_lib


def token_nll(logits, targets):
  """NLL of each target token. logits [B, L, V] (any float dtype), targets [B, L] -> [B, L] fp32."""
  logits = logits.astype(jnp.float32)
  log_norm = jax.nn.logsumexp(logits, axis=-1)  # [B, L]
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [B, L]
  return log_norm - target_logit


def masked_sums(nll, loss_mask):
  """Per-row sum of masked NLL and trained-token count: ([B], [B])."""
  return (nll * loss_mask).sum(axis=-1), loss_mask.sum(axis=-1)


def segment_slots(segment_ids):
  """Each token's slot in a flat [B * L] per-segment array: segment k (ids 1..k, 0 = padding) of
  row r sits at r * L + k - 1 (a row of L tokens holds at most L segments); padding gets B * L,
  out of range, which jax.ops.segment_sum drops."""
  b, length = segment_ids.shape
  slots = jnp.arange(b, dtype=jnp.int32)[:, None] * length + segment_ids - 1
  return jnp.where(segment_ids > 0, slots, b * length).reshape(-1)


def _segment_sums(values, slots, shape):
  """values [B, L] added into their segment's slot -> [B, L] (segment k of a row at k - 1)."""
  return jax.ops.segment_sum(values.reshape(-1), slots, num_segments=shape[0] * shape[1]
                             ).reshape(shape)


def per_segment_mean(values, segment_ids, loss_mask):
  """Mean of token `values` [B, L] over each packed example's (segment's) trained tokens.

  Returns (means, valid), both [B, L]: segment k of a row at index k - 1; slots without a segment
  or segments without a trained token give 0 and are invalid. O(B * L) memory (a scatter, no
  one-hot). An unpacked row is one segment, so index 0 holds its mean over the row.
  """
  slots = segment_slots(segment_ids)
  weighted = values * loss_mask
  total = _segment_sums(weighted, slots, values.shape)
  count = _segment_sums(loss_mask, slots, values.shape)
  # Segment 1 by the row reduction the per-row code used: unpacked rows keep their values bit for
  # bit (a scatter adds in another order).
  total = total.at[:, 0].set(jnp.sum(weighted * (segment_ids == 1), axis=-1))
  return total / jnp.maximum(count, 1.0), count > 0


def per_segment_value(values, segment_ids, loss_mask):
  """The value each segment carries on its trained tokens (one per example, repeated on its
  tokens, as the cached theta_0 NLL is): [B, L] per segment as in per_segment_mean, 0 without
  trained tokens. Read, not averaged, so it comes back exactly."""
  b, length = values.shape
  picked = jax.ops.segment_max(jnp.where(loss_mask > 0, values, -jnp.inf).reshape(-1),
                               segment_slots(segment_ids), num_segments=b * length)
  return jnp.where(jnp.isfinite(picked), picked, 0.0).reshape(b, length)


def per_dataset_sums(row_values, dataset_ids, num_datasets):
  """Adds row values into their dataset's slot: [B] -> [N]."""
  return jax.ops.segment_sum(row_values, dataset_ids, num_segments=num_datasets)


def _raw_logits(hidden, weight, vocab_first: bool, dtype):
  spec = '...D,VD->...V' if vocab_first else '...D,DV->...V'
  logits = jnp.einsum(spec, hidden, weight.astype(dtype), preferred_element_type=jnp.float32)
  return sharding_lib.constrain(logits, 'batch', *([None] * (logits.ndim - 2)), 'vocab')


def softcap(logits, cap: float | None):
  """cap * tanh(logits / cap) (Gemma 2's final_logit_softcapping); None = unchanged."""
  return logits if cap is None else jnp.float32(cap) * jnp.tanh(logits / jnp.float32(cap))


def lm_head(hidden, weight, vocab_first: bool, dtype, cap: float | None = None):
  """Logits [.., V] fp32 from hidden [.., D] and the LM head: [V, D] (tied) or [D, V], multiplied
  in the compute dtype with fp32 accumulation, soft-capped at `cap` (None = not)."""
  return softcap(_raw_logits(hidden, weight, vocab_first, dtype), cap)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _chunk_nll(hidden, weight, targets, vocab_first, dtype, cap):
  """NLL [B, C] of one chunk of positions; its backward recomputes the chunk's logits."""
  return token_nll(lm_head(hidden, weight, vocab_first, dtype, cap), targets)


def _chunk_nll_fwd(hidden, weight, targets, vocab_first, dtype, cap):
  logits = lm_head(hidden, weight, vocab_first, dtype, cap)  # [B, C, V] fp32, this chunk only.
  log_norm = jax.nn.logsumexp(logits, axis=-1)  # [B, C]
  nll = log_norm - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return nll, (hidden, weight, targets, log_norm)


def _chunk_nll_bwd(vocab_first, dtype, cap, residuals, g):  # g [B, C]
  hidden, weight, targets, log_norm = residuals
  raw = _raw_logits(hidden, weight, vocab_first, dtype)
  logits = softcap(raw, cap)
  probs = jnp.exp(logits - log_norm[..., None])
  d_logits = (probs - jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32)) * g[..., None]
  if cap is not None:  # d/dz cap * tanh(z / cap) = 1 - tanh(z / cap)**2.
    d_logits = d_logits * (1.0 - jnp.square(jnp.tanh(raw / jnp.float32(cap))))
  d_logits = d_logits.astype(dtype)  # The LM-head backward matmuls run in the compute dtype.
  w = weight.astype(dtype)
  if vocab_first:
    d_hidden = jnp.einsum('BCV,VD->BCD', d_logits, w, preferred_element_type=jnp.float32)
    d_weight = jnp.einsum('BCV,BCD->VD', d_logits, hidden, preferred_element_type=jnp.float32)
  else:
    d_hidden = jnp.einsum('BCV,DV->BCD', d_logits, w, preferred_element_type=jnp.float32)
    d_weight = jnp.einsum('BCD,BCV->DV', hidden, d_logits, preferred_element_type=jnp.float32)
  return d_hidden.astype(hidden.dtype), d_weight.astype(weight.dtype), None


_chunk_nll.defvjp(_chunk_nll_fwd, _chunk_nll_bwd)


def chunked_token_nll(hidden, weight, targets, *, vocab_first: bool, dtype, chunk: int,
                      cap: float | None = None):
  """token_nll(lm_head(hidden, weight, cap)) without [B, L, V] logits in the forward or backward
  pass (`cap`: the model's final_logit_softcap).

  hidden [B, L, D], targets [B, L] -> [B, L] fp32. Positions are taken `chunk` at a time
  (0 = all at once) by a scan: each step holds one [B, chunk, V] fp32 block, and the backward pass
  recomputes it rather than storing it. The head's gradient is summed over chunks in fp32 (the
  weight enters the scan as fp32).
  """
  b, length, d = hidden.shape
  c = length if chunk <= 0 else min(chunk, length)
  n = -(-length // c)
  if n * c != length:  # Pad positions to whole chunks; padded targets are dropped below.
    hidden = jnp.pad(hidden, ((0, 0), (0, n * c - length), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, n * c - length)))
  weight32 = weight.astype(jnp.float32)
  hidden = hidden.reshape(b, n, c, d).swapaxes(0, 1)  # [n, B, c, D]
  targets = targets.reshape(b, n, c).swapaxes(0, 1)  # [n, B, c]

  def step(_, chunk_in):
    h, t = chunk_in
    return None, _chunk_nll(h, weight32, t, vocab_first, jnp.dtype(dtype), cap)

  _, nll = jax.lax.scan(step, None, (hidden, targets))  # [n, B, c]
  return nll.swapaxes(0, 1).reshape(b, n * c)[:, :length]
