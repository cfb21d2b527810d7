"""Pure SFT steps: the train step (token-weighted masked NLL, micro-batches, non-finite guard) and
the dev-loss step, over the chunked LM head.

Nothing here jits or places data; `mos_jax.training.run` applies jit, shardings and donation once.
Shapes: B rows, L tokens, V vocab, D hidden, N datasets.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mos_jax.models import lora
from mos_jax.models import loss as loss_lib
from mos_jax.steps.state import TrainState, merge


def dropout_key(seed: int, step, micro=0):
  """The LoRA dropout key of optimizer step `step` (micro-batch `micro`): from (seed, step) only,
  so a resumed run draws the masks an uninterrupted one draws."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), micro)


def forward_nll(graphdef, params, batch, frozen=None, dropout=None):
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
                                   dtype=model.config.dtype, chunk=model.config.loss_chunk,
                                   cap=model.config.final_logit_softcap)
  return nll, hidden


def sum_loss(params, graphdef, batch, num_datasets, frozen=None, dropout=None):
  """Sum of masked token NLL (differentiated in `params` only), and per-dataset sums."""
  nll, _ = forward_nll(graphdef, params, batch, frozen, dropout)  # [B, L]
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
  grad_fn = jax.value_and_grad(sum_loss, has_aux=True)

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
  nll, hidden = forward_nll(graphdef, params, batch, frozen)
  mean_nll, valid = loss_lib.per_segment_mean(nll, batch['segment_ids'], batch['loss_mask'])
  return mean_nll, valid, hidden


def eval_step(params, batch, frozen=None, *, graphdef):
  """Summed masked NLL and trained-token count of a dev batch (token-weighted dev loss)."""
  nll, _ = forward_nll(graphdef, params, batch, frozen)
  row_nll, row_tokens = loss_lib.masked_sums(nll, batch['loss_mask'])
  return row_nll.sum(), row_tokens.sum()
