"""The theta_0 NLL cache for the DIFF reward (Eq. 10).

DIFF compares each example's perplexity under the current model with its perplexity under the
initial model theta_0. Instead of keeping theta_0 on device, one forward pass over every training
example before training stores its mean token NLL under theta_0 beside the run, keyed by the
dataset's fingerprint and the model, so a resumed or repeated run reuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils


def model_key(config) -> str:
  """Identifies theta_0: the checkpoint folder (with its weight files' sizes and times) or the
  preset, its dtype and the init seed."""
  m = config.model
  if m.hf_checkpoint:
    files = sorted(f for f in os.listdir(m.hf_checkpoint) if f.endswith('.safetensors'))
    stats = [(f, os.path.getsize(os.path.join(m.hf_checkpoint, f)),
              int(os.path.getmtime(os.path.join(m.hf_checkpoint, f)))) for f in files]
    ident = {'hf_checkpoint': os.path.abspath(m.hf_checkpoint), 'files': stats}
  else:
    ident = {'preset': m.preset, 'seed': config.seed}
  ident['param_dtype'] = m.param_dtype
  ident['dtype'] = m.dtype
  if m.get('quantize', 'none') != 'none':  # QLoRA: theta_0 is the quantized base.
    ident['quantize'] = m.quantize
  return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def cache_path(cache_dir: str, name: str, fingerprint: str, key: str) -> str:
  return os.path.join(cache_dir, f'{name}-{fingerprint[:16]}-{key}.npy')


def load_or_compute(cache_dir: str, data, key: str, nll_fn: Callable, to_global: Callable,
                    batch_size: int, write: bool) -> Mapping[str, np.ndarray]:
  """Per dataset, the theta_0 mean NLL of every training example (indexed by example id).

  `nll_fn(global_batch) -> [B, L]` runs the jitted forward (masked token NLL); `to_global` turns
  host-local rows into global arrays. Only process 0 writes the files; every process holds the
  whole table.
  """
  tables = {}
  for name in data.names:
    path = cache_path(cache_dir, name, data.fingerprint(name), key)
    # Process 0 decides for everyone: hosts that skipped the pass while others ran it would hang
    # in the all-gather. A host that cannot see process 0's file stops with a message.
    cached = bool(multihost_utils.broadcast_one_to_all(np.int32(os.path.exists(path))))
    if cached and os.path.exists(path):
      tables[name] = np.load(path)
      continue
    if cached:
      raise FileNotFoundError(f'{path}: process 0 has the theta_0 NLL cache but process '
                              f'{jax.process_index()} cannot read it; use a workdir every host '
                              f'sees, or delete the cache to recompute it.')
    size = data.sizes[data.names.index(name)]
    sums, counts, seen = np.zeros(size), np.zeros(size), np.zeros(size, bool)
    for batch in data.full_pass_batches(name, batch_size):  # Rows may pack several examples.
      global_batch = to_global(batch)
      token_nll = nll_fn(global_batch)  # [B, L], 0 where not trained
      got = multihost_utils.process_allgather(
          (token_nll, global_batch['token_example_ids'], global_batch['loss_mask']), tiled=True)
      token_nll, ids, mask = (np.asarray(x).reshape(-1) for x in got)
      keep = ids >= 0  # Padding and the last batch's filler rows carry id -1.
      sums += np.bincount(ids[keep], weights=token_nll[keep], minlength=size)
      counts += np.bincount(ids[keep], weights=mask[keep], minlength=size)
      seen[ids[keep]] = True
    # Mean over each example's trained tokens (0 without any, as loss.per_segment_mean gives).
    table = np.where(seen, sums / np.maximum(counts, 1.0), np.nan).astype(np.float32)
    if np.isnan(table).any():
      missing = int(np.isnan(table).sum())
      raise RuntimeError(f'theta_0 NLL pass over dataset {name!r} missed {missing} examples.')
    if write:
      os.makedirs(cache_dir, exist_ok=True)
      tmp = path + '.tmp.npy'
      np.save(tmp, table)
      os.replace(tmp, path)
    tables[name] = table
  return tables


def lookup(tables: Mapping[str, np.ndarray], names, batch) -> np.ndarray:
  """theta_0 NLL of each token's example in a host-local reward batch: [rows, L] float32, 0 on
  padding and filler (example id -1). Rows may pack several examples, so the ids are read per
  token (`token_example_ids` [rows, L]) with the row's `dataset_ids`; the reward step takes each
  segment's value (loss.per_segment_value). A batch without token ids (unpacked rows) uses each
  row's `example_ids` on its real tokens."""
  ids = batch.get('token_example_ids')
  if ids is None:
    packed = (np.asarray(batch['example_ids']) < 0) & (np.asarray(batch['loss_mask']).sum(1) > 0)
    if packed.any():  # Packed rows carry example id -1 (filler rows too, but train nothing).
      raise ValueError('a packed reward batch needs token_example_ids [rows, L] to look up its '
                       'examples\' theta_0 NLL.')
    ids = np.where(batch['segment_ids'] > 0, np.asarray(batch['example_ids'])[:, None], -1)
  ids = np.asarray(ids)
  out = np.zeros(ids.shape, np.float32)
  for row, ds in enumerate(np.asarray(batch['dataset_ids'])):
    known = ids[row] >= 0
    out[row, known] = tables[names[ds]][ids[row, known]]
  return out
