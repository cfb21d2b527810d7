"""Instance selection (paper §5, Table 4): keep the top fraction of each dataset by IFD, or a
random fraction, and write it in the layout of `mos_jax.data.prepare`.

IFD (Instruction-Following Difficulty, Li et al. 2023) of an example with answer A and instruction
Q is PPL(A | Q) / PPL(A) = exp(mean NLL of A's tokens after Q - mean NLL of A's tokens alone),
scored by the configured model. Here A is every trained (assistant) token of the example: the
conditioned pass is the example as training sees it; the unconditioned pass is those tokens alone,
after one start token (BOS, else EOS). Both passes are batched forwards through our decoder on the
config's mesh. Scores are appended to OUT/scores/<name>.cache.jsonl batch by batch, so an
interrupted run resumes where it stopped.

Selection as Cherry LLM does it (read: github.com/tianyi-lab/Cherry_LLM,
cherry_seletion/data_by_IFD.py, stored copy at commit 6c200ba): examples whose IFD is above 1
are skipped before ranking (`if mean_rate > 1: continue`), the rest sorted by IFD and the highest
taken. Here the bound is `ifd_max` (select's --ifd_max, default 1) and an example is dropped at
IFD >= ifd_max (theirs keeps IFD exactly 1); the number kept is keep * n of the whole dataset, as
the selection flag has always meant, where their --sample_rate takes that fraction of the
examples left after the bound; when fewer than keep * n are left all of them are kept and the
count is printed. OUT/<name>/scores.jsonl gives every example's reason for being dropped.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Callable

import jax
import numpy as np
import pyarrow as pa
from flax import nnx
from jax.experimental import multihost_utils

from mos_jax.data import bundle as bundle_lib
from mos_jax.data import formats
from mos_jax.data import pipeline
from mos_jax.infra import distributed
from mos_jax.infra import jsonl
from mos_jax.infra import sharding
from mos_jax.models.build import build_model
from mos_jax.steps import reference_cache
from mos_jax.steps import reward as reward_lib

METHODS = ('ifd', 'random')


def answer_only(example: dict, start_id: int) -> tuple[np.ndarray, np.ndarray]:
  """(ids, trained) of the example's trained tokens alone, after `start_id` (the IFD denominator)."""
  answer = example['ids'][example['trained'].astype(bool)]
  ids = np.concatenate([[start_id], answer]).astype(np.int32)
  trained = np.concatenate([[0], np.ones(len(answer))]).astype(example['trained'].dtype)
  return ids, trained


def answer_only_source(data, name: str, start_id: int) -> pipeline.ExampleSource:
  """An ExampleSource aligned with `name`'s train split holding each example's answer alone."""
  parts = [answer_only(data.example(name, i), start_id)
           for i in range(data.sizes[data.names.index(name)])]
  offsets = np.zeros(len(parts) + 1, np.int32)
  np.cumsum([len(ids) for ids, _ in parts], out=offsets[1:])
  ids = np.concatenate([p[0] for p in parts])
  flags = np.concatenate([p[1] for p in parts])
  return pipeline.ExampleSource(pa.table({
      'input_ids': pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids)),
      'trained': pa.ListArray.from_arrays(pa.array(offsets), pa.array(flags))}))


KEPT, ABOVE_BOUND, NOT_TOP = None, 'ifd_at_or_above_max', 'not_in_top_fraction'


def ifd_selection(ifd: np.ndarray, keep: float, ifd_max: float = 1.0
                  ) -> tuple[np.ndarray, list[str | None], int]:
  """Cherry LLM's rule: drop every example with IFD >= ifd_max (at 1 and above the instruction
  does not make the answer easier), then keep the int(keep * n) (at least 1) highest IFDs of
  the rest, or all of the rest when fewer remain.

  Returns (sorted kept indices, each example's reason for being dropped: None when kept,
  ABOVE_BOUND or NOT_TOP, and the number asked for, int(keep * n)). A non-finite IFD counts as
  above the bound. Ties go to the lower index.
  """
  ifd = np.asarray(ifd, np.float64)
  n = len(ifd)
  wanted = max(1, int(keep * n))
  eligible = np.isfinite(ifd) & (ifd < ifd_max)
  order = np.lexsort((np.arange(n), -np.where(eligible, ifd, -np.inf)))  # Highest first.
  kept = np.sort(order[:min(wanted, int(eligible.sum()))])
  reasons: list[str | None] = [NOT_TOP if ok else ABOVE_BOUND for ok in eligible]
  for i in kept:
    reasons[i] = KEPT
  return kept, reasons, wanted


# ---- the score cache -------------------------------------------------------------------------

