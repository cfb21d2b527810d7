"""Pure step functions: the SFT train step, the reward forward, and the dev-loss forward.

Nothing here jits or places data; `mos_jax.trainer` applies jit, shardings and donation once.
Shapes: B rows, L tokens, V vocab, D hidden, N datasets.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mos_jax import loss as loss_lib
from mos_jax.mixing import rewards
from mos_jax.models import lora


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken (skipped ones included).
  params: Any  # Pure dict of the trained backbone parameters (with LoRA: the adapters only).
  opt_state: Any  # AdamW state over params.
  mixing: Any  # mos_jax.mixing.MixingState: scorer, its Adam state, EMA rewards.
  bad_steps: jax.Array  # int32 scalar: non-finite updates in a row.
  skipped_steps: jax.Array  # int32 scalar: non-finite updates skipped in total.


def make_optimizer(train_config) -> optax.GradientTransformation:
  """AdamW with linear warm-up then linear decay to 0, and optional global-norm clipping."""
  steps = int(train_config.steps)
  warmup = int(round(train_config.warmup_fraction * steps))
  schedule = optax.join_schedules(
      [optax.linear_schedule(0.0, train_config.lr, max(warmup, 1)),
       optax.linear_schedule(train_config.lr, 0.0, max(steps - warmup, 1))], [warmup])
  parts = []
  if train_config.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(train_config.grad_clip))
  parts.append(optax.adamw(schedule, b1=train_config.b1, b2=train_config.b2,
                           weight_decay=train_config.weight_decay))
  return optax.chain(*parts)


def learning_rate(train_config, step):
  """The schedule's value at `step`, for logging."""
  steps = int(train_config.steps)
  warmup = int(round(train_config.warmup_fraction * steps))
  if step < warmup:
    return train_config.lr * step / max(warmup, 1)
  return train_config.lr * max(0.0, 1.0 - (step - warmup) / max(steps - warmup, 1))


def merge(graphdef, params, frozen=None):
  """The model from its trained parameters and (with LoRA) the frozen base they adapt."""
  return nnx.merge(graphdef, params, frozen) if frozen else nnx.merge(graphdef, params)


