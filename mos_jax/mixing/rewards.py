"""Rewards of Sec. 3.2: COSSIM (Eq. 7-8), DIFF (Eq. 9-10), the EMA (Eq. 11) and MoSpec variants.

All functions are pure and jittable; `target` and `factor` are static Python values.
Shapes: N datasets, B example slots per reward batch, L tokens, D hidden size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_EPS = 1e-8


def _masked_mean(x: jax.Array, weight: jax.Array, axis) -> jax.Array:
  """Mean of `x` weighted by 0/1 `weight` over `axis`; 0 where the weights sum to 0 (no NaN)."""
  total = jnp.sum(weight, axis=axis)
  return jnp.sum(x * weight, axis=axis) / jnp.maximum(total, 1.0)


def segment_embedding_sums(hidden: jax.Array, segment_ids: jax.Array):
  """Eq. 7's per-example pooling on (possibly packed) rows: each example's (segment's) mean
  top-layer hidden state over its tokens (instruction and response: the paper pools both),
  summed over the row's examples.

  hidden [B, L, D], segment_ids [B, L] (1..k, 0 = padding) -> (sums [B, D] fp32, number of
  examples with a token [B] fp32). Two [B, L] x [B, L, D] contractions, nothing of [B, L, L].
  """
  hidden = hidden.astype(jnp.float32)
  b, length = segment_ids.shape
  real = (segment_ids > 0).astype(jnp.float32)
  index = jnp.maximum(segment_ids - 1, 0)  # [B, L]: the token's segment's slot in its row
  slots = jnp.arange(b)[:, None] * length + index
  tokens = jax.ops.segment_sum(real.reshape(-1), slots.reshape(-1), num_segments=b * length
                               ).reshape(b, length)  # tokens of segment k at k - 1
  # Segment 1 summed then divided, exactly as unpacked rows always were; later segments weigh
  # each token by 1 / (its segment's length), so one contraction adds up their means.
  first = jnp.einsum('BLD,BL->BD', hidden, (segment_ids == 1).astype(jnp.float32))
  first = first / jnp.maximum(tokens[:, :1], 1.0)
  own_length = jnp.take_along_axis(tokens, index, axis=1)
  later = jnp.where(segment_ids > 1, 1.0 / jnp.maximum(own_length, 1.0), 0.0)
  sums = first + jnp.einsum('BLD,BL->BD', hidden, later)
  return sums, jnp.sum(tokens > 0, axis=1).astype(jnp.float32)


def pooled_embedding(hidden: jax.Array, segment_ids: jax.Array) -> jax.Array:
  """Eq. 7: the mean over a batch's examples of each one's mean top-layer hidden state.

  hidden [B, L, D], segment_ids [B, L] (rows may pack several examples; 1 on every real token of
  an unpacked row, 0 on padding). Examples without a token are left out. Returns z [D] float32.
  """
  sums, counts = segment_embedding_sums(hidden, segment_ids)
  return jnp.sum(sums, axis=0) / jnp.maximum(jnp.sum(counts), 1.0)


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

  nll, nll0 [N, B] are per-example mean token NLLs under the current and the initial model (B
  example slots per dataset: a row's segments, steps.reward.reward_step); valid [N, B] marks the slots
  that hold an example with trained tokens. A dataset with no valid example gets the neutral
  reward 1.
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


def token_weighted_mean(sums: jax.Array, tokens: jax.Array) -> jax.Array:
  """Per-dataset mean over tokens from per-row sums: sums, tokens [N, b] -> [N] = sum_b sums /
  sum_b tokens (MultiUAT's per-batch uncertainty: every token weighs the same, so a long answer
  counts more than a short one, unlike a mean of per-example means); 0 without tokens."""
  total, count = jnp.sum(sums, axis=-1), jnp.sum(tokens, axis=-1)
  return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)
