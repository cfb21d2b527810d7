"""Demo skills: four small, deterministic SFT datasets and a tiny tokenizer, made locally.

The four skills mimic the paper's Table 1 in size (about 26 : 5 : 9 : 63) and differ in
format, response length, difficulty and relatedness, so that the mixture matters:

  math   alpaca          multi-step arithmetic with worked answers (long, hard)
  facts  prompt/response recall of a fixed fact table (short, memorisation)
  chat   sharegpt        multi-turn text transformations (multi-turn, medium)
  nlp    inputs/targets  short-label classification (very short, easy; shares numbers with math)

Every record carries `answer`, the exact string the final assistant turn must produce.
Dev and test examples are held out by `dev_examples` and `test_examples` in the config
(`SKILLS[name]`); the test split holds distinct examples, and their repeats leave training too.

`python -m mos_jax.data.demo --out DIR` writes them (mos_jax/data/demo.py).
"""

import dataclasses
import json
import os
import random
import tempfile

from mos_jax import config as config_lib

VERSION = 1  # Bump when the generated content changes, so old folders are regenerated.
TOKENIZER_SUBDIR = 'tokenizer'
VOCAB_SIZE = 512

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# Special tokens: pad/bos/eos, the chatml markers the template uses, and the markers of the
# other built-in templates so that they tokenize to single ids with this tokenizer too.
PAD, BOS, EOS = '<pad>', '<s>', '<|im_end|>'
SPECIAL_TOKENS = [PAD, BOS, EOS, '</s>', '<|im_start|>', '<|begin_of_text|>',
                  '<|start_header_id|>', '<|end_header_id|>', '<|eot_id|>', '<bos>',
                  '<start_of_turn>', '<end_of_turn>']


@dataclasses.dataclass(frozen=True)
class Skill:
  format: str
  size: int  # Examples in the file (train + dev).
  dev_examples: int  # Suggested dev slice for configs.
  test_examples: int  # Held-out test slice (distinct examples, apart from dev), as large as dev.


# 1014 : 201 : 360 : 2425 follows Table 1's 26.2K : 5.2K : 9.3K : 62.6K.
SKILLS = {
    'math': Skill('alpaca', 1014, 100, 100),
    'facts': Skill('prompt_response', 201, 40, 40),
    'chat': Skill('sharegpt', 360, 60, 60),
    'nlp': Skill('inputs_targets', 2425, 200, 200),
}

_SYLLABLES = ['ka', 'lo', 'mi', 'ru', 'te', 'sa', 'vo', 'ni', 'pe', 'zu', 'ra', 'do', 'fi', 'gu']
_COLORS = ['red', 'blue', 'green', 'gold', 'white', 'black', 'violet', 'orange']
_WORDS = ['plant', 'river', 'stone', 'cloud', 'apple', 'tiger', 'window', 'garden', 'silver',
          'candle', 'rocket', 'forest', 'planet', 'bridge', 'castle', 'yellow', 'orange', 'pencil',
          'ladder', 'summer', 'winter', 'mirror', 'button', 'pocket']
_POSITIVE = ['tasty', 'warm', 'friendly', 'great', 'lovely', 'fresh', 'quick', 'clean']
_NEGATIVE = ['cold', 'rude', 'stale', 'awful', 'slow', 'dirty', 'bland', 'noisy']
_THINGS = ['soup', 'service', 'room', 'bread', 'staff', 'coffee', 'train', 'movie']


def _name(rng: random.Random, parts: int) -> str:
  return ''.join(rng.choice(_SYLLABLES) for _ in range(parts)).capitalize()


def _fact_table() -> list[dict]:
  """A fixed table of fictional countries; the same for every call."""
  rng = random.Random(1234)
  names, table = set(), []
  while len(table) < 40:
    country = _name(rng, 3)
    if country in names:
      continue
    names.add(country)
    table.append({'country': country, 'capital': _name(rng, 2), 'color': rng.choice(_COLORS),
                  'year': str(rng.randint(1200, 1990))})
  return table


