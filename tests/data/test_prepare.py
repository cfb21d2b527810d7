"""`python -m mos_jax.data.prepare paper` on small stand-ins of each source's layout (offline)."""

import collections
import json
import math
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mos_jax.data import paper_sets

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# P3 stand-in: subsets with (train rows, where), quota 50 per subset.
P3_TASKS = {'super_glue_cb_gpt_3': (180, 'parquet'), 'cos_e_v1.11_explain': (30, 'jsonl'),
            'xsum_summarize': (75, 'parquet')}
PER_TASK = 50


def write_sources(root) -> dict[str, str]:
  """One stand-in per source, in the layout its download has; returns --source paths."""
  os.makedirs(root, exist_ok=True)
  math_path = os.path.join(root, 'MathInstruct.json')  # Hub file: one JSON array (alpaca).
  with open(math_path, 'w') as f:
    json.dump([{'source': 'data/CoT/gsm_rft.json', 'instruction': f'What is {i} + {i}?',
                'output': f'The answer is {2 * i}.'} for i in range(400)], f)
  med_path = os.path.join(root, 'medinstruct.jsonl')  # instruction/input/output lines.
  with open(med_path, 'w') as f:
    for i in range(120):
      f.write(json.dumps({'instruction': f'Explain symptom {i}.', 'input': '' if i % 2 else 'x',
                          'output': f'Symptom {i} means {i}.'}) + '\n')
  share_path = os.path.join(root, 'ShareGPT_V3_unfiltered_cleaned_split.json')
  chats = [{'id': f'c{i}', 'conversations': [
      {'from': 'human', 'value': f'hi {i}'}, {'from': 'gpt', 'value': f'hello {i}'},
      {'from': 'human', 'value': 'more'}, {'from': 'gpt', 'value': f'sure {i}'}]}
           for i in range(260)]
  chats += [{'id': 'empty', 'conversations': []},  # Unusable rows, as in the real dump.
            {'id': 'odd', 'conversations': [{'from': 'narrator', 'value': 'x'}]},
            {'id': 'mute', 'conversations': [{'from': 'human', 'value': 'x'},
                                             {'from': 'gpt', 'value': '  '}]}]
  with open(share_path, 'w') as f:
    json.dump(chats, f)
  p3 = os.path.join(root, 'P3')
  for task, (n, kind) in P3_TASKS.items():
    rows = [{'inputs_pretokenized': f'{task} question {i}', 'targets_pretokenized': f'a{i}',
             'inputs': list(range(3)), 'targets': [1]} for i in range(n)]
    if kind == 'parquet':  # The hub's parquet conversion: <task>/train/0000.parquet.
      os.makedirs(os.path.join(p3, task, 'train'))
      pq.write_table(pa.Table.from_pylist(rows), os.path.join(p3, task, 'train', '0000.parquet'),
                     row_group_size=32)
      pq.write_table(pa.Table.from_pylist(rows[:5]),  # Other splits are never read.
                     os.path.join(p3, task, 'validation.parquet'))
    else:
      os.makedirs(os.path.join(p3, task))
      with open(os.path.join(p3, task, 'train.jsonl'), 'w') as f:
        for r in rows:
          f.write(json.dumps({'inputs_pretokenized': r['inputs_pretokenized'],
                              'targets_pretokenized': r['targets_pretokenized']}) + '\n')
  os.makedirs(os.path.join(p3, 'only_test_split', 'test'))  # A subset with no train split.
  return {'math': math_path, 'medicine': med_path, 'general': share_path, 'nlp': p3}


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp('prep')
  src = write_sources(str(root / 'sources'))
  out = str(root / 'seed0')
  manifest = paper_sets.prepare_paper(out, seed=0, local_sources=src, dev=20, per_task=PER_TASK,
                                      log=lambda s: None)
  return src, out, manifest, root


