"""evaluate / generate commands on a short demo run, the paper's aggregations, MT-bench judging."""

import http.server
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
import transformers

from demo_run import REPO, demo_config
from mos_jax.evals import tasks as tasks_lib
from mos_jax.inference import sampler
from mos_jax.workdir import metrics as metrics_lib
from mos_jax.evals import mtbench
from mos_jax.evals import skills

# --- Aggregations on hand-made results ----------------------------------------------------------


def _mmlu_results(rng):
  results, n_samples = {}, {}
  for s in tasks_lib.MMLU_SUBJECTS:
    results[f'mmlu_{s}'] = {'acc,none': float(rng.uniform(0.2, 0.8)), 'alias': s}
    n_samples[f'mmlu_{s}'] = {'original': 500, 'effective': int(rng.integers(50, 400))}
  return results, n_samples


def test_mmlu_categories_by_hand():
  results, n = _mmlu_results(np.random.default_rng(0))
  got = tasks_lib.mmlu_summary(results, n)

  def by_hand(subjects):
    acc = [results[f'mmlu_{s}']['acc,none'] for s in subjects]
    size = [n[f'mmlu_{s}']['effective'] for s in subjects]
    return 100 * sum(a * k for a, k in zip(acc, size)) / sum(size)
  math = ['abstract_algebra', 'college_mathematics', 'elementary_mathematics',
          'high_school_mathematics', 'high_school_statistics']
  medicine = ['anatomy', 'clinical_knowledge', 'college_medicine', 'medical_genetics',
              'nutrition', 'professional_medicine', 'virology']
  others = [s for s in tasks_lib.MMLU_SUBJECTS if s not in math + medicine]
  assert len(others) == 45
  assert got['mmlu_question_weighted/mathematics'] == pytest.approx(by_hand(math))
  assert got['mmlu_question_weighted/medicine'] == pytest.approx(by_hand(medicine))
  assert got['mmlu_question_weighted/others'] == pytest.approx(by_hand(others))
  assert got['mmlu_question_weighted'] == pytest.approx(by_hand(tasks_lib.MMLU_SUBJECTS))
  assert got['mu_MU'] == got['mmlu_subject_macro']  # tests/evals/test_mmlu_averages.py
  # A partial MMLU run reports its categories but no mu_MU.
  del results['mmlu_virology']
  assert 'mu_MU' not in tasks_lib.mmlu_summary(results, n)


def test_math_summary_and_mu_both():
  results, n = _mmlu_results(np.random.default_rng(1))
  results['gsm8k'] = {'exact_match,strict-match': 0.30, 'exact_match,flexible-extract': 0.35}
  results['hendrycks_math'] = {'exact_match,none': 0.10}
  got = tasks_lib.math_summary(results, n)
  mmlu_math = tasks_lib.mmlu_summary(results, n)['mmlu_question_weighted/mathematics']
  assert got['mmlu_math'] == pytest.approx(mmlu_math)
  assert got['mu_all'] == pytest.approx((30.0 + 10.0 + mmlu_math) / 3)
  assert tasks_lib.mu_both({'mu_MU': 50.0, 'mu_MB': 6.0}) == {'mu_BOTH': 55.0}
  assert tasks_lib.mu_both({'mu_MU': 50.0}) == {}


def test_task_names_are_checked(tmp_path):
  known = lambda: ['gsm8k', 'mmlu', 'arc_easy']
  with pytest.raises(ValueError, match="unknown task 'gsm8kk'.*gsm8k"):
    tasks_lib.plan(['gsm8kk'], None, known)
  with pytest.raises(FileNotFoundError, match='nowhere.jsonl'):
    tasks_lib.plan(['mtbench:nowhere.jsonl'], None, known)
  items = tasks_lib.plan(['arc_easy', 'paper_math', 'skills'], 3, known)
  assert items[0] == tasks_lib.LmEvalRun(('arc_easy',), 3)
  assert tasks_lib.LmEvalRun(('gsm8k',), 5) in items and 'skills' in items


# --- MT-bench -----------------------------------------------------------------------------------

JUDGE_PROMPTS = [
    {'name': 'single-v1', 'type': 'single', 'system_prompt': 'You are a judge.',
     'prompt_template': 'Q: {question}\nA: {answer}\nRate.', 'output_format': '[[rating]]'},
    {'name': 'single-v1-multi-turn', 'type': 'single', 'system_prompt': 'You are a judge (2).',
     'prompt_template': 'Q1 {question_1} A1 {answer_1} Q2 {question_2} A2 {answer_2}',
     'output_format': '[[rating]]'},
    {'name': 'single-math-v1', 'type': 'single', 'system_prompt': 'Math judge.',
     'prompt_template': 'Q: {question} REF: {ref_answer_1} A: {answer}', 'output_format': '[[rating]]'},
    {'name': 'single-math-v1-multi-turn', 'type': 'single', 'system_prompt': 'Math judge (2).',
     'prompt_template': '{question_1}|{ref_answer_1}|{answer_1}|{question_2}|{ref_answer_2}|{answer_2}',
     'output_format': '[[rating]]'},
]
QUESTIONS = [
    {'question_id': 81, 'category': 'writing', 'turns': ['Write a poem.', 'Make it shorter.']},
    {'question_id': 111, 'category': 'math', 'turns': ['What is 7+5?', 'And 7*5?'],
     'reference': ['12', '35']},
]


