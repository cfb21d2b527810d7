"""Rewards of Sec. 3.2: COSSIM (Eq. 7-8), DIFF (Eq. 9-10), the EMA (Eq. 11) and MoSpec variants.

All functions are pure and jittable; `target` and `factor` are static Python values.
Shapes: N datasets, B examples per reward batch, L tokens, D hidden size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_EPS = 1e-8


def _masked_mean(x: jax.Array, weight: jax.Array, axis) -> jax.Array:
  """Mean of `x` weighted by 0/1 `weight` over `axis`; 0 where the weights sum to 0 (no NaN)."""
  total = jnp.sum(weight, axis=axis)
  return jnp.sum(x * weight, axis=axis) / jnp.maximum(total, 1.0)


def pooled_embedding(hidden: jax.Array, mask: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """Eq. 7: mean of the top-layer hidden states over each example's tokens, then over the batch.

  hidden [B, L, D], mask [B, L] (1 = a real token of the example: the paper pools instruction and
  response, so pass the non-padding mask), valid [B] (0 = padded row). Rows without any token are
  left out of the batch mean. Returns z [D] in float32.
  """
  hidden = hidden.astype(jnp.float32)
  mask = mask.astype(jnp.float32)
  per_example = _masked_mean(hidden, mask[..., None], axis=1)  # [B, D]
  row_ok = (jnp.sum(mask, axis=1) > 0).astype(jnp.float32)  # [B]
  if valid is not None:
    row_ok = row_ok * valid.astype(jnp.float32)
  return _masked_mean(per_example, row_ok[:, None], axis=0)  # [D]


def cossim(z: jax.Array, target: int | None = None) -> jax.Array:
  """Eq. 8: R(i) = (1/N) sum_n cos(z_i, z_n), itself included.  MoSpec: R(i) = cos(z_i, z_target).

  z [N, D] -> [N]. A zero embedding has cosine 0 with everything (no NaN).
  """
  z = z.astype(jnp.float32)
  unit = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), _EPS)  # [N, D]
  if target is not None:
    return unit @ unit[target]  # [N]
  return jnp.mean(unit @ unit.T, axis=1)  # [N]


def diff(nll: jax.Array, nll0: jax.Array, valid: jax.Array, target: int | None = None,
         factor: float = 2.0) -> jax.Array:
  """Eq. 10: R(i) = mean over valid examples of PPL(theta) / PPL(theta_0) = exp(nll - nll0).

  nll, nll0 [N, B] are per-example mean token NLLs under the current and the initial model;
  valid [N, B] marks real examples. A dataset with no valid example gets the neutral reward 1.
  MoSpec: the target dataset's reward is multiplied by `factor` (the paper doubles it).
  """
  valid = valid.astype(jnp.float32)
  # Zero the log-ratio of invalid rows before exp: padding may hold inf/NaN NLLs.
  log_ratio = jnp.where(valid > 0, nll.astype(jnp.float32) - nll0.astype(jnp.float32), 0.0)
  ratio = jnp.exp(log_ratio)  # [N, B]
  r = jnp.where(jnp.sum(valid, axis=1) > 0, _masked_mean(ratio, valid, axis=1), 1.0)  # [N]
  if target is not None:
    r = r.at[target].multiply(factor)
  return r


def ema(prev: jax.Array, new: jax.Array, alpha: float) -> jax.Array:
  """Eq. 11: alpha * new + (1 - alpha) * prev; alpha weights the NEW reward (paper: 0.9)."""
  return alpha * new + (1.0 - alpha) * prev


def normalize(r: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Standardise rewards across datasets (zero mean, unit std); all-equal rewards map to 0."""
  centred = r - jnp.mean(r)
  return centred / (jnp.std(r) + eps)


def token_entropy(logits: jax.Array) -> jax.Array:
  """Predictive entropy of each position: logits [..., V] -> [...] in float32 (log V if uniform)."""
  logits = logits.astype(jnp.float32)
  log_p = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)