def _lines(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _files(folder):
  out = {}
  for dirpath, _, names in os.walk(folder):
    for n in names:
      with open(os.path.join(dirpath, n), 'rb') as f:
        out[os.path.relpath(os.path.join(dirpath, n), folder)] = f.read()
  return out


def test_fractions_and_disjoint_dev(prepared):
  _, out, manifest, _ = prepared
  pools = {'math': 400, 'medicine': 120, 'general': 260,
           'nlp': sum(min(n, PER_TASK) for n, _ in P3_TASKS.values())}
  for name, pool in pools.items():
    m = manifest['datasets'][name]
    train, dev = _lines(f'{out}/{name}/train.jsonl'), _lines(f'{out}/{name}/dev.jsonl')
    assert m['pool'] == pool and len(train) == m['train'] == int(0.1 * pool), name
    assert len(dev) == m['dev'] == 20, name
    key = lambda r: json.dumps(r, sort_keys=True)
    assert len({key(r) for r in train}) == len(train)  # No duplicates...
    assert not {key(r) for r in train} & {key(r) for r in dev}, name  # ...and disjoint.
    assert all(formats_ok(r) for r in train + dev)
  assert manifest['datasets']['general']['unusable_records'] == 3
  assert manifest['datasets']['math']['table1_train'] == 26_200
  # The manifest's hashes are those of the files.
  import hashlib
  for name, m in manifest['datasets'].items():
    for rel, info in m['files'].items():
      with open(os.path.join(out, rel), 'rb') as f:
        assert hashlib.sha256(f.read()).hexdigest() == info['sha256']


def formats_ok(record):
  from mos_jax.data import formats
  conv = formats.to_conversation(record, 'messages')
  return conv[-1]['role'] == 'assistant'


def test_same_seed_same_bytes_other_seed_other_sample(prepared):
  src, out, _, root = prepared
  again = str(root / 'again')
  paper_sets.prepare_paper(again, seed=0, local_sources=src, dev=20, per_task=PER_TASK,
                           log=lambda s: None)
  assert _files(again) == _files(out)
  other = str(root / 'seed1')
  paper_sets.prepare_paper(other, seed=1, local_sources=src, dev=20, per_task=PER_TASK,
                           names=['math'], log=lambda s: None)
  assert _lines(f'{other}/math/train.jsonl') != _lines(f'{out}/math/train.jsonl')
  assert len(_lines(f'{other}/math/train.jsonl')) == 40


def test_p3_takes_at_most_its_quota_per_subset(prepared):
  src = prepared[0]
  pool = paper_sets._p3_pool('nlp', src['nlp'], PER_TASK, 0, lambda s: None)  # pylint: disable=protected-access
  per_task = collections.Counter(r['task'] for r in pool)
  assert per_task == {t: min(n, PER_TASK) for t, (n, _) in P3_TASKS.items()}
  assert len({(r['task'], r['inputs']) for r in pool}) == len(pool)  # Distinct examples.
  # The examples are a random draw, not the first rows of the subset.
  first = {f'super_glue_cb_gpt_3 question {i}' for i in range(PER_TASK)}
  assert {r['inputs'] for r in pool if r['task'] == 'super_glue_cb_gpt_3'} != first
  _, out, _, _ = prepared
  written = _lines(f'{out}/nlp/train.jsonl') + _lines(f'{out}/nlp/dev.jsonl')
  assert all(r['task'] in P3_TASKS for r in written)


def test_missing_source_names_dataset_and_flag(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"'general'.*--source general=PATH"):
    paper_sets.prepare_paper(str(tmp_path), local_sources={'general': str(tmp_path / 'nope')},
                             names=['general'], log=lambda s: None)
  with pytest.raises(FileNotFoundError, match=r"'nlp'.*--source nlp=PATH"):
    paper_sets.prepare_paper(str(tmp_path), names=['nlp'], log=lambda s: None)


def test_command_prints_counts_next_to_table_1(prepared, tmp_path):
  src = prepared[0]
  args = [sys.executable, '-m', 'mos_jax.data.prepare', 'paper', '--out', str(tmp_path / 'o'),
          '--dev', '5', '--datasets', 'medicine'] + ['--source', f'medicine={src["medicine"]}']
  run = subprocess.run(args, capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, 'PYTHONPATH': REPO})
  assert run.returncode == 0, run.stderr[-2000:]
  row = [line for line in run.stdout.splitlines() if line.startswith('medicine')][-1]
  assert row.split()[1:4] == ['12', '5,200', '5']
  assert math.isclose(json.load(open(tmp_path / 'o' / 'manifest.json'))['fraction'], 0.1)


# --- the recipes and the dataset entry options that read the prepared folder ---------------------