class ScoreCache:
  """Per-dataset JSON lines: a header naming what was scored, then one line per scored batch."""

  def __init__(self, path: str, header: dict, write: bool):
    self.path, self.header, self.write = path, header, write
    self.batches: list[dict] = []
    if os.path.exists(path):
      with open(path, encoding='utf-8') as f:
        lines = f.read().split('\n')
      try:
        same = json.loads(lines[0]) == header
      except ValueError:
        same = False
      if same:
        for line in lines[1:]:
          try:
            entry = json.loads(line)
          except ValueError:
            break  # A line cut by an interruption: everything after it is recomputed.
          if entry.get('batch') != len(self.batches):
            break
          self.batches.append(entry)
    if write:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path + '.tmp', 'w', encoding='utf-8') as f:  # Keep only the valid prefix.
        f.write(json.dumps(header) + '\n')
        for entry in self.batches:
          f.write(json.dumps(entry) + '\n')
      os.replace(path + '.tmp', path)

  def append(self, ids, cond, answer) -> None:
    entry = {'batch': len(self.batches), 'ids': [int(i) for i in ids],
             'cond': [float(x) for x in cond], 'answer': [float(x) for x in answer]}
    self.batches.append(entry)
    if self.write:
      with open(self.path, 'a', encoding='utf-8') as f:
        f.write(json.dumps(entry) + '\n')
        f.flush()

  def table(self, n: int) -> tuple[np.ndarray, np.ndarray]:
    cond, answer = np.full(n, np.nan), np.full(n, np.nan)
    for entry in self.batches:
      cond[entry['ids']] = entry['cond']
      answer[entry['ids']] = entry['answer']
    return cond, answer


def _start_id(tokenizer) -> int:
  for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id):
    if token_id is not None:
      return int(token_id)
  raise ValueError('the tokenizer has no BOS, EOS or pad token to start the answer-only pass')


