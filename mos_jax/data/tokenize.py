"""Conversations -> token ids plus a per-token "trained" flag, truncated or dropped by policy.

The result of one split is an Arrow table with list columns `input_ids` (int32) and `trained`
(uint8: 1 where the token is an assistant-content token or the EOS closing an assistant turn).
An example of n tokens becomes a row of n - 1 inputs (tokens[:-1]) and targets (tokens[1:]), so it
fits when n - 1 <= max_len.
"""

import dataclasses

import numpy as np
import pyarrow as pa

_CHUNK = 1024  # Texts per call to the fast tokenizer.


@dataclasses.dataclass
class Counts:
  examples: int = 0  # Conversations tokenized.
  kept: int = 0
  truncated: int = 0  # Longer than max_len, cut, and kept (something trainable was left).
  dropped_too_long: int = 0  # Longer than max_len under truncation='drop'.
  dropped_no_target: int = 0  # No trainable token (left): no assistant turn, or cut off.
  prompt_tokens: int = 0  # Untrained target tokens of kept examples.
  response_tokens: int = 0  # Trained target tokens of kept examples.

  def add(self, other: 'Counts') -> None:
    for f in dataclasses.fields(self):
      setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def _trained_flags(offsets: np.ndarray, spans) -> np.ndarray:
  """1 for tokens whose characters overlap a trained span (a token merged across a boundary
  with response text counts as response)."""
  flags = np.zeros(len(offsets), np.uint8)
  if len(offsets):
    starts, ends = offsets[:, 0], offsets[:, 1]
    for a, b in spans:
      flags |= ((starts < b) & (ends > a)).astype(np.uint8)
  return flags


def tokenize(rendered: list[tuple[str, list]], tokenizer, max_len: int, truncation: str,
             train_on_prompt: bool) -> tuple[pa.Table, np.ndarray, Counts]:
  """Tokenizes rendered conversations. Returns (table, kept indices into `rendered`, counts)."""
  if truncation not in ('truncate', 'drop'):
    raise ValueError(f"data.truncation must be 'truncate' or 'drop', got {truncation!r}")
  counts = Counts(examples=len(rendered))
  ids_parts, flag_parts, lengths, kept = [], [], [], []
  for lo in range(0, len(rendered), _CHUNK):
    chunk = rendered[lo:lo + _CHUNK]
    enc = tokenizer([text for text, _ in chunk], add_special_tokens=False,
                    return_offsets_mapping=True, return_attention_mask=False)
    for k, ((_, spans), ids, offsets) in enumerate(
        zip(chunk, enc['input_ids'], enc['offset_mapping'])):
      ids = np.asarray(ids, np.int32)
      if train_on_prompt:
        flags = np.ones(len(ids), np.uint8)
      else:
        flags = _trained_flags(np.asarray(offsets, np.int64).reshape(-1, 2), spans)
      too_long = len(ids) - 1 > max_len
      if too_long:
        if truncation == 'drop':
          counts.dropped_too_long += 1
          continue
        ids, flags = ids[:max_len + 1], flags[:max_len + 1]
      response = int(flags[1:].sum())
      if response == 0:
        counts.dropped_no_target += 1
        continue
      counts.truncated += too_long
      counts.kept += 1
      counts.response_tokens += response
      counts.prompt_tokens += len(ids) - 1 - response
      ids_parts.append(ids)
      flag_parts.append(flags)
      lengths.append(len(ids))
      kept.append(lo + k)
  offsets = np.zeros(len(lengths) + 1, np.int32)
  np.cumsum(lengths, out=offsets[1:])
  ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int32)
  flags = np.concatenate(flag_parts) if flag_parts else np.zeros(0, np.uint8)
  table = pa.table({
      'input_ids': pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids)),
      'trained': pa.ListArray.from_arrays(pa.array(offsets), pa.array(flags)),
  })
  return table, np.asarray(kept, np.int64), counts
