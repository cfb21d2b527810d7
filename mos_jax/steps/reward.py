"""The reward forwards: exactly the signals a strategy declares (mixing.base.SIGNALS), in one jit.

Pure and unjitted like the other steps; `mos_jax.training.run` jits `signal_step` once with
shardings. `batches['train']` holds one train reward batch of every dataset and `batches['dev']`
one dev batch of every dataset, each [b * N] rows, example-major (row j * N + i is row j of
dataset i; `stack_reward_batches` builds that layout on the host). Rows may pack several examples
(segment_ids 1..k): per-example signals are per segment, [N, b * L] with a valid mask
(`segments_per_dataset`). Shapes: N datasets, b rows per dataset, L tokens, V vocab, D hidden.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from mos_jax.mixing import base
from mos_jax.mixing import rewards
from mos_jax.models import loss as loss_lib
from mos_jax.steps.sft import example_nll, forward_nll, sum_loss
from mos_jax.steps.state import merge


def stack_reward_batches(batches: dict, names) -> dict:
  """One host batch from every dataset as [b * N] rows, example-major, so that host-local blocks
  concatenate into a global [b, N] layout on any number of hosts."""
  first = batches[names[0]]
  return {k: np.stack([batches[n][k] for n in names], axis=1).reshape(
      (-1,) + first[k].shape[1:]) for k in first}


def batches_needed(signals) -> tuple[str, ...]:
  """Which reward batches ('train', 'dev') the signals read."""
  signals = frozenset(signals)
  return tuple(k for k, group in (('train', base.TRAIN_BATCH_SIGNALS),
                                  ('dev', base.DEV_BATCH_SIGNALS)) if signals & group)


def _per_dataset(x, num_datasets):
  """[b * N, ...] example-major -> [N, b, ...]."""
  return x.reshape((-1, num_datasets) + x.shape[1:]).swapaxes(0, 1)


def param_paths(params) -> list[str]:
  """'layers/3/mlp/up_proj'-style names of the parameter leaves, in tree order."""
  return ['/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)
          for path, _ in jax.tree_util.tree_leaves_with_path(params)]


def gradient_mask(params, pattern: str) -> tuple[bool, ...]:
  """Which leaves MultiDDS differentiates: those whose path matches `pattern` ('' = all)."""
  paths = param_paths(params)
  if not pattern:
    return tuple(True for _ in paths)
  try:
    regex = re.compile(pattern)
  except re.error as e:
    raise ValueError(f'mixing.grad_params={pattern!r} is not a regular expression: {e}') from None
  mask = tuple(bool(regex.search(p)) for p in paths)
  if not any(mask):
    raise ValueError(f'mixing.grad_params={pattern!r} matches no parameter; parameter names look '
                     f'like {paths[:3]} ... {paths[-2:]}.')
  return mask


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
  on device) or from the batch's cached per-token `nll0` [b * N, L] (reference_cache.lookup).
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


def reference_excess(params, reference_params, batch, frozen=None, *, graphdef,
                     num_datasets: int, micro_rows: int = 0):
  """DoReMi's lambda (Xie et al. 2023, Algorithm 1 line 3) from one train reward batch of every
  dataset ([b * N] rows, example-major): per trained token the excess loss
  max(l_theta - l_ref, 0), clipped per token, then summed over dataset i's trained tokens and
  divided by their number: 'ref_excess' [N] (0 without tokens) and 'ref_tokens' [N]. The
  reference model is `reference_params` (another run's final parameters) on the same graph and,
  with LoRA, the same frozen base. Packing does not matter: sums over tokens ignore segments."""
  def per_row(rows):
    nll, _ = forward_nll(graphdef, params, rows, frozen)  # [r, L] fp32
    ref, _ = forward_nll(graphdef, reference_params, rows, frozen)
    mask = rows['loss_mask'].astype(jnp.float32)
    return loss_lib.masked_sums(jnp.maximum(nll - ref, 0.0), mask)  # [r], [r]

  sums, tokens = in_micro_batches(per_row, batch, micro_rows)
  sums = _per_dataset(sums, num_datasets).sum(-1)  # [N]
  tokens = _per_dataset(tokens, num_datasets).sum(-1)
  return {'ref_excess': sums / jnp.maximum(tokens, 1.0), 'ref_tokens': tokens}


def reference_nll_step(params, batch, frozen=None, *, graphdef, micro_rows: int = 0):
  """Masked token NLL [B, L] (fp32, 0 where not trained) for the theta_0 cache pass, `micro_rows`
  rows per forward; the host averages it per example (rows may be packed)."""
  def token_nll(rows):
    return forward_nll(graphdef, params, rows, frozen)[0] * rows['loss_mask']
  return in_micro_batches(token_nll, batch, micro_rows)


def token_uncertainty(graphdef, params, batch, frozen=None):
  """Per-row sums over trained tokens of the predictive entropy and of the NLL, and the trained
  token counts, each [B] fp32, from one forward (with the whole [B, L, V] logits: entropy needs
  every token's full distribution). Packing does not matter: sums over tokens ignore segments."""
  model = merge(graphdef, params, frozen)
  out = model(batch['tokens'], positions=batch['positions'], segment_ids=batch['segment_ids'])
  logits = out.logits.astype(jnp.float32)  # [B, L, V]
  entropy = rewards.token_entropy(logits)  # [B, L]
  nll = loss_lib.token_nll(logits, batch['targets'])  # [B, L]
  mask = batch['loss_mask'].astype(jnp.float32)
  entropy_sum, tokens = loss_lib.masked_sums(entropy, mask)
  nll_sum, _ = loss_lib.masked_sums(nll, mask)
  return entropy_sum, nll_sum, tokens


def dev_uncertainty(graphdef, params, dev_batch, frozen=None, *, num_datasets: int):
  """MultiUAT's signals from one dev batch of every dataset ([b * N] rows, example-major): the
  token-weighted mean entropy and NLL over all trained tokens of dataset i's dev batch (the sum
  over its tokens / their number, not a mean of per-example means) and the token count, each
  [N]; 0 for a dataset without a trained dev token."""
  entropy, nll, tokens = (_per_dataset(x, num_datasets)  # [N, b] each
                          for x in token_uncertainty(graphdef, params, dev_batch, frozen))
  return {'dev_entropy': rewards.token_weighted_mean(entropy, tokens),
          'dev_nll': rewards.token_weighted_mean(nll, tokens), 'dev_tokens': tokens.sum(-1)}


_LOSS_KEYS = ('tokens', 'targets', 'loss_mask', 'positions', 'segment_ids', 'dataset_ids')


def _pad_length(batch, length):
  """Pads [..., L] token arrays to `length` with padding positions (segment 0, no loss)."""
  return {k: (jnp.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, length - v.shape[-1])])
              if k != 'dataset_ids' else v) for k, v in batch.items()}


