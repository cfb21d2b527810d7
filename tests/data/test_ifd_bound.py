"""IFD selection as Cherry LLM's data_by_IFD.py: IFD >= 1 is dropped before the top fraction."""

import numpy as np
import pytest

from mos_jax.data import ifd


def test_examples_at_or_above_the_bound_are_dropped_first():
  # Ten examples; keep 0.3 -> 3. By IFD alone the top 3 would be 1.7, 1.2 and 1.0 (indices 4,
  # 1, 7); all three are at or above 1, so the top of the rest is 0.95, 0.9, 0.8 (3, 8, 0).
  scores = np.array([0.8, 1.2, 0.1, 0.95, 1.7, 0.5, 0.3, 1.0, 0.9, 0.2])
  kept, reasons, wanted = ifd.ifd_selection(scores, 0.3)
  assert wanted == 3
  assert kept.tolist() == [0, 3, 8]
  assert [i for i, r in enumerate(reasons) if r == ifd.ABOVE_BOUND] == [1, 4, 7]
  assert [i for i, r in enumerate(reasons) if r == ifd.NOT_TOP] == [2, 5, 6, 9]
  assert all(reasons[i] is ifd.KEPT for i in kept)
  # --ifd_max moves the bound: at 1.5 only 1.7 goes, and 1.2 and 1.0 are the new top.
  kept, reasons, _ = ifd.ifd_selection(scores, 0.3, ifd_max=1.5)
  assert kept.tolist() == [1, 3, 7]
  assert [i for i, r in enumerate(reasons) if r == ifd.ABOVE_BOUND] == [4]


def test_fewer_left_than_asked_keeps_all_that_are_left():
  scores = np.array([1.3, 0.4, 2.0, 1.0, np.inf, 0.7])
  kept, reasons, wanted = ifd.ifd_selection(scores, 0.5)
  assert wanted == 3 and kept.tolist() == [1, 5]
  assert reasons == [ifd.ABOVE_BOUND, None, ifd.ABOVE_BOUND, ifd.ABOVE_BOUND, ifd.ABOVE_BOUND,
                     None]
  kept, _, _ = ifd.ifd_selection(np.array([1.1, 3.0]), 1.0)
  assert kept.tolist() == []


def test_select_refuses_a_bound_that_is_not_positive():
  with pytest.raises(ValueError, match='--ifd_max'):
    ifd.select(None, 'ifd', 0.1, '/tmp/unused', ifd_max=0.0)


def test_select_writes_the_bound_reasons_and_the_count(tmp_path, monkeypatch):
  """`select` with hand IFDs in place of the model pass: what it writes and prints."""
  import json
  from demo_run import demo_config
  from mos_jax.config import dataset
  config = demo_config(tmp_path)
  for name in ('a', 'b'):
    with open(tmp_path / f'{name}.jsonl', 'w') as f:
      for i in range(10):
        f.write(json.dumps({'prompt': f'{name} {i}', 'response': f'answer {i}'}) + '\n')
    with open(tmp_path / f'{name}_dev.jsonl', 'w') as f:
      f.write(json.dumps({'prompt': 'dev', 'response': 'dev'}) + '\n')
  config.data.root = str(tmp_path)
  config.data.datasets = {n: dataset(f'{n}.jsonl', dev_path=f'{n}_dev.jsonl') for n in 'ab'}
  hand = {'a': np.array([0.8, 1.2, 0.1, 0.95, 1.7, 0.5, 0.3, 1.0, 0.9, 0.2]),
          'b': np.array([1.3, 0.4, 2.0, 1.0, 1.1, 1.05, 1.4, 1.2, 0.7, 1.6])}
  monkeypatch.setattr(ifd, 'ifd_scores', lambda config, data, out, *a, **k: {
      n: {'cond': np.log(v), 'answer': np.zeros_like(v), 'ifd': v} for n, v in hand.items()})
  logs = []
  out = tmp_path / 'out'
  manifest = ifd.select(config, 'ifd', 0.3, str(out), log=logs.append)
  kept = {n: [json.loads(l)['messages'][0]['content'] for l in open(out / n / 'train.jsonl')]
          for n in 'ab'}
  assert kept == {'a': ['a 0', 'a 3', 'a 8'], 'b': ['b 1', 'b 8']}
  rows = [json.loads(l) for l in open(out / 'b' / 'scores.jsonl')]
  assert [r['dropped'] for r in rows] == [
      ifd.ABOVE_BOUND, None, ifd.ABOVE_BOUND, ifd.ABOVE_BOUND, ifd.ABOVE_BOUND, ifd.ABOVE_BOUND,
      ifd.ABOVE_BOUND, ifd.ABOVE_BOUND, None, ifd.ABOVE_BOUND]
  assert not any(r['kept'] and r['ifd'] >= 1 for r in rows)
  assert any('b: only 2 of 10 examples have IFD < 1.0' in line for line in logs), logs
  assert manifest['ifd_max'] == 1.0
  assert manifest['datasets']['b']['dropped_ifd_at_or_above_max'] == 8
  assert manifest['datasets']['b']['train'] == 2
  with pytest.raises(ValueError, match="dataset 'a': none of its 10 examples has IFD < 0.05"):
    ifd.select(config, 'ifd', 0.3, str(tmp_path / 'none'), log=logs.append, ifd_max=0.05)
