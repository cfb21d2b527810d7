"""The work behind `python -m mos_jax.generate`: read prompts, answer them, print the answers."""

from __future__ import annotations

import dataclasses
import json
import sys

from mos_jax.inference import sampler
from mos_jax.inference import loaded as loaded_lib
from mos_jax.infra import jsonl


@dataclasses.dataclass(frozen=True)
class Options:
  max_new_tokens: int = 256
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  stop: tuple = ()
  batch_size: int = 16
  raw: bool = False

  @property
  def sampling(self) -> sampler.Sampling:
    return sampler.Sampling(self.temperature, self.top_k, self.top_p)


def read_prompts(path: str) -> list[dict]:
  """JSONL lines with "prompt" (str) or "messages" (list of {role, content}); errors name the line."""
  out = []
  for n, record in jsonl.records(path, '--prompts file'):
    ok = isinstance(record, dict) and (
        isinstance(record.get('prompt'), str) or (
            isinstance(record.get('messages'), list) and record['messages'] and all(
                isinstance(m, dict) and isinstance(m.get('role'), str)
                and isinstance(m.get('content'), str) for m in record['messages'])))
    if not ok:
      raise ValueError(f'{path}:{n}: expected {{"prompt": "..."}} or {{"messages": [{{"role": '
                       f'..., "content": ...}}, ...]}}.')
    out.append(record)
  return out


def answer(gen: sampler.Generator, records: list[dict], options: Options) -> list[str]:
  if options.raw:
    texts = [r['prompt'] if 'prompt' in r else '\n'.join(m['content'] for m in r['messages'])
             for r in records]
    return gen.generate(texts, options.max_new_tokens, options.sampling, options.seed,
                        options.stop, options.batch_size)
  conversations = [r['messages'] if 'messages' in r else [{'role': 'user', 'content': r['prompt']}]
                   for r in records]
  return gen.chat(conversations, options.max_new_tokens, options.sampling, options.seed,
                  options.stop, options.batch_size)


def run(config, workdir, step, prompt, prompts_file, options: Options, stdin=None, out=None):
  out = out or sys.stdout
  if prompt is not None and prompts_file:
    raise ValueError('give --prompt or --prompts, not both.')
  records = read_prompts(prompts_file) if prompts_file else None
  loaded = loaded_lib.load(config, workdir, step)
  gen = loaded_lib.generator(loaded, chat=not options.raw)
  if prompt is not None:
    print(answer(gen, [{'prompt': prompt}], options)[0], file=out)
  elif records is not None:
    for record, text in zip(records, answer(gen, records, options)):
      print(json.dumps({**record, 'answer': text}, ensure_ascii=False), file=out)
  else:
    _interactive(gen, loaded, options, stdin or sys.stdin, out)


def _interactive(gen, loaded, options, stdin, out):
  """One user message per line; the conversation continues until an empty line or EOF."""
  source = f'step {loaded.step}' if loaded.step is not None else 'the base model'
  print(f'Chatting with {source}; an empty line ends.', file=out)
  history = []
  for line in stdin:
    line = line.rstrip('\n')
    if not line:
      break
    if options.raw:
      text = answer(gen, [{'prompt': line}], options)[0]
    else:
      history.append({'role': 'user', 'content': line})
      text = answer(gen, [{'messages': history}], options)[0]
      history.append({'role': 'assistant', 'content': text})
    print(text, file=out, flush=True)