def _pad_rows(batch, rows):
  """Pads [N, b, ...] chunks to `rows` rows with copies of the last row that train nothing."""
  b = batch['tokens'].shape[1]
  out = {k: jnp.pad(v, [(0, 0), (0, rows - b)] + [(0, 0)] * (v.ndim - 2), mode='edge')
         for k, v in batch.items()}
  out['loss_mask'] = out['loss_mask'] * (jnp.arange(rows) < b)[None, :, None]
  return out


def gradient_cosines(params, train_batch, dev_batch, frozen=None, *, graphdef, num_datasets: int,
                     mask: tuple[bool, ...]):
  """MultiDDS's reward [N]: the mean over dev sets j of cos(grad L(train batch of i),
  grad L(dev batch of j)), each dev set counting equally (see mixing/multidds.py).

  The mean of cosines is linear in the dev gradients' directions,
    (1/N) sum_j cos(g_i, d_j) = <g_i, sum_j d_j / |d_j|> / (N |g_i|),
  so one buffer holds sum_j d_j / |d_j| and no N x N gradient pairs are formed: one sequential
  loop of 2N backward passes over b-row chunks, the first N adding each dev set's unit gradient,
  the next N reducing dataset i's train gradient to a dot product with that sum and a norm. At
  most two gradient-sized buffers live and every pass reuses the same activation memory. Losses
  are token sums (a cosine ignores their scale); `mask` restricts both gradients to a subset of
  parameter leaves. A dev set without trained tokens (zero gradient) adds 0 and still counts in
  the 1/N, as in the reference.
  """
  leaves, treedef = jax.tree.flatten(params)
  chosen = [x for x, m in zip(leaves, mask) if m]

  def loss(sub, batch):
    it = iter(sub)
    full = jax.tree.unflatten(treedef, [next(it) if m else x for x, m in zip(leaves, mask)])
    total, _ = sum_loss(full, graphdef, batch, num_datasets, frozen)
    return total

  # Elementwise product and sum in one fused reduction: no float32 copy of a gradient.
  f32_dot = lambda a, b: sum(jnp.sum(x.astype(jnp.float32) * y.astype(jnp.float32))
                             for x, y in zip(a, b))
  dev = {k: _per_dataset(dev_batch[k], num_datasets) for k in _LOSS_KEYS}  # [N, b, L_dev]
  train = {k: _per_dataset(train_batch[k], num_datasets) for k in _LOSS_KEYS}  # [N, b, L]
  length = max(dev['tokens'].shape[-1], train['tokens'].shape[-1])
  rows = max(dev['tokens'].shape[1], train['tokens'].shape[1])
  dev, train = (_pad_rows(_pad_length(b, length), rows) for b in (dev, train))
  chunks = {k: jnp.concatenate([dev[k], train[k]]) for k in _LOSS_KEYS}  # [2N, b, L]

  def body(dev_dirs, xs):
    k, batch = xs
    g = jax.grad(loss)(chosen, batch)
    square = f32_dot(g, g)
    # Dev passes add g / |g| (0 for a zero gradient); train passes add nothing.
    scale = jnp.where(k < num_datasets, 1.0 / jnp.maximum(jnp.sqrt(square), 1e-20), 0.0)
    dev_dirs = [d + x * scale.astype(x.dtype) for d, x in zip(dev_dirs, g)]
    return dev_dirs, (f32_dot(g, dev_dirs), square)

  zeros = [jnp.zeros_like(x) for x in chosen]
  _, (dots, squares) = jax.lax.scan(body, zeros, (jnp.arange(2 * num_datasets), chunks))
  dots, norms = dots[num_datasets:], jnp.sqrt(squares[num_datasets:])  # [N]
  return dots / (num_datasets * jnp.maximum(norms, 1e-20))