class _Judge(http.server.BaseHTTPRequestHandler):
  """OpenAI-compatible stand-in: rates by the judge prompt it receives."""
  seen = []

  def do_POST(self):  # pylint: disable=invalid-name
    body = json.loads(self.rfile.read(int(self.headers['Content-Length'])))
    _Judge.seen.append((self.path, self.headers.get('Authorization'), body))
    system, user = body['messages'][0]['content'], body['messages'][1]['content']
    if system == 'Math judge (2).':
      reply = 'I cannot decide.'  # No rating: FastChat's -1, left out of the scores.
    elif system == 'Math judge.':
      reply = 'Correct. Rating: [9]'  # Only the backup pattern matches.
    elif 'Q1' in user:
      reply = 'Fine. Rating: [[6.5]]'
    else:
      reply = 'Good. Rating: [[7]]'
    data = json.dumps({'choices': [{'message': {'role': 'assistant', 'content': reply}}]})
    self.send_response(200)
    self.send_header('Content-Type', 'application/json')
    self.end_headers()
    self.wfile.write(data.encode())

  def log_message(self, *args):
    pass


@pytest.fixture
def judge_server():
  server = http.server.HTTPServer(('127.0.0.1', 0), _Judge)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  _Judge.seen = []
  yield f'http://127.0.0.1:{server.server_port}/v1'
  server.shutdown()


def test_judging_against_a_local_endpoint(judge_server, tmp_path, monkeypatch):
  answers = [{'question_id': q['question_id'], 'answer_id': 'x', 'model_id': 'm',
              'choices': [{'index': 0, 'turns': ['a1', 'a2']}], 'tstamp': 0.0} for q in QUESTIONS]
  prompts_file = tmp_path / 'judge_prompts.jsonl'
  prompts_file.write_text(''.join(json.dumps(p) + '\n' for p in JUDGE_PROMPTS))
  judgments = mtbench.judge_answers(QUESTIONS, answers, mtbench.read_judge_prompts(
      str(prompts_file)), judge_server, 'gpt-4', api_key='secret')
  assert [(j['question_id'], j['turn'], j['score']) for j in judgments] == [
      (81, 1, 7.0), (81, 2, 6.5), (111, 1, 9.0), (111, 2, -1.0)]
  assert judgments[2]['user_prompt'] == 'Q: What is 7+5? REF: 12 A: a1'
  assert judgments[1]['judge'] == ['gpt-4', 'single-v1-multi-turn']
  path, auth, body = _Judge.seen[0]
  assert path == '/v1/chat/completions' and auth == 'Bearer secret'
  assert body['model'] == 'gpt-4' and body['temperature'] == 0
  got = mtbench.scores(QUESTIONS, judgments)
  assert got['mtbench/writing'] == pytest.approx(6.75)
  assert got['mtbench/math'] == pytest.approx(9.0)
  assert got['mu_MB'] == pytest.approx((7 + 6.5 + 9) / 3)
  assert got['mtbench/failed_ratings'] == 1


def test_rating_extraction():
  assert mtbench.parse_rating('Rating: [[8]]') == 8.0
  assert mtbench.parse_rating('[[3.5]] and later [7]') == 3.5
  assert mtbench.parse_rating('score [4]') == 4.0
  assert mtbench.parse_rating('no score') == -1.0


