"""The `skills` task: per-dataset dev loss and exact-match accuracy of greedy answers.

For every training dataset of the config: the token-weighted NLL of its dev split (the same number
the trainer logs as eval/<name>/loss) and, when its records carry a checkable answer
(`data.answer_field`, `answer` in the demo skills), the fraction of dev examples whose greedy
answer to the conversation minus its last assistant turn equals that answer (whitespace-stripped).
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from mos_jax.infra import distributed
from mos_jax.inference import sampler
from mos_jax.steps import sft
from mos_jax.data import formats

MAX_ANSWER_TOKENS = 256  # Greedy answers are cut here (plus the reference answer's length).


def prompt_and_answer(record: dict, fmt: str, field: str):
  """(conversation up to the last assistant turn, expected answer) or None without an answer."""
  answer = record.get(field) if field else None
  if not isinstance(answer, str):
    return None
  conversation = formats.to_conversation(record, fmt)
  while conversation and conversation[-1]['role'] == 'assistant':
    conversation = conversation[:-1]
  return (conversation, answer) if conversation else None


def dev_loss(graphdef, params, data, name: str, mesh, max_batches: int = 0) -> float | None:
  step = _eval_step(graphdef)
  sums = []
  with jax.set_mesh(mesh):
    for i, batch in enumerate(data.dev_batches(name)):
      if max_batches and i >= max_batches:
        break
      sums.append(step(params, distributed.host_local_to_global(batch, mesh)))
  nll, tokens = np.sum(jax.device_get(sums), axis=0) if sums else (0.0, 0.0)
  return float(nll / tokens) if tokens > 0 else None


@functools.lru_cache(maxsize=4)
def _eval_step(graphdef):
  return jax.jit(functools.partial(sft.eval_step, graphdef=graphdef))


def exact_match(gen: sampler.Generator, data, name: str, field: str, limit: int = 0,
                batch_size: int = 16) -> tuple[float, int] | None:
  """(accuracy, examples) of greedy answers on the dev split, or None without answers."""
  fmt = data.stats[name]['format']
  pairs = [p for p in (prompt_and_answer(r, fmt, field) for r in data.dev_records(name)) if p]
  if limit:
    pairs = pairs[:limit]
  if not pairs:
    return None
  longest = max(len(gen.tokenizer(a, add_special_tokens=False)['input_ids']) for _, a in pairs)
  answers = gen.chat([c for c, _ in pairs], min(longest + 8, MAX_ANSWER_TOKENS),
                     batch_size=batch_size)
  hits = [got.strip() == want.strip() for got, (_, want) in zip(answers, pairs)]
  return float(np.mean(hits)), len(hits)


def evaluate(model, data, gen: sampler.Generator, mesh, field: str = 'answer', limit: int = 0,
             loss_batches: int = 0, batch_size: int = 16) -> dict[str, float]:
  """{'<name>/loss', '<name>/exact_match', 'exact_match'} over the config's datasets."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  graphdef, params = nnx.split(model)
  out, hits, total = {}, 0.0, 0
  for name in data.names:
    loss = dev_loss(graphdef, params, data, name, mesh, loss_batches)
    if loss is not None:
      out[f'{name}/loss'] = loss
    em = exact_match(gen, data, name, field, limit, batch_size)
    if em is not None:
      out[f'{name}/exact_match'] = em[0]
      hits, total = hits + em[0] * em[1], total + em[1]
  if total:
    out['exact_match'] = hits / total  # Over all answered examples.
  return out