def ifd_scores(config, data, out: str, batch_size: int, progress: bool = True
               ) -> dict[str, dict[str, np.ndarray]]:
  """Per dataset {'cond', 'answer', 'ifd'} over its train examples, scored on the config's mesh."""
  mesh = sharding.make_mesh(config.mesh)
  model = build_model(config, mesh, len(data.tokenizer))
  graphdef, param_state = nnx.split(model, nnx.Param)
  param_shardings = nnx.to_pure_dict(sharding.state_shardings(param_state, mesh))
  params = nnx.to_pure_dict(param_state)
  nll_step = jax.jit(functools.partial(reward_lib.reference_nll_step, graphdef=graphdef),
                     in_shardings=(param_shardings, None), out_shardings=sharding.replicated(mesh))
  to_global = functools.partial(distributed.host_local_to_global, mesh=mesh)
  is_main = jax.process_index() == 0
  start_id = _start_id(data.tokenizer)
  key = reference_cache.model_key(config)
  caches = {}
  for name in data.names:
    header = {'dataset': name, 'fingerprint': data.fingerprint(name), 'model': key,
              'batch_size': batch_size, 'process_count': jax.process_count(), 'start_id': start_id}
    caches[name] = ScoreCache(os.path.join(out, 'scores', f'{name}.cache.jsonl'), header, is_main)
  hosts = jax.process_count()
  rows = batch_size // hosts  # full_pass_batches checks that this divides.
  total = sum(-(-(-(-n // hosts)) // rows) for n in data.sizes)  # Batches of all passes.
  bar = None
  if progress and is_main:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=total, desc='IFD', dynamic_ncols=True,
               initial=sum(len(c.batches) for c in caches.values()))
  results = {}
  with jax.set_mesh(mesh):
    for name in data.names:
      cache = caches[name]
      # Process 0's cache decides for every host (hosts that skip must skip the same batches).
      done = int(multihost_utils.broadcast_one_to_all(np.int32(len(cache.batches))))
      if done != len(cache.batches):
        raise FileNotFoundError(f'{cache.path}: process 0 resumes from {done} scored batches, '
                                f'process {jax.process_index()} from {len(cache.batches)}; use an '
                                '--out folder every host sees.')
      answers = answer_only_source(data, name, start_id)
      pairs = zip(data.full_pass_batches(name, batch_size),
                  data.full_pass_batches(name, batch_size, examples=answers))
      for k, (cond_batch, answer_batch) in enumerate(pairs):
        if k < done:
          continue
        cond_global, answer_global = to_global(cond_batch), to_global(answer_batch)
        cond, answer = nll_step(params, cond_global), nll_step(params, answer_global)  # [B, L]
        got = multihost_utils.process_allgather(
            (cond, cond_global['loss_mask'], answer, answer_global['loss_mask'],
             cond_global['example_ids']), tiled=True)
        cond, cond_mask, answer, answer_mask, ids = (np.asarray(x) for x in got)
        cond, answer = _row_mean(cond, cond_mask), _row_mean(answer, answer_mask)
        real = ids >= 0  # Padding rows of the last batch carry id -1.
        cache.append(ids[real], cond[real], answer[real])
        if bar is not None:
          bar.update(1)
      n = data.sizes[data.names.index(name)]
      cond, answer = cache.table(n)
      if np.isnan(cond).any():
        raise RuntimeError(f'IFD pass over dataset {name!r} missed {int(np.isnan(cond).sum())} '
                           f'examples; delete {cache.path} and run again.')
      results[name] = {'cond': cond, 'answer': answer, 'ifd': np.exp(cond - answer)}
  if bar is not None:
    bar.close()
  return results


def _row_mean(token_nll, loss_mask):
  """[B, L] masked token NLL -> [B] mean over each row's trained tokens (0 without any)."""
  return (token_nll * loss_mask).sum(-1) / np.maximum(loss_mask.sum(-1), 1.0)


# ---- writing the selection ---------------------------------------------------------------------

def _messages(record: dict, fmt: str) -> dict:
  out = {'messages': formats.to_conversation(record, fmt)}
  if 'task' in record:
    out['task'] = record['task']
  return out


def select(config, method: str, keep: float, out: str, seed: int = 0, batch_size: int = 0,
           progress: bool = True, log: Callable[[str], None] = print,
           ifd_max: float = 1.0) -> dict:
  """Writes OUT/<name>/{train,dev,scores}.jsonl and OUT/manifest.json; returns the manifest.

  `ifd_max`: --method ifd drops examples with IFD >= ifd_max before the top fraction is taken.
  """
  if method not in METHODS:
    raise ValueError(f'--method must be one of {METHODS}, got {method!r}')
  if not 0 < keep <= 1:
    raise ValueError(f'--keep must be in (0, 1], got {keep}')
  if not ifd_max > 0:
    raise ValueError(f'--ifd_max must be > 0 (IFD is a ratio of perplexities), got {ifd_max}')
  batch_size = batch_size or config.data.eval_batch_size
  config = config.copy_and_resolve_references()
  with config.unlocked():
    # One example per row: the conditioned and the answer-only pass must hold the same examples
    # in the same rows (packing would fill rows differently for the shorter answers).
    config.data.packing = False
  data = bundle_lib.build_data(config, jax.process_index(), jax.process_count(), keep_records=True)
  try:
    scores = ifd_scores(config, data, out, batch_size, progress) if method == 'ifd' else {}
    manifest = {'method': method, 'keep': keep, 'seed': seed if method == 'random' else None,
                'format': 'messages', 'datasets': {}}
    if method == 'ifd':
      manifest['model'] = config.model.hf_checkpoint or f'preset:{config.model.preset}'
      manifest['model_key'] = reference_cache.model_key(config)
      manifest['ifd_max'] = ifd_max
    for name in data.names:
      n = data.sizes[data.names.index(name)]
      if method == 'ifd':
        kept, reasons, wanted = ifd_selection(scores[name]['ifd'], keep, ifd_max)
        if not len(kept):
          raise ValueError(f'dataset {name!r}: none of its {n} examples has IFD < {ifd_max} '
                           f'(lowest {np.nanmin(scores[name]["ifd"]):.4g}); nothing to keep. '
                           'Raise --ifd_max, or leave this dataset out.')
        if len(kept) < wanted:
          log(f'{name}: only {len(kept)} of {n} examples have IFD < {ifd_max}, fewer than the '
              f'{wanted} that --keep {keep} asks for; keeping those {len(kept)}')
      else:
        kept = bundle_lib.random_sample(name, n, max(1, int(keep * n)), seed)
      if jax.process_index() != 0:
        continue
      fmt = data.stats[name]['format']
      records = data.train_records(name)
      folder = os.path.join(out, name)
      os.makedirs(folder, exist_ok=True)
      files = {
          'train': jsonl.write(os.path.join(folder, 'train.jsonl'),
                          (_messages(records[i], fmt) for i in kept)),
          'dev': jsonl.write(os.path.join(folder, 'dev.jsonl'),
                        (_messages(r, fmt) for r in data.dev_records(name)))}
      if method == 'ifd':
        s = scores[name]
        # `dropped`: null when kept, else why (above the IFD bound, or outside the top fraction).
        files['scores'] = jsonl.write(os.path.join(folder, 'scores.jsonl'), (
            {'example': i, 'nll_answer_given_instruction': float(s['cond'][i]),
             'nll_answer': float(s['answer'][i]), 'ifd': float(s['ifd'][i]),
             'kept': reasons[i] is KEPT, 'dropped': reasons[i]} for i in range(n)))
      manifest['datasets'][name] = {
          'stats': data.stats[name], 'examples': n, 'train': len(kept),
          'dev': len(data.dev_records(name)),
          'files': {f'{name}/{k}.jsonl': {'sha256': v} for k, v in files.items()}}
      if method == 'ifd':
        manifest['datasets'][name]['dropped_ifd_at_or_above_max'] = reasons.count(ABOVE_BOUND)
      log(f'{name}: kept {len(kept)} of {n} by {method}')
    if jax.process_index() == 0:
      with open(os.path.join(out, 'manifest.json'), 'w', encoding='utf-8') as f:
        f.write(json.dumps(manifest, indent=2, sort_keys=True) + '\n')
  finally:
    data.close()
  return manifest