def test_malformed_questions_and_replies(tmp_path):
  bad = tmp_path / 'q.jsonl'
  bad.write_text(json.dumps(QUESTIONS[0]) + '\n' + json.dumps({'question_id': 3}) + '\n')
  with pytest.raises(ValueError, match=r'q.jsonl:2: .*turns'):
    mtbench.read_questions(str(bad))
  bad.write_text('{not json\n')
  with pytest.raises(ValueError, match=r'q.jsonl:1: not valid JSON'):
    mtbench.read_questions(str(bad))

  class NotJson(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # pylint: disable=invalid-name
      self.rfile.read(int(self.headers['Content-Length']))
      self.send_response(200)
      self.end_headers()
      self.wfile.write(b'<html>proxy error</html>')

    def log_message(self, *args):
      pass
  server = http.server.HTTPServer(('127.0.0.1', 0), NotJson)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    with pytest.raises(mtbench.JudgeError, match='not a chat completion'):
      mtbench.chat_completion(f'http://127.0.0.1:{server.server_port}/v1', 'm', 's', 'u', None)
  finally:
    server.shutdown()


# --- On a short demo run ----------------------------------------------------------------------


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('eval_run')
  from mos_jax import training
  config = demo_config(tmp, train__steps=4, train__eval_every=0, train__eval_batches=0,
                       train__log_every=2, train__checkpoint_every=4, mixing__strategy='static')
  training.train(training.build(config, str(tmp / 'run')))
  return config, str(tmp / 'run')


def test_skills_and_lm_eval_task_written_to_the_run(run, tmp_path):
  config, workdir = run
  tasks = tmp_path / 'tasks'
  tasks.mkdir()
  data = tmp_path / 'mc.jsonl'
  data.write_text(''.join(json.dumps({'q': f'{a}+{b}=', 'choices': [str(a + b), str(a * b + 1)],
                                      'label': 0}) + '\n' for a, b in [(1, 2), (3, 4), (5, 6)]))
  (tasks / 'mc.yaml').write_text(
      f'task: tiny_sums\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n'
      'test_split: test\noutput_type: multiple_choice\ndoc_to_text: "{{q}}"\n'
      'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\nmetric_list:\n  - metric: acc\n')
  record = tasks_lib.evaluate(config, workdir, ['skills', 'tiny_sums'], limit=3,
                               include_path=str(tasks), batch_size=4)
  saved = json.loads(open(os.path.join(workdir, 'eval', '4.json')).read())
  assert saved['step'] == 4 and saved['summary'] == pytest.approx(record['summary'])
  assert 'acc,none' in saved['lm_eval']['results']['tiny_sums']
  # The skills dev loss is the trainer's dev loss of the same checkpoint (whole dev split).
  last = metrics_lib.read_metrics(os.path.join(workdir, 'metrics.jsonl'))[-1]
  for name in ('math', 'facts', 'chat', 'nlp'):
    assert saved['summary'][f'skills/{name}/loss'] == pytest.approx(last[f'eval/{name}/loss'],
                                                                     rel=1e-5)
    assert 0.0 <= saved['summary'][f'skills/{name}/exact_match'] <= 1.0


def test_skills_exact_match_counts_hits(run):
  config, _ = run
  from mos_jax.data import build_data
  data = build_data(config)
  try:
    records = data.dev_records('facts')[:4]
    expected = [skills.prompt_and_answer(r, 'prompt_response', 'answer') for r in records]
    # The prompt is the conversation without the answer turn.
    assert all(c[-1]['role'] == 'user' and a not in c[-1]['content'] for c, a in expected)

    class Half:  # Right on even examples, wrong on odd ones.
      tokenizer = data.tokenizer

      def chat(self, conversations, *args, **kwargs):
        assert [c for c in conversations] == [c for c, _ in expected]
        return [f' {a} ' if i % 2 == 0 else a + 'x' for i, (_, a) in enumerate(expected)]
    assert skills.exact_match(Half(), data, 'facts', 'answer', limit=4) == (0.5, 4)
    assert skills.exact_match(Half(), data, 'facts', 'no_such_field', limit=4) is None
  finally:
    data.close()


def test_mtbench_answers_then_unreachable_judge(run, tmp_path):
  config, workdir = run
  questions = tmp_path / 'question.jsonl'
  questions.write_text(''.join(json.dumps(q) + '\n' for q in QUESTIONS))
  prompts = tmp_path / 'judge_prompts.jsonl'
  prompts.write_text(''.join(json.dumps(p) + '\n' for p in JUDGE_PROMPTS))
  judge = tasks_lib.Judge(url='http://127.0.0.1:9/v1', model='gpt-4', prompts=str(prompts),
                           max_new_tokens=8)
  out = tmp_path / 'out.json'
  record = tasks_lib.evaluate(config, workdir, [f'mtbench:{questions}', 'skills'], limit=2,
                               judge=judge, out_path=str(out))
  assert 'unreachable' in record['errors']['mtbench']
  assert 'skills/exact_match' in record['summary']  # The other task still ran.
  answers = [json.loads(line) for line in
             open(tmp_path / 'mt_bench_4' / 'model_answer' / 'mos_jax-step4.jsonl')]
  assert [a['question_id'] for a in answers] == [81, 111]
  for a in answers:
    assert set(a) == {'question_id', 'answer_id', 'model_id', 'choices', 'tstamp'}
    assert a['choices'][0]['index'] == 0 and len(a['choices'][0]['turns']) == 2


def test_generate_command(run, tmp_path):
  config, workdir = run
  data_dir = config.data.demo_dir
  base = [sys.executable, '-m', 'mos_jax.generate', '--config', f'{REPO}/configs/demo.py',
          '--workdir', workdir, f'--config.data.demo_dir={data_dir}',
          f'--config.data.tokenizer={config.data.tokenizer}', '--max_new_tokens=4']
  base += [f'--config.data.datasets.{n}.path={e.path}' for n, e in config.data.datasets.items()]
  prompts = tmp_path / 'p.jsonl'
  prompts.write_text(json.dumps({'prompt': 'What is 2+2?'}) + '\n' + json.dumps(
      {'messages': [{'role': 'user', 'content': 'hi'}]}) + '\n')
  env = {**os.environ, 'PYTHONPATH': REPO}
  done = subprocess.run(base + [f'--prompts={prompts}'], env=env, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{')]
  assert len(lines) == 2 and all(isinstance(x['answer'], str) for x in lines)
  prompts.write_text('{"prompt": "ok"}\n{"question": 1}\n')
  bad = subprocess.run(base + [f'--prompts={prompts}'], env=env, capture_output=True, text=True,
                       timeout=300)
  assert bad.returncode != 0 and 'p.jsonl:2' in bad.stderr


def test_exported_run_generates_the_same_tokens_in_transformers(run, tmp_path):
  config, workdir = run
  from mos_jax.inference import export
  from mos_jax.inference import loaded as loaded_lib
  export.export(config, workdir, str(tmp_path / 'hf'))
  loaded = loaded_lib.load(config, workdir)
  gen = loaded_lib.generator(loaded)
  prompts = [gen.chat_prompt([{'role': 'user', 'content': t}])
             for t in ('What is 12+7?', 'Name the capital of Kalomi.')]
  ids = [loaded.tokenizer(p, add_special_tokens=False)['input_ids'] for p in prompts]
  ours = sampler.Generator(loaded.model, loaded.tokenizer, stop_ids=[]).generate_ids(ids, 12)

  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'hf', dtype=torch.float32)
  for prompt_ids, got in zip(ids, ours):
    with torch.no_grad():
      ref = model.generate(input_ids=torch.tensor([prompt_ids]), max_new_tokens=12,
                           min_new_tokens=12, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    assert got == ref[0, len(prompt_ids):].tolist()


def test_eval_tasks_during_training(tmp_path):
  tasks = tmp_path / 'tasks'
  tasks.mkdir()
  data = tmp_path / 'mc.jsonl'
  data.write_text(''.join(json.dumps({'q': f'{a}+{b}=', 'choices': [str(a + b), str(a * b + 1)],
                                      'label': 0}) + '\n' for a, b in [(1, 2), (3, 4)]))
  (tasks / 'mc.yaml').write_text(
      f'task: tiny_sums\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n'
      'test_split: test\noutput_type: multiple_choice\ndoc_to_text: "{{q}}"\n'
      'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\nmetric_list:\n  - metric: acc\n')
  from mos_jax import training
  config = demo_config(tmp_path, train__steps=2, train__eval_every=2, train__eval_batches=1,
                       train__log_every=2, mixing__strategy='static',
                       train__eval_tasks=('skills', 'tiny_sums'), train__eval_task_limit=2,
                       train__eval_task_path=str(tasks))
  training.train(training.build(config, str(tmp_path / 'run')))
  lines = metrics_lib.read_metrics(str(tmp_path / 'run' / 'metrics.jsonl'))
  for line in (lines[0], lines[-1]):  # Step 0 and the last step.
    assert 0.0 <= line['eval/skills/exact_match'] <= 1.0
    assert 0.0 <= line['eval/skills/math/exact_match'] <= 1.0
    assert line['eval/tiny_sums/acc'] in (0.0, 0.5, 1.0)


def test_generate_interactive_chat_keeps_the_history(run, monkeypatch):
  import io
  from mos_jax.inference import chat as ask
  config, workdir = run
  seen = []
  original = sampler.Generator.chat

  def spy(self, conversations, *args, **kwargs):
    seen.append([list(c) for c in conversations])
    return original(self, conversations, *args, **kwargs)
  monkeypatch.setattr(sampler.Generator, 'chat', spy)
  out = io.StringIO()
  ask.run(config, workdir, None, None, None, ask.Options(max_new_tokens=3),
          stdin=io.StringIO('hello\nand more\n\nignored\n'), out=out)
  assert out.getvalue().startswith('Chatting with step 4') and len(seen) == 2
  assert [m['role'] for m in seen[1][0]] == ['user', 'assistant', 'user']
  assert seen[1][0][0]['content'] == 'hello' and seen[1][0][2]['content'] == 'and more'