def _math(rng: random.Random) -> dict:
  a, b, c, d = (rng.randint(2, 30) for _ in range(4))
  steps = rng.randint(1, 3)
  if steps == 1:
    expr, lines, r = f'{a} + {b}', [], a + b
    lines.append(f'{a} + {b} = {r}')
  elif steps == 2:
    s = a + b
    expr, r = f'({a} + {b}) * {c}', s * c
    lines = [f'{a} + {b} = {s}', f'{s} * {c} = {r}']
  else:
    s = a + b
    m = s * c
    expr, r = f'({a} + {b}) * {c} - {d}', m - d
    lines = [f'{a} + {b} = {s}', f'{s} * {c} = {m}', f'{m} - {d} = {r}']
  output = '\n'.join(lines + [f'The answer is {r}.'])
  return {'instruction': 'Compute the value of the expression step by step.', 'input': expr,
          'output': output, 'answer': str(r)}


_FACT_QUESTIONS = {
    'capital': ['What is the capital of {c}?', 'Name the capital city of {c}.'],
    'color': ['What color is the flag of {c}?', 'Which color does the flag of {c} have?'],
    'year': ['In which year was {c} founded?', 'When was {c} founded?'],
}


def _facts(rng: random.Random, table: list[dict]) -> dict:
  row = rng.choice(table)
  attribute = rng.choice(sorted(_FACT_QUESTIONS))
  question = rng.choice(_FACT_QUESTIONS[attribute]).format(c=row['country'])
  return {'prompt': question, 'response': row[attribute], 'answer': row[attribute]}


_TRANSFORMS = {
    'reverse': ('Reverse the word "{w}".', 'Now reverse it.', lambda w: w[::-1]),
    'upper': ('Write "{w}" in capital letters.', 'Now write it in capital letters.',
              lambda w: w.upper()),
    'double': ('Repeat each letter of "{w}" twice.', 'Now repeat each letter twice.',
               lambda w: ''.join(ch * 2 for ch in w)),
    'drop_vowels': ('Remove the vowels from "{w}".', 'Now remove the vowels.',
                    lambda w: ''.join(ch for ch in w if ch.lower() not in 'aeiou')),
}


def _chat(rng: random.Random) -> dict:
  word = rng.choice(_WORDS)
  names = rng.sample(sorted(_TRANSFORMS), rng.randint(2, 3))
  turns = []
  if rng.random() < 0.3:
    turns.append({'from': 'system', 'value': 'You are a precise text tool.'})
  for k, name in enumerate(names):
    first, follow_up, fn = _TRANSFORMS[name]
    turns.append({'from': 'human', 'value': first.format(w=word) if k == 0 else follow_up})
    word = fn(word)
    turns.append({'from': 'gpt', 'value': word})
  return {'conversations': turns, 'answer': word}


def _nlp(rng: random.Random) -> dict:
  task = rng.randrange(3)
  if task == 0:
    n = rng.randint(1, 999)
    label = 'even' if n % 2 == 0 else 'odd'
    inputs = f'Is the number {n} even or odd?'
  elif task == 1:
    good = rng.random() < 0.5
    adjectives = rng.sample(_POSITIVE if good else _NEGATIVE, 2)
    inputs = (f'Review: the {rng.choice(_THINGS)} was {adjectives[0]} and {adjectives[1]}. '
              'Is this review positive or negative?')
    label = 'positive' if good else 'negative'
  else:
    a, b = rng.sample(range(1, 200), 2)
    inputs = f'Which number is larger, {a} or {b}?'
    label = str(max(a, b))
  return {'inputs': inputs, 'targets': label, 'answer': label}


