"""Token-level negative log-likelihood with an explicit weight mask."""

import jax
import jax.numpy as jnp


def token_nll(logits, targets):
  """NLL of each target token. logits [B, L, V] (any float dtype), targets [B, L] -> [B, L] fp32."""
  logits = logits.astype(jnp.float32)
  log_norm = jax.nn.logsumexp(logits, axis=-1)  # [B, L]
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [B, L]
  return log_norm - target_logit


def masked_sums(nll, loss_mask):
  """Per-row sum of masked NLL and trained-token count: ([B], [B])."""
  return (nll * loss_mask).sum(axis=-1), loss_mask.sum(axis=-1)


def per_example_mean_nll(nll, loss_mask):
  """Mean NLL over each row's trained tokens; rows with none give 0 (and are marked invalid)."""
  total, count = masked_sums(nll, loss_mask)
  return total / jnp.maximum(count, 1.0), count > 0


def per_dataset_sums(row_values, dataset_ids, num_datasets):
  """Adds row values into their dataset's slot: [B] -> [N]."""
  return jax.ops.segment_sum(row_values, dataset_ids, num_segments=num_datasets)
