"""Demo skills: sizes, checkable answers, the tokenizer, build_data on them, and the inspect CLI."""

import collections
import json
import os
import re
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from mos_jax import config as config_lib
from mos_jax.data import build_data
from mos_jax.data import demo_skills
from mos_jax.data import inspect as inspect_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope='module')
def demo_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('demo'))
  demo_skills.ensure_demo(out)
  return out


def _records(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _demo_config(demo_dir, **data):
  c = config_lib.base_config()
  c.data.demo_dir = demo_dir
  c.data.max_len = 128
  c.train.batch_size = 16
  for name, entry in demo_skills.config_entries(demo_dir).items():
    c.data.datasets[name] = entry
  for k, v in data.items():
    c.data[k] = v
  return c


def test_files_sizes_and_idempotence(demo_dir):
  paths = demo_skills.ensure_demo(demo_dir)
  assert sorted(paths) == ['chat', 'facts', 'math', 'nlp']
  mtimes = {n: os.path.getmtime(p) for n, p in paths.items()}
  assert demo_skills.ensure_demo(demo_dir) == paths  # Present: nothing is rewritten.
  assert mtimes == {n: os.path.getmtime(p) for n, p in paths.items()}
  sizes = {n: len(_records(p)) for n, p in paths.items()}
  assert 3500 <= sum(sizes.values()) <= 4500
  table1 = {'math': 26.2, 'facts': 5.2, 'chat': 9.3, 'nlp': 62.6}  # Paper, Table 1 (K examples).
  for name, k in table1.items():
    assert abs(sizes[name] / sum(sizes.values()) - k / 103.3) < 0.01, name
  # Golden first records: a change to the generator must bump demo_skills.VERSION.
  assert _records(paths['nlp'])[0] == {'inputs': 'Which number is larger, 81 or 159?',
                                        'targets': '159', 'answer': '159'}


def test_answers_are_checkable(demo_dir):
  paths = demo_skills.ensure_demo(demo_dir)
  for r in _records(paths['math']):
    value = eval(r['input'], {'__builtins__': {}})  # pylint: disable=eval-used
    assert r['answer'] == str(value) and r['output'].endswith(f'The answer is {value}.')
  facts = collections.defaultdict(set)
  for r in _records(paths['facts']):
    country = re.search(r'(?:of|was) ([A-Z][a-z]+)', r['prompt']).group(1)
    kind = 'capital' if 'capital' in r['prompt'] else 'color' if 'color' in r['prompt'] else 'year'
    facts[(country, kind)].add(r['answer'])
    assert r['response'] == r['answer']
  assert all(len(v) == 1 for v in facts.values())  # One fixed fact table.
  ops = {'reverse': lambda w: w[::-1], 'capital letters': str.upper,
         'twice': lambda w: ''.join(c + c for c in w),
         'vowels': lambda w: re.sub('[aeiouAEIOU]', '', w)}
  for r in _records(paths['chat']):
    turns = [t for t in r['conversations'] if t['from'] != 'system']
    word = re.search(r'"(\w+)"', turns[0]['value']).group(1)
    for user, reply in zip(turns[::2], turns[1::2]):
      word = next(fn(word) for key, fn in ops.items() if key in user['value'].lower())
      assert reply['value'] == word
    assert len(turns) >= 4 and r['answer'] == word
  for r in _records(paths['nlp']):
    numbers = [int(x) for x in re.findall(r'\d+', r['inputs'])]
    if 'even or odd' in r['inputs']:
      assert r['answer'] == ('even' if numbers[0] % 2 == 0 else 'odd')
    elif 'larger' in r['inputs']:
      assert r['answer'] == str(max(numbers))
    else:
      assert r['answer'] in ('positive', 'negative') and r['targets'] == r['answer']


def test_tokenizer_loads_with_a_chat_template(demo_dir):
  tok = AutoTokenizer.from_pretrained(demo_skills.tokenizer_dir(demo_dir))
  assert len(tok) <= 512 and tok.is_fast
  assert (tok.pad_token, tok.bos_token, tok.eos_token) == ('<pad>', '<s>', '<|im_end|>')
  for special in ('<|im_start|>', '<|im_end|>', '<pad>', '<s>'):
    assert len(tok.encode(special, add_special_tokens=False)) == 1
  conv = [{'role': 'user', 'content': 'Is 7 odd?'}, {'role': 'assistant', 'content': 'odd'}]
  text = tok.apply_chat_template(conv, tokenize=False)
  assert text == '<|im_start|>user\nIs 7 odd?<|im_end|>\n<|im_start|>assistant\nodd<|im_end|>\n'
  assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_build_data_on_the_demo(demo_dir):
  data = build_data(_demo_config(demo_dir))
  assert data.names == ['chat', 'facts', 'math', 'nlp']
  assert data.sizes == [demo_skills.SKILLS[n].size - demo_skills.SKILLS[n].dev_examples
                        - demo_skills.SKILLS[n].test_examples
                        - data.stats[n]['test_copies_dropped']
                        for n in data.names]  # A test example's repeats leave training too.
  for name in data.names:
    s = data.stats[name]
    assert s['truncated'] == s['dropped_too_long'] == s['dropped_no_target'] == 0
    assert len(data.dev_records(name)) == demo_skills.SKILLS[name].dev_examples
    assert 'answer' in data.dev_records(name)[0]
  # Response lengths differ between skills, so the mixture matters.
  response = {n: data.stats[n]['mean_response_len'] for n in data.names}
  assert response['nlp'] < response['facts'] < response['chat'] < response['math']
  report = inspect_lib.report(data)
  assert all(name in report for name in data.names) and report.count('⟦') >= 4
  data.close()


def test_inspect_command_with_override(demo_dir, tmp_path):
  cfg = tmp_path / 'cfg.py'
  cfg.write_text(
      'from mos_jax import config as config_lib\nfrom mos_jax.data import demo_skills\n'
      'def get_config():\n  c = config_lib.base_config()\n'
      f'  c.data.demo_dir = {demo_dir!r}\n'
      f'  for n, e in demo_skills.config_entries({demo_dir!r}).items():\n    c.data.datasets[n] = e\n'
      '  return c\n')
  out = subprocess.run([sys.executable, '-m', 'mos_jax.data.inspect', f'--config={cfg}',
                        '--config.data.max_len=40'], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()[1:5]}
  data = build_data(_demo_config(demo_dir, max_len=40))
  for name in data.names:  # train, dev, tokens, ..., truncated as in an in-process build.
    s = data.stats[name]
    assert rows[name][2:6] == [str(s['train_examples']), str(s['dev_examples']),
                               str(s['test_examples']), str(s['tokens'])]
    assert rows[name][8] == str(s['truncated'])
  assert int(rows['math'][8]) > 0
  data.close()
