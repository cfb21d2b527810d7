"""MT-bench: two-turn answers in FastChat's answer format, and single-answer grading by a judge.

Answers go to DIR/eval/mt_bench_<step>/model_answer/<model_id>.jsonl, one line per question:
{question_id, answer_id, model_id, choices: [{index: 0, turns: [answer 1, answer 2]}], tstamp},
so FastChat's gen_judgment.py grades them unchanged. With a judge (any OpenAI-compatible chat
endpoint, the key read from an environment variable, FastChat's judge_prompts.jsonl) every turn is
graded here with FastChat's single-answer protocol: prompts `single-v1` / `single-v1-multi-turn`,
the `-math-` ones with a reference answer for math / reasoning / coding, temperature 0, and the
rating read from `[[r]]` (or `[r]`); judgments go to model_judgment/<judge>_single.jsonl. The score
of a category is the mean rating over its turns (failed ratings left out); mu_MB over all turns.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
import uuid

import jax
import numpy as np

from mos_jax.inference import loaded as loaded_lib
from mos_jax.inference import sampler
from mos_jax.infra import jsonl

# Sampling temperature per category, as FastChat's gen_model_answer uses them.
TEMPERATURES = {'writing': 0.7, 'roleplay': 0.7, 'extraction': 0.0, 'math': 0.0, 'coding': 0.0,
                'reasoning': 0.0, 'stem': 0.1, 'humanities': 0.1}
NEED_REF_CATEGORIES = ('math', 'reasoning', 'coding')
_RATING = re.compile(r'\[\[(\d+\.?\d*)\]\]')
_RATING_BACKUP = re.compile(r'\[(\d+\.?\d*)\]')
MAX_NEW_TOKENS = 1024


class JudgeError(RuntimeError):
  """The judge could not be reached or answered with an error (the answers are written)."""


def read_questions(path: str) -> list[dict]:
  """MT-bench question.jsonl: {question_id, category, turns: [str, ...]}; errors name the line."""
  out = []
  for n, q in jsonl.records(path, 'MT-bench question file'):
    if not (isinstance(q, dict) and 'question_id' in q and isinstance(q.get('turns'), list)
            and q['turns'] and all(isinstance(t, str) for t in q['turns'])):
      got = sorted(q) if isinstance(q, dict) else type(q).__name__
      raise ValueError(f'{path}:{n}: an MT-bench question needs "question_id" and "turns" (a '
                       f'non-empty list of strings); got {got}.')
    out.append(q)
  if not out:
    raise ValueError(f'{path}: no questions.')
  return out


def generate_answers(gen: sampler.Generator, questions, model_id: str,
                     max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = 16) -> list[dict]:
  """Every question's turns answered in one conversation (FastChat answer records)."""
  turns_done = {q['question_id']: [] for q in questions}
  for turn in range(max(len(q['turns']) for q in questions)):
    by_temperature = {}
    for q in questions:
      if turn < len(q['turns']):
        by_temperature.setdefault(TEMPERATURES.get(q.get('category'), 0.7), []).append(q)
    for temperature, group in sorted(by_temperature.items()):
      conversations = []
      for q in group:
        conv = []
        for k in range(turn):
          conv += [{'role': 'user', 'content': q['turns'][k]},
                   {'role': 'assistant', 'content': turns_done[q['question_id']][k]}]
        conversations.append(conv + [{'role': 'user', 'content': q['turns'][turn]}])
      sampling = sampler.Sampling(temperature=temperature)
      answers = gen.chat(conversations, max_new_tokens, sampling, seed=turn,
                         batch_size=batch_size)
      for q, text in zip(group, answers):
        turns_done[q['question_id']].append(text.strip())
  return [{'question_id': q['question_id'], 'answer_id': uuid.uuid4().hex, 'model_id': model_id,
           'choices': [{'index': 0, 'turns': turns_done[q['question_id']]}], 'tstamp': time.time()}
          for q in questions]


def parse_rating(judgment: str) -> float:
  """FastChat's rating extraction: [[r]], else [r], else -1."""
  match = _RATING.search(judgment) or _RATING_BACKUP.search(judgment)
  return float(match.group(1)) if match else -1.0


def read_judge_prompts(path: str) -> dict:
  if not os.path.isfile(path):
    raise FileNotFoundError(f'judge prompts file {path} does not exist (FastChat: '
                            'fastchat/llm_judge/data/judge_prompts.jsonl).')
  prompts = {}
  with open(path, encoding='utf-8') as f:
    for n, line in enumerate(f, 1):
      if line.strip():
        try:
          p = json.loads(line)
          prompts[p['name']] = p
        except (json.JSONDecodeError, KeyError, TypeError):
          raise ValueError(f'{path}:{n}: not a judge prompt record with a "name".') from None
  for name in ('single-v1', 'single-v1-multi-turn'):
    if name not in prompts:
      raise ValueError(f'{path}: no judge prompt named {name!r}.')
  return prompts