def signal_step(params, reference_params, batches, frozen=None, *, graphdef, num_datasets: int,
                signals, grad_mask: tuple[bool, ...] | None = None, micro_rows: int = 0,
                base_reference: bool = False):
  """The declared `signals` (and the valid masks that go with them) as a dict of arrays.

  `reference_params`: theta_0 on device (nll0 with diff_reference='device') or the reference
  run's final parameters (ref_excess), else None. `frozen`: a LoRA run's frozen base;
  `micro_rows` and `base_reference` go to reward_step.
  """
  signals = frozenset(signals)
  unknown = signals - set(base.SIGNALS)
  if unknown:
    raise ValueError(f'unknown signals {sorted(unknown)}; known: {sorted(base.SIGNALS)}.')
  out = {}
  if signals & {'embeddings', 'nll', 'nll0'}:
    out.update(reward_step(params, reference_params, batches['train'], frozen,
                                 graphdef=graphdef, num_datasets=num_datasets,
                                 with_embeddings='embeddings' in signals, micro_rows=micro_rows,
                                 base_reference=base_reference))
  if 'ref_excess' in signals:
    if reference_params is None:
      raise ValueError('the ref_excess signal needs the reference run\'s parameters.')
    out.update(reference_excess(params, reference_params, batches['train'], frozen,
                                graphdef=graphdef, num_datasets=num_datasets,
                                micro_rows=micro_rows))
  if signals & {'dev_entropy', 'dev_nll'}:
    dev = dev_uncertainty(graphdef, params, batches['dev'], frozen, num_datasets=num_datasets)
    out.update({k: v for k, v in dev.items() if k in signals or k == 'dev_tokens'})
  if 'grad_cos' in signals:
    mask = grad_mask if grad_mask is not None else tuple(True for _ in jax.tree.leaves(params))
    out['grad_cos'] = gradient_cosines(params, batches['train'], batches['dev'], frozen,
                                       graphdef=graphdef, num_datasets=num_datasets, mask=mask)
  return out
