"""The held-out test split: carved apart from dev with its repeats, or read from test_path;
refused when it shares an example with train or dev; old checkpoints are told how to resume."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from test_data_common import char_tokenizer, small_config, write_jsonl  # noqa: E402
from mos_jax import config as config_lib  # noqa: E402
from mos_jax.data import build_data  # noqa: E402
from mos_jax.data import bundle as bundle_lib  # noqa: E402
from mos_jax.training import resume  # noqa: E402


def _rows(n, repeat=1):
  return [{'prompt': f'q{i}', 'response': f'a{i}'} for i in range(n) for _ in range(repeat)]


def test_carved_test_split_is_disjoint_and_leaves_dev_as_it_was(tmp_path):
  tok = char_tokenizer(str(tmp_path / 'tok'))
  path = write_jsonl(str(tmp_path / 'a.jsonl'), _rows(30, repeat=2))  # Every record twice.
  plain = build_data(small_config(tok, {'a': config_lib.dataset(path, dev_examples=6)}))
  data = build_data(small_config(tok, {'a': config_lib.dataset(path, dev_examples=6,
                                                              test_examples=5)}))
  try:
    assert data.dev_records('a') == plain.dev_records('a')  # Its own seed: dev unchanged.
    s = data.stats['a']
    assert s['test_examples'] == 5 and s['dev_examples'] == 6
    # The five test examples' repeats left the train split with them.
    assert s['train_examples'] == 60 - 6 - 5 - s['test_copies_dropped']
    assert s['test_copies_dropped'] == 5
    split_ids = {split: {tuple(data.example('a', i, split)['ids'])
                         for i in range(s[f'{split}_examples'])}
                 for split in ('train', 'dev', 'test')}
    assert len(split_ids['test']) == 5
    assert not split_ids['test'] & split_ids['train'] and not split_ids['test'] & split_ids['dev']
    assert len(list(data.test_batches('a'))) >= 1 and data.test_fingerprint('a')
    assert plain.test_fingerprint('a') == '' and not list(plain.test_batches('a'))
    assert plain.fingerprint('a') != data.fingerprint('a')  # The train split changed.
  finally:
    data.close()
    plain.close()


def test_test_file_overlapping_train_or_dev_is_refused(tmp_path):
  tok = char_tokenizer(str(tmp_path / 'tok'))
  rows = _rows(20)
  train = write_jsonl(str(tmp_path / 'train.jsonl'), rows[:12])
  dev = write_jsonl(str(tmp_path / 'dev.jsonl'), rows[12:16])
  good = write_jsonl(str(tmp_path / 'test.jsonl'), rows[16:])
  data = build_data(small_config(tok, {'a': config_lib.dataset(train, dev_path=dev,
                                                              test_path=good)}))
  assert data.stats['a']['test_examples'] == 4 and data.stats['a']['train_examples'] == 12
  data.close()
  for name, leak in (('train', rows[3]), ('dev', rows[13])):
    bad = write_jsonl(str(tmp_path / f'test_{name}.jsonl'), rows[16:] + [leak])
    config = small_config(tok, {'a': config_lib.dataset(train, dev_path=dev, test_path=bad)})
    with pytest.raises(ValueError, match=rf"dataset 'a': 1 test examples \(.*test_{name}.jsonl\) "
                                         rf"also appear in its {name} split"):
      build_data(config)


def test_too_many_test_examples_is_refused(tmp_path):
  tok = char_tokenizer(str(tmp_path / 'tok'))
  path = write_jsonl(str(tmp_path / 'a.jsonl'), _rows(5, repeat=3))
  config = small_config(tok, {'a': config_lib.dataset(path, dev_examples=0, test_examples=6)})
  with pytest.raises(ValueError, match="dataset 'a': test_examples=6 but only 5 distinct"):
    build_data(config)


def test_checkpoint_from_before_test_splits_says_how_to_resume():
  current = {'names': ['a'], 'loader': {}, 'fingerprints': {'a': 'new'}}
  saved = {'names': ['a'], 'loader': {}, 'fingerprints': {'a': 'old'},
           'config': {'data': {'datasets': {'a': {'path': 'a.jsonl', 'dev_examples': 5}}}}}
  with pytest.raises(ValueError, match=r"predates test splits.*datasets\.a\.test_examples=0"):
    resume.check_same_data(saved, current, 'w')
  saved['config']['data']['datasets']['a']['test_examples'] = 5
  with pytest.raises(ValueError, match='Restore the data and settings'):
    resume.check_same_data(saved, current, 'w')