def _tiny(config, tmp_path, **train):
  """A paper recipe shrunk to the tiny preset and the demo tokenizer (chatml, like Qwen)."""
  from mos_jax.data import demo_skills
  demo_skills.ensure_demo(str(tmp_path / 'demo'))
  config.model.hf_checkpoint = ''
  config.model.preset = 'tiny'
  config.model.dtype = 'float32'
  config.model.remat = 'none'
  config.data.tokenizer = demo_skills.tokenizer_dir(str(tmp_path / 'demo'))
  config.data.max_len = 64
  config.data.reward_batch_size = config.data.eval_batch_size = 4
  config.train.update(batch_size=4, log_every=1, eval_every=0, eval_batches=1,
                      checkpoint_every=0, progress_bar=False, async_checkpoints=False, **train)
  return config


def test_paper_recipe_on_prepared_folder_trains_two_steps(prepared, tmp_path):
  from mos_jax.infra import cli
  from mos_jax import training
  _, out, manifest, _ = prepared
  config = cli.load_config(os.path.join(REPO, 'configs', 'paper.py:qwen-diff'),
                           [f'--config.data.root={out}', '--config.mixing.update_every=1'])
  total = sum(m['train'] for m in manifest['datasets'].values())
  config = _tiny(config, tmp_path, epochs=7 / total)
  run = training.build(config, str(tmp_path / 'run'))
  try:
    # An epoch is a pass in packed rows (the recipe packs), fewer than the examples.
    rows = sum(run.data.train.rows_per_epoch())
    assert rows < total and run.config.train.steps == math.ceil(7 / total * rows / 4)
    for name, m in manifest['datasets'].items():  # Train file whole, dev from dev.jsonl.
      assert run.data.stats[name]['train_examples'] == m['train'], name
      assert run.data.stats[name]['dev_examples'] == m['dev'], name
    training.train(run)
  finally:
    run.data.close()
  steps = [json.loads(line)['step'] for line in open(tmp_path / 'run' / 'metrics.jsonl')]
  assert max(steps) == run.config.train.steps


def _demo_jsonl(path, n, bad_line=None):
  with open(path, 'w') as f:
    for i in range(n):
      rec = {'prompt': f'p{i}', 'response': f'r{i}'}
      if i + 1 == bad_line:
        del rec['response']
      f.write(json.dumps(rec) + '\n')


def test_random_max_examples_and_explicit_dev(tmp_path):
  from mos_jax.config import dataset
  from mos_jax.data import bundle as bundle_lib
  from demo_run import demo_config
  config = demo_config(tmp_path)
  _demo_jsonl(tmp_path / 'a.jsonl', 100)
  _demo_jsonl(tmp_path / 'a_dev.jsonl', 7)
  config.data.root = str(tmp_path)
  config.data.datasets = {
      'first': dataset('a.jsonl', max_examples=10, dev_examples=3),
      'rand': dataset('a.jsonl', max_examples=10, sample='random', dev_path='a_dev.jsonl'),
      'rand2': dataset('a.jsonl', max_examples=10, sample='random', sample_seed=5,
                       dev_path='a_dev.jsonl')}
  data = bundle_lib.build_data(config, keep_records=True)
  try:
    prompts = lambda n: sorted(r['prompt'] for r in data.train_records(n))
    assert data.stats['first']['train_examples'] == 7  # First 10, 3 held out.
    assert set(prompts('first')) <= {f'p{i}' for i in range(10)}
    assert data.stats['rand']['train_examples'] == 10  # Nothing held out of the train file...
    assert [r['prompt'] for r in data.dev_records('rand')] == [f'p{i}' for i in range(7)]
    assert prompts('rand') != sorted(f'p{i}' for i in range(10))  # ...a random 10, not the first,
    assert prompts('rand') != prompts('rand2')  # and another seed draws another sample.
  finally:
    data.close()
  # A bad record inside a random sample is still named by its line in the file.
  _demo_jsonl(tmp_path / 'b.jsonl', 100, bad_line=57)
  seed = next(s for s in range(50) if 56 in bundle_lib.random_sample('b', 100, 10, s))
  config.data.datasets = {'b': dataset('b.jsonl', max_examples=10, sample='random',
                                       sample_seed=seed, dev_path='a_dev.jsonl')}
  with pytest.raises(ValueError, match=r"'b'.*b\.jsonl:57: missing field 'response'"):
    bundle_lib.build_data(config)