def dropout_key(seed: int, step, micro=0):
  """The LoRA dropout key of optimizer step `step` (micro-batch `micro`): from (seed, step) only,
  so a resumed run draws the masks an uninterrupted one draws."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), micro)


def _forward_nll(graphdef, params, batch, frozen=None, dropout=None):
  """Per-token NLL [B, L] fp32 and final hidden states [B, L, D], through the chunked LM head
  (no [B, L, V] logits; the model's loss_chunk sets the chunk). `dropout`: a key turns LoRA
  dropout on (training only); None = deterministic."""
  model = merge(graphdef, params, frozen)
  if dropout is not None:
    model = lora.with_dropout(model, dropout)
  hidden = model.hidden_states(model.embed_tokens(batch['tokens']), positions=batch['positions'],
                               segment_ids=batch['segment_ids'])
  weight, vocab_first = model.head_weight()
  nll = loss_lib.chunked_token_nll(hidden, weight, batch['targets'], vocab_first=vocab_first,
                                   dtype=model.config.dtype, chunk=model.config.loss_chunk)
  return nll, hidden


def _sum_loss(params, graphdef, batch, num_datasets, frozen=None, dropout=None):
  """Sum of masked token NLL (differentiated in `params` only), and per-dataset sums."""
  nll, _ = _forward_nll(graphdef, params, batch, frozen, dropout)  # [B, L]
  row_nll, row_tokens = loss_lib.masked_sums(nll, batch['loss_mask'])  # [B], [B]
  aux = {
      'tokens': row_tokens.sum(),
      'dataset_nll': loss_lib.per_dataset_sums(row_nll, batch['dataset_ids'], num_datasets),
      'dataset_tokens': loss_lib.per_dataset_sums(row_tokens, batch['dataset_ids'], num_datasets),
  }
  return row_nll.sum(), aux


def train_step(state: TrainState, batch, frozen=None, *, graphdef, optimizer, num_datasets: int,
               micro_batches: int = 1, dropout_seed: int | None = None):
  """One optimizer step on a token-weighted mean loss, accumulated over micro-batches.

  `frozen`: the LoRA base (pure dict, not differentiated, not updated); None without LoRA.
  `dropout_seed`: LoRA dropout on, its masks drawn from `dropout_key(seed, step, micro-batch)`;
  None (no dropout) traces no RNG at all.

  Gradients of the NLL *sum* are accumulated and divided by the batch's trained-token count once,
  so the update equals the full-batch one whatever `micro_batches` is.
  """
  grad_fn = jax.value_and_grad(_sum_loss, has_aux=True)

  key = lambda micro: None if dropout_seed is None else dropout_key(dropout_seed, state.step,
                                                                    micro)
  if micro_batches == 1:
    (nll_sum, aux), grads = grad_fn(state.params, graphdef, batch, num_datasets, frozen, key(0))
  else:
    # Micro-batch i takes rows i, i + M, ...: with rows sharded in contiguous blocks over the
    # devices, every micro-batch stays spread evenly over all of them.
    split = jax.tree.map(
        lambda x: x.reshape((x.shape[0] // micro_batches, micro_batches) + x.shape[1:]).swapaxes(
            0, 1), batch)

    f32 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float32), tree)

    def accumulate(carry, xs):
      micro, i = xs
      out = grad_fn(state.params, graphdef, micro, num_datasets, frozen, key(i))
      return jax.tree.map(jnp.add, carry, f32(out)), None  # Sums in fp32, even for bf16 params.

    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), jax.eval_shape(
        lambda: grad_fn(state.params, graphdef, jax.tree.map(lambda x: x[0], split), num_datasets,
                        frozen, key(0))))
    ((nll_sum, aux), grads), _ = jax.lax.scan(accumulate, zeros,
                                              (split, jnp.arange(micro_batches)))

  tokens = jnp.maximum(aux['tokens'], 1.0)
  loss = nll_sum / tokens
  grads = jax.tree.map(lambda g, p: (g / tokens).astype(p.dtype), grads, state.params)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  # A non-finite step leaves parameters and optimizer state untouched.
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  state = state.replace(
      step=state.step + 1,
      params=keep(new_params, state.params),
      opt_state=keep(new_opt_state, state.opt_state),
      bad_steps=jnp.where(finite, 0, state.bad_steps + 1),
      skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32),
  )
  metrics = {
      'loss': loss,
      'grad_norm': grad_norm,
      'tokens': aux['tokens'],
      # Positions that hold a real token (not padding), and all positions: perf/real_token_fraction.
      'real_tokens': (batch['segment_ids'] > 0).sum().astype(jnp.float32),
      'positions': jnp.asarray(batch['segment_ids'].size, jnp.float32),
      'dataset_nll': aux['dataset_nll'],
      'dataset_tokens': aux['dataset_tokens'],
      'finite': finite,
      'bad_steps': state.bad_steps,
  }
  return state, metrics


def example_nll(graphdef, params, batch, frozen=None):
  """Per-example mean NLL over trained tokens, its valid mask (both [B, L]: rows may pack several
  examples, segment k of a row at index k - 1; loss.per_segment_mean) and the final hidden states,
  from one forward."""
  nll, hidden = _forward_nll(graphdef, params, batch, frozen)
  mean_nll, valid = loss_lib.per_segment_mean(nll, batch['segment_ids'], batch['loss_mask'])
  return mean_nll, valid, hidden


def segments_per_dataset(x, num_datasets):
  """Per-segment values of example-major reward rows, [b * N, S, ...] -> [N, b * S, ...]: each
  dataset's examples (packed or not) side by side, invalid slots included."""
  x = x.reshape((-1, num_datasets) + x.shape[1:]).swapaxes(0, 1)  # [N, b, S, ...]
  return x.reshape((num_datasets, -1) + x.shape[3:])


def in_micro_batches(fn, batch, micro_rows: int):
  """fn(batch) -> a tree of [rows, ...] arrays, computed `micro_rows` rows at a time (0 = all).

  Micro-batch i holds rows i, i + M, ... (M micro-batches): with rows sharded in contiguous blocks
  over the devices, every micro-batch stays spread over all of them. Rows come back in order.
  """
  rows = jax.tree.leaves(batch)[0].shape[0]
  if not micro_rows or micro_rows >= rows:
    return fn(batch)
  if rows % micro_rows:
    raise ValueError(f'data.reward_micro_batch={micro_rows} does not divide the {rows} rows of a '
                     f'reward / theta_0 batch.')
  m = rows // micro_rows
  split = jax.tree.map(lambda x: x.reshape((micro_rows, m) + x.shape[1:]).swapaxes(0, 1), batch)
  out = jax.lax.map(fn, split)  # leaves [M, micro_rows, ...]
  return jax.tree.map(lambda y: y.swapaxes(0, 1).reshape((rows,) + y.shape[2:]), out)


def reward_step(params, reference_params, batch, frozen=None, *, graphdef, num_datasets: int,
                with_embeddings: bool = True, micro_rows: int = 0, base_reference: bool = False):
  """The reward forward over one batch from every dataset (rows grouped by dataset).

  batch leaves are [b * N, ...], example-major (row j * N + i is row j of dataset i), so that
  host-local blocks concatenate into the same layout on any number of hosts. A row may pack
  several examples (segment_ids 1..k): every per-example value is per segment. Returns per-dataset
  pooled embeddings [N, D] (Eq. 7: mean over the dataset's examples) and per-example mean NLL and
  valid [N, b * L] (segments_per_dataset); and under theta_0 either from `reference_params` (kept
  on device) or from the batch's cached per-token `nll0` [b * N, L] (reference.lookup).
  Forwards run `micro_rows` rows at a time (0 = all rows at once). With `base_reference` (LoRA),
  theta_0 is the frozen base with the adapters off: the same forward with every adapter at zero
  (x A B = 0 exactly), so no second copy of the model exists.
  """
  if base_reference:
    reference_params = jax.tree.map(jnp.zeros_like, params)

  def per_row(rows):
    nll, valid, hidden = example_nll(graphdef, params, rows, frozen)
    out = {'nll': nll, 'valid': valid}
    if with_embeddings:  # Eq. 7's mean over each example's tokens, summed per row: [r, D] fp32.
      out['embedding_sums'], out['embedding_counts'] = rewards.segment_embedding_sums(
          hidden, rows['segment_ids'])
    if reference_params is not None:
      out['nll0'], _, _ = example_nll(graphdef, reference_params, rows, frozen)
    elif 'nll0' in rows:
      out['nll0'] = loss_lib.per_segment_value(rows['nll0'], rows['segment_ids'],
                                               rows['loss_mask'])
    return out

  rows = in_micro_batches(per_row, batch, micro_rows)
  out = {k: segments_per_dataset(rows[k], num_datasets) for k in ('nll', 'valid', 'nll0')
         if k in rows}
  if with_embeddings:  # Then the mean over each dataset's examples.
    per_dataset = lambda x: x.reshape((-1, num_datasets) + x.shape[1:]).swapaxes(0, 1)
    sums = jnp.sum(per_dataset(rows['embedding_sums']), axis=1)  # [N, D]
    counts = jnp.sum(per_dataset(rows['embedding_counts']), axis=1)  # [N]
    out['embeddings'] = sums / jnp.maximum(counts, 1.0)[:, None]
  return out


def eval_step(params, batch, frozen=None, *, graphdef):
  """Summed masked NLL and trained-token count of a dev batch (token-weighted dev loss)."""
  nll, _ = _forward_nll(graphdef, params, batch, frozen)
  row_nll, row_tokens = loss_lib.masked_sums(nll, batch['loss_mask'])
  return row_nll.sum(), row_tokens.sum()


def reference_nll_step(params, batch, frozen=None, *, graphdef, micro_rows: int = 0):
  """Masked token NLL [B, L] (fp32, 0 where not trained) for the theta_0 cache pass, `micro_rows`
  rows per forward; the host averages it per example (rows may be packed)."""
  def token_nll(rows):
    return _forward_nll(graphdef, params, rows, frozen)[0] * rows['loss_mask']
  return in_micro_batches(token_nll, batch, micro_rows)


