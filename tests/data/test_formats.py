"""Formats, sources, truncation/drop counts, and every bad-input case of the data issue."""

import json

import datasets
import numpy as np
import pytest

from mos_jax import config as config_lib
from mos_jax.data import build_data
from mos_jax.data import formats
from mos_jax.data import sources
from test_data_common import char_tokenizer, pr, small_config, write_jsonl


@pytest.fixture(scope='module')
def tok_dir(tmp_path_factory):
  return char_tokenizer(str(tmp_path_factory.mktemp('tok')))


U, A, S = 'user', 'assistant', 'system'


@pytest.mark.parametrize('record, fmt, expected', [
    ({'instruction': 'Add.', 'input': '2 3', 'output': '5'}, 'alpaca',
     [(U, 'Add.\n\n2 3'), (A, '5')]),
    ({'instruction': 'Hi', 'input': '', 'output': 'Yo', 'system': 'Be brief.'}, 'alpaca',
     [(S, 'Be brief.'), (U, 'Hi'), (A, 'Yo')]),
    ({'conversations': [{'from': 'system', 'value': 's'}, {'from': 'human', 'value': 'a'},
                        {'from': 'gpt', 'value': 'b'}, {'from': 'human', 'value': 'c'},
                        {'from': 'gpt', 'value': 'd'}]}, 'sharegpt',
     [(S, 's'), (U, 'a'), (A, 'b'), (U, 'c'), (A, 'd')]),
    ({'messages': [{'role': 'user', 'content': 'a'}, {'role': 'assistant', 'content': 'b'},
                   {'role': 'user', 'content': 'c'}, {'role': 'assistant', 'content': 'd'}]},
     'messages', [(U, 'a'), (A, 'b'), (U, 'c'), (A, 'd')]),
    ({'inputs': 'Is 3 odd?', 'targets': 'yes'}, 'inputs_targets', [(U, 'Is 3 odd?'), (A, 'yes')]),
    ({'prompt': 'p', 'response': 'r'}, 'prompt_response', [(U, 'p'), (A, 'r')]),
])
def test_formats_to_conversations(record, fmt, expected):
  assert formats.detect_format(record) == fmt
  conv = formats.to_conversation(record, fmt)
  assert [(m['role'], m['content']) for m in conv] == expected


def test_sources_json_array_parquet_save_to_disk_and_folders(tmp_path):
  rows = [pr(f'q{i}', f'a{i}') for i in range(5)]
  (tmp_path / 'arr.json').write_text(json.dumps(rows))
  datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / 'p.parquet'))
  datasets.DatasetDict({'train': datasets.Dataset.from_list(rows[:3]),
                        'test': datasets.Dataset.from_list(rows[3:])}).save_to_disk(
                            str(tmp_path / 'saved'))
  write_jsonl(str(tmp_path / 'folder' / 'train.jsonl'), rows[:2])
  write_jsonl(str(tmp_path / 'folder' / 'test.jsonl'), rows[2:])
  assert sources.load_records('x', str(tmp_path / 'arr.json')).rows == rows
  assert sources.load_records('x', str(tmp_path / 'p.parquet')).rows == rows
  assert sources.load_records('x', str(tmp_path / 'saved'), split='test').rows == rows[3:]
  assert sources.load_records('x', str(tmp_path / 'folder'), split='train').rows == rows[:2]
  assert sources.load_records('x', str(tmp_path / 'folder'), split='test').rows == rows[2:]
  assert sources.load_records('x', str(tmp_path / 'p.parquet'), max_examples=2).rows == rows[:2]
  with pytest.raises(ValueError, match="dataset 'x': split 'dev' not found"):
    sources.load_records('x', str(tmp_path / 'saved'), split='dev')


def _build(tok_dir, path, **kw):
  entry = config_lib.dataset(path, format=kw.pop('format', ''), dev_examples=0)
  return build_data(small_config(tok_dir, {'ds': entry}, **kw))