def read_references(path: str) -> dict:
  """question_id -> reference turns, from a FastChat answer file (e.g. reference_answer/gpt-4)."""
  if not path:
    return {}
  if not os.path.isfile(path):
    raise FileNotFoundError(f'reference answer file {path} does not exist.')
  with open(path, encoding='utf-8') as f:
    records = [json.loads(line) for line in f if line.strip()]
  return {r['question_id']: r['choices'][0]['turns'] for r in records}


def chat_completion(url: str, model: str, system: str, user: str, api_key: str | None,
                    timeout: float = 120.0) -> str:
  """One request to an OpenAI-compatible /chat/completions endpoint; raises JudgeError."""
  body = json.dumps({'model': model, 'temperature': 0, 'max_tokens': 2048,
                     'messages': [{'role': 'system', 'content': system},
                                  {'role': 'user', 'content': user}]}).encode()
  headers = {'Content-Type': 'application/json'}
  if api_key:
    headers['Authorization'] = f'Bearer {api_key}'
  request = urllib.request.Request(url.rstrip('/') + '/chat/completions', data=body,
                                   headers=headers)
  try:
    with urllib.request.urlopen(request, timeout=timeout) as response:
      reply = json.loads(response.read())
    return reply['choices'][0]['message']['content'] or ''
  except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
    raise JudgeError(f'judge at {url} unreachable: {e}') from None
  except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
    raise JudgeError(f'judge at {url} sent a reply that is not a chat completion ({e!r}).') from None


def judge_answers(questions, answers, prompts: dict, url: str, judge_model: str,
                  references: dict | None = None, api_key: str | None = None) -> list[dict]:
  """FastChat single-answer judgments (one per question and turn)."""
  references = references or {}
  by_id = {a['question_id']: a for a in answers}
  out = []
  for q in questions:
    turns = by_id[q['question_id']]['choices'][0]['turns']
    ref = references.get(q['question_id']) or q.get('reference')
    use_ref = q.get('category') in NEED_REF_CATEGORIES and ref
    for turn in range(min(len(q['turns']), 2)):
      multi = turn == 1
      name = 'single-math-v1' if use_ref else 'single-v1'
      name += '-multi-turn' if multi else ''
      template = prompts.get(name) or prompts['single-v1' + ('-multi-turn' if multi else '')]
      fields = {}
      if use_ref:
        fields = {'ref_answer_1': ref[0], 'ref_answer_2': ref[1] if len(ref) > 1 else ''}
      if multi:
        user = template['prompt_template'].format(
            question_1=q['turns'][0], question_2=q['turns'][1], answer_1=turns[0],
            answer_2=turns[1], **fields)
      else:
        user = template['prompt_template'].format(question=q['turns'][0], answer=turns[0],
                                                  **fields)
      judgment = chat_completion(url, judge_model, template['system_prompt'], user, api_key)
      out.append({'question_id': q['question_id'], 'model': answers[0]['model_id'],
                  'judge': [judge_model, template['name']], 'user_prompt': user,
                  'judgment': judgment, 'score': parse_rating(judgment), 'turn': turn + 1,
                  'tstamp': time.time()})
  return out


def scores(questions, judgments) -> dict[str, float]:
  """{'mtbench/<category>': mean rating, 'mtbench/turn_<k>', 'mu_MB'} over valid ratings."""
  category = {q['question_id']: q.get('category', 'unknown') for q in questions}
  valid = [j for j in judgments if j['score'] >= 0]
  out = {}
  for cat in sorted({category[j['question_id']] for j in valid}):
    out[f'mtbench/{cat}'] = float(np.mean([j['score'] for j in valid
                                           if category[j['question_id']] == cat]))
  for turn in sorted({j['turn'] for j in valid}):
    out[f'mtbench/turn_{turn}'] = float(np.mean([j['score'] for j in valid if j['turn'] == turn]))
  if valid:
    out['mu_MB'] = float(np.mean([j['score'] for j in valid]))
  out['mtbench/failed_ratings'] = float(len(judgments) - len(valid))
  return out


def run(loaded, questions_path: str, out_dir: str, judge, limit: int = 0,
        batch_size: int = 16, max_new_tokens: int = MAX_NEW_TOKENS) -> dict[str, float]:
  """Answers (always written first), then judging when `judge.url` is set."""
  questions = read_questions(questions_path)
  if limit:
    questions = questions[:limit]
  prompts = read_judge_prompts(judge.prompts) if judge.url else None  # Fail before generating.
  references = read_references(judge.references) if judge.url else {}
  model_id = f'mos_jax-step{loaded.step}' if loaded.step is not None else 'mos_jax-base'
  answers = generate_answers(loaded_lib.generator(loaded), questions, model_id, max_new_tokens,
                             batch_size)
  if jax.process_index() == 0:  # Every process generated the same answers; one writes them.
    jsonl.write(os.path.join(out_dir, 'model_answer', f'{model_id}.jsonl'), answers,
                sort_keys=False)
  if not judge.url:
    return {}
  judgments = judge_answers(questions, answers, prompts, judge.url, judge.model, references,
                            os.environ.get(judge.api_key_env))
  name = judge.model.replace('/', '_')
  if jax.process_index() == 0:
    jsonl.write(os.path.join(out_dir, 'model_judgment', f'{name}_single.jsonl'), judgments,
                sort_keys=False)
  return scores(questions, judgments)