def generate(name: str) -> list[dict]:
  """The records of one skill, identical on every call and machine."""
  rng = random.Random(f'mos_jax-demo-{name}')
  size = SKILLS[name].size
  if name == 'math':
    return [_math(rng) for _ in range(size)]
  if name == 'facts':
    table = _fact_table()
    return [_facts(rng, table) for _ in range(size)]
  if name == 'chat':
    return [_chat(rng) for _ in range(size)]
  if name == 'nlp':
    return [_nlp(rng) for _ in range(size)]
  raise ValueError(f'unknown demo skill {name!r}; known: {sorted(SKILLS)}')


def _texts(records: dict[str, list[dict]]):
  # Role names appear in every rendered chat, so they earn merges too.
  yield from ['user\n', 'assistant\n', 'system\n'] * 200
  for rows in records.values():
    for row in rows:
      for key, value in row.items():
        if isinstance(value, str):
          yield value
        elif key == 'conversations':
          yield from (turn['value'] for turn in value)


def build_tokenizer(records: dict[str, list[dict]], out_dir: str) -> None:
  """A byte-level BPE trained on the demo texts, saved so AutoTokenizer loads it."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from transformers import PreTrainedTokenizerFast  # pylint: disable=g-import-not-at-top

  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(_texts(records), trainer=trainer)
  fast = PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS,
      additional_special_tokens=SPECIAL_TOKENS[3:])
  fast.chat_template = CHATML_TEMPLATE
  fast.save_pretrained(out_dir)


def _paths(out_dir: str) -> dict[str, str]:
  return {name: os.path.join(out_dir, f'{name}.jsonl') for name in SKILLS}


def ensure_demo(out_dir: str) -> dict[str, str]:
  """Writes the demo files and tokenizer into `out_dir` unless present; returns skill -> path.

  The tokenizer is in `os.path.join(out_dir, TOKENIZER_SUBDIR)`. Safe to call from several
  processes: everything is written to a temporary folder and moved into place.
  """
  out_dir = os.path.abspath(os.path.expanduser(out_dir))
  manifest = os.path.join(out_dir, 'manifest.json')
  paths = _paths(out_dir)
  if os.path.exists(manifest):
    with open(manifest) as f:
      if json.load(f).get('version') == VERSION and all(map(os.path.exists, paths.values())):
        return paths
  os.makedirs(out_dir, exist_ok=True)
  records = {name: generate(name) for name in SKILLS}
  with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
    for name, rows in records.items():
      with open(os.path.join(tmp, f'{name}.jsonl'), 'w') as f:
        f.writelines(json.dumps(row) + '\n' for row in rows)
    build_tokenizer(records, os.path.join(tmp, TOKENIZER_SUBDIR))
    for name in records:
      os.replace(os.path.join(tmp, f'{name}.jsonl'), paths[name])
    tok_dir = os.path.join(out_dir, TOKENIZER_SUBDIR)
    os.makedirs(tok_dir, exist_ok=True)
    for fname in os.listdir(os.path.join(tmp, TOKENIZER_SUBDIR)):
      os.replace(os.path.join(tmp, TOKENIZER_SUBDIR, fname), os.path.join(tok_dir, fname))
    with open(os.path.join(tmp, 'manifest.json'), 'w') as f:
      json.dump({'version': VERSION, 'skills': {n: len(r) for n, r in records.items()}}, f)
    os.replace(os.path.join(tmp, 'manifest.json'), manifest)
  return paths


def tokenizer_dir(out_dir: str) -> str:
  return os.path.join(os.path.abspath(os.path.expanduser(out_dir)), TOKENIZER_SUBDIR)


def config_entries(out_dir: str) -> dict:
  """`config.data.datasets` entries for the four skills in `out_dir` (files made on first use)."""
  return {name: config_lib.dataset(path=os.path.join(out_dir, f'{name}.jsonl'), format=s.format,
                                   dev_examples=s.dev_examples, test_examples=s.test_examples)
          for name, s in SKILLS.items()}