def test_truncation_and_drop_counts(tok_dir, tmp_path):
  # chatml with the character tokenizer: 'p'/'r' give 23 tokens, i.e. a row of 22 (prompt 20,
  # trained targets at 20, 21); each extra response character adds one token.
  rows = [pr('p', 'r'),            # 22 positions: fits max_len 22
          pr('p', 'rrr'),          # 24: truncated to 22, keeps 2 trained targets
          pr('p', 'r' * 10),       # 31: truncated, keeps 2 trained targets
          pr('pppppppppp', 'r'),   # 31: truncated inside the prompt: nothing trained -> dropped
          {'messages': [{'role': 'user', 'content': 'only a question'}]}]  # nothing to train on
  path = write_jsonl(str(tmp_path / 'd.jsonl'), rows)
  data = _build(tok_dir, path, max_len=22, format='prompt_response', on_error='skip')
  s = data.stats['ds']
  # The messages-only record lacks prompt/response: skipped as a bad record under 'skip'.
  assert (s['train_examples'], s['truncated'], s['dropped_no_target'], s['skipped_records']) == (
      3, 2, 1, 1)
  assert [len(data.example('ds', i)['ids']) for i in range(3)] == [23, 23, 23]
  data.close()

  data = _build(tok_dir, path, max_len=22, format='prompt_response', on_error='skip',
                truncation='drop')
  s = data.stats['ds']
  assert (s['train_examples'], s['truncated'], s['dropped_too_long'], s['dropped_no_target']) == (
      1, 0, 3, 0)
  data.close()

  path2 = write_jsonl(str(tmp_path / 'm.jsonl'), [
      {'messages': [{'role': 'user', 'content': 'q'}]},
      {'messages': [{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': 'a'}]}])
  data = _build(tok_dir, path2)
  assert (data.stats['ds']['train_examples'], data.stats['ds']['dropped_no_target']) == (1, 1)
  assert data.stats['ds']['mean_response_len'] == 2.0  # 'a' and <|im_end|>.
  data.close()


def test_every_kept_row_has_a_trained_target(tok_dir, tmp_path):
  rows = [pr('p' * k, 'r' * (k % 3)) for k in range(1, 30)]
  data = _build(tok_dir, write_jsonl(str(tmp_path / 'd.jsonl'), rows), max_len=24)
  for _ in range(20):
    assert (next(data.train)['loss_mask'].sum(axis=1) > 0).all()
  data.close()


# --- Bad input: a clear message naming the file and line, or the dataset. ---

def test_malformed_json_line_names_file_and_line(tok_dir, tmp_path):
  path = write_jsonl(str(tmp_path / 'bad.jsonl'),
                     [pr('a', 'b'), '', '{"prompt": "x", "response": ', pr('c', 'd')])
  with pytest.raises(ValueError, match=r'bad\.jsonl:3: malformed JSON'):
    _build(tok_dir, path)
  data = _build(tok_dir, path, on_error='skip')
  assert data.stats['ds']['skipped_records'] == 1 and data.sizes == [2]
  data.close()


def test_record_missing_field_names_file_and_line(tok_dir, tmp_path):
  path = write_jsonl(str(tmp_path / 'miss.jsonl'),
                     [pr('a', 'b'), pr('c', 'd'), '', {'prompt': 'e'}, pr('f', 'g')])
  with pytest.raises(ValueError, match=r"dataset 'ds': .*miss\.jsonl:4: missing field 'response'"):
    _build(tok_dir, path)
  data = _build(tok_dir, path, on_error='skip')
  assert data.stats['ds']['skipped_records'] == 1 and data.sizes == [3]
  data.close()


def test_bad_turn_names_the_line(tok_dir, tmp_path):
  path = write_jsonl(str(tmp_path / 'turns.jsonl'), [
      {'conversations': [{'from': 'human', 'value': 'a'}, {'from': 'gpt', 'value': 'b'}]},
      {'conversations': [{'from': 'robot', 'value': 'a'}]}])
  with pytest.raises(ValueError, match=r"turns\.jsonl:2: conversations\[0\] has unknown from"):
    _build(tok_dir, path)


@pytest.mark.parametrize('case, message', [
    ('empty', "dataset 'ds' is empty"),
    ('unknown_format', "dataset 'ds': unknown format 'tsv'"),
    ('undetectable', "dataset 'ds': cannot tell the format from fields"),
    ('missing_path', "dataset 'ds': path .*nope.jsonl does not exist"),
    ('no_template', "dataset 'ds': the tokenizer has no chat template"),
    ('dev_too_large', "dataset 'ds': dev_examples=5 leaves no training examples"),
    ('batch_size', r'train\.batch_size=3 must be a positive multiple of the process count \(2\)'),
    ('reward_batch', r'data\.reward_batch_size=3 must be a positive multiple'),
    ('eval_batch', r'data\.eval_batch_size=5 must be a positive multiple'),
])
def test_bad_configs_are_named(tok_dir, tmp_path, case, message):
  good = write_jsonl(str(tmp_path / 'good.jsonl'), [pr('a', 'b')] * 5)
  entry = config_lib.dataset(good, dev_examples=0)
  kw, process_count = {}, 1
  if case == 'empty':
    entry.path = write_jsonl(str(tmp_path / 'empty.jsonl'), [])
  elif case == 'unknown_format':
    entry.format = 'tsv'
  elif case == 'undetectable':
    entry.path = write_jsonl(str(tmp_path / 'odd.jsonl'), [{'question': 'a', 'answer': 'b'}])
  elif case == 'missing_path':
    entry.path = str(tmp_path / 'nope.jsonl')
  elif case == 'no_template':
    kw['template'] = ''
  elif case == 'dev_too_large':
    entry.dev_examples = 5
  else:
    process_count = 2
    kw = {'batch_size': {'batch_size': 3}, 'reward_batch': {'reward_batch_size': 3},
          'eval_batch': {'eval_batch_size': 5}}[case]
  with pytest.raises(ValueError, match=message):
    build_data(small_config(tok_dir, {'ds': entry}, **kw), 0, process_count)


def test_hub_id_offline_is_named(tok_dir):
  entry = config_lib.dataset('no-such-org/no-such-dataset', dev_examples=0)
  with pytest.raises(ValueError, match="dataset 'ds': no-such-org/no-such-dataset is not a local"):
    build_data(small_config(tok_dir, {'ds': entry}))


def test_dev_split_is_held_out_and_padded(tok_dir, tmp_path):
  rows = [pr(f'q{i}', f'a{i}') for i in range(30)]
  entry = config_lib.dataset(write_jsonl(str(tmp_path / 'd.jsonl'), rows), dev_examples=7)
  data = build_data(small_config(tok_dir, {'ds': entry}, eval_batch_size=4))
  assert data.sizes == [23] and data.stats['ds']['dev_examples'] == 7
  dev = list(data.dev_batches('ds'))
  assert [b['example_ids'].tolist() for b in dev] == [[0, 1, 2, 3], [4, 5, 6, -1]]
  assert dev[1]['loss_mask'][3].sum() == 0 and dev[1]['loss_mask'][2].sum() > 0
  dev_prompts = {r['prompt'] for r in data.dev_records('ds')}
  train_text = {data.tokenizer.decode(data.example('ds', i)['ids']) for i in range(23)}
  assert not any(f'\n{p}<' in t for p in dev_prompts for t in train_text)
  full = list(data.full_pass_batches('ds', 8))
  ids = np.concatenate([b['example_ids'] for b in full])
  assert ids.tolist() == list(range(23)) + [-1]
  data.close()
