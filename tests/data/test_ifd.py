"""`python -m mos_jax.data.select`: IFD against a hand computation, top fraction, resume, random."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from demo_run import demo_config
from mos_jax.config import dataset
from mos_jax.data import ifd

SIZES = {'alpha': 30, 'beta': 45}
# The random tiny model finds every alpha answer harder after its instruction (IFD > 1, so the
# default bound would keep none): this bound leaves fewer alpha examples than keep * n and more
# beta ones than that.
IFD_MAX = 1.03
TESTS = os.path.dirname(os.path.abspath(__file__))


def _config(tmp_path):
  config = demo_config(tmp_path)  # Tiny preset, demo tokenizer.
  for name, n in SIZES.items():
    with open(tmp_path / f'{name}.jsonl', 'w') as f:
      for i in range(n):
        words = ' '.join(['one', 'two', 'three', 'four'][: 1 + i % 4])
        f.write(json.dumps({'prompt': f'{name} {i}: repeat {words}',
                            'response': f'{words} {i * 7 % 13}'}) + '\n')
    with open(tmp_path / f'{name}_dev.jsonl', 'w') as f:
      f.write(json.dumps({'prompt': 'dev', 'response': f'{name} dev'}) + '\n')
  config.data.root = str(tmp_path)
  config.data.datasets = {name: dataset(f'{name}.jsonl', dev_path=f'{name}_dev.jsonl')
                          for name in SIZES}
  config.data.max_len = 48
  config.data.eval_batch_size = 8
  return config


def _lines(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def selected(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('select')
  config = _config(tmp)
  out = str(tmp / 'ifd')
  manifest = ifd.select(config, 'ifd', 0.2, out, progress=False, log=lambda s: None,
                        ifd_max=IFD_MAX)
  return config, out, manifest


def test_ifd_equals_hand_computation(selected):
  """IFD from the batched, padded, masked passes == exp(NLL(A|Q) - NLL(A)) from unpadded forwards."""
  from mos_jax.models.build import build_model
  from mos_jax.data import bundle as bundle_lib
  config, out, _ = selected
  data = bundle_lib.build_data(config)
  model = build_model(config, None, len(data.tokenizer))
  start = data.tokenizer.bos_token_id
  start = data.tokenizer.eos_token_id if start is None else start

  def mean_nll(ids, predicted):  # Mean NLL of the tokens ids[1:][predicted], one plain forward.
    logits = np.asarray(model(jax.numpy.asarray(ids[None, :-1])).logits, np.float64)[0]
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    nll = -logp[np.arange(len(ids) - 1), ids[1:]]
    return nll[predicted].mean()

  scores = {n: _lines(f'{out}/{n}/scores.jsonl') for n in SIZES}
  for name, i in (('alpha', 0), ('alpha', 29), ('beta', 17)):
    ex = data.example(name, i)
    ids, trained = np.asarray(ex['ids']), np.asarray(ex['trained']).astype(bool)
    cond = mean_nll(ids, trained[1:])
    answer_ids = np.concatenate([[start], ids[trained]])
    answer = mean_nll(answer_ids, np.ones(len(answer_ids) - 1, bool))
    row = scores[name][i]
    assert row['example'] == i
    np.testing.assert_allclose(row['nll_answer_given_instruction'], cond, rtol=2e-5)
    np.testing.assert_allclose(row['nll_answer'], answer, rtol=2e-5)
    np.testing.assert_allclose(row['ifd'], np.exp(cond - answer), rtol=5e-5)
  data.close()


def test_keeps_exactly_the_top_fraction(selected):
  config, out, manifest = selected
  for name, n in SIZES.items():
    rows = _lines(f'{out}/{name}/scores.jsonl')
    scores = np.array([r['ifd'] for r in rows])
    below = np.flatnonzero(scores < IFD_MAX)  # Cherry LLM: IFD >= the bound is dropped first.
    k = min(int(0.2 * n), len(below))
    top = set(below[np.argsort(-scores[below], kind='stable')[:k]])
    assert {r['example'] for r in rows if r['kept']} == top
    assert all(r['ifd'] < IFD_MAX for r in rows if r['kept'])
    assert all((r['dropped'] is None) == r['kept'] for r in rows)
    kept = _lines(f'{out}/{name}/train.jsonl')
    assert len(kept) == manifest['datasets'][name]['train'] == k
    # The records are those examples' conversations (prompts carry the example index).
    indices = [int(r['messages'][0]['content'].split(':')[0].split()[1]) for r in kept]
    assert indices == sorted(top)
    assert _lines(f'{out}/{name}/dev.jsonl')[0]['messages'][1]['content'] == f'{name} dev'
    rest = [i for i in below if i not in top]
    assert not rest or min(scores[list(top)]) >= max(scores[rest])


def test_scoring_resumes_from_the_cache(selected, tmp_path):
  config, out, _ = selected
  again = str(tmp_path / 'again')
  os.makedirs(os.path.join(again, 'scores'))
  cache = os.path.join(out, 'scores', 'beta.cache.jsonl')
  lines = open(cache).read().splitlines()
  first = json.loads(lines[1])
  first['cond'][0] += 1.0  # A marker: a resumed run reads this batch instead of recomputing it.
  with open(os.path.join(again, 'scores', 'beta.cache.jsonl'), 'w') as f:
    f.write('\n'.join([lines[0], json.dumps(first), lines[2][:15]]))  # + a cut line.
  ifd.select(config, 'ifd', 0.2, again, progress=False, log=lambda s: None, ifd_max=IFD_MAX)
  before, after = (_lines(f'{d}/beta/scores.jsonl') for d in (out, again))
  marked = first['ids'][0]
  assert after[marked]['nll_answer_given_instruction'] == pytest.approx(
      before[marked]['nll_answer_given_instruction'] + 1.0, abs=1e-6)
  for b, a in zip(before, after):  # Everything else (recomputed batches included) agrees.
    if b['example'] != marked:
      assert a['ifd'] == pytest.approx(b['ifd'], rel=1e-5)
  assert len(open(os.path.join(again, 'scores', 'beta.cache.jsonl')).read().splitlines()) == \
      len(lines)


def test_random_keeps_a_seeded_fraction(selected, tmp_path):
  config = selected[0]
  runs = {s: ifd.select(config, 'random', 0.2, str(tmp_path / f'r{s}'), seed=s,
                              log=lambda x: None) for s in (0, 1)}
  for name, n in SIZES.items():
    kept = [_lines(tmp_path / f'r{s}' / name / 'train.jsonl') for s in (0, 1)]
    assert len(kept[0]) == len(kept[1]) == int(0.2 * n) == runs[0]['datasets'][name]['train']
    assert kept[0] != kept[1]
  assert not os.path.exists(tmp_path / 'r0' / 'scores')  # No model pass for RANDOM.


def test_scores_on_a_2x2_mesh_equal_one_device(selected, tmp_path):
  """The same selection on 4 simulated devices (data 2 x fsdp 2) as on one."""
  _, out, _ = selected
  sharded = str(tmp_path / 'sharded')
  script = '\n'.join([
      'import pathlib, sys', f'sys.path[:0] = [{TESTS!r}, {os.path.dirname(TESTS)!r}]',
      'from test_ifd import _config', 'from mos_jax.data import ifd',
      f'config = _config(pathlib.Path({str(tmp_path)!r}))',
      'config.mesh.data, config.mesh.fsdp = 2, 2',
      f'ifd.select(config, "ifd", 0.2, {sharded!r}, progress=False, log=print, '
      f'ifd_max={IFD_MAX})'])
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=4',
         'PYTHONPATH': os.path.dirname(os.path.dirname(TESTS))}
  run = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True)
  assert run.returncode == 0, run.stderr[-3000:]
  for name in SIZES:
    one, four = (_lines(f'{d}/{name}/scores.jsonl') for d in (out, sharded))
    np.testing.assert_allclose([r['ifd'] for r in four], [r['ifd'] for r in one], rtol=1e-5)
    assert _lines(f'{sharded}/{name}/train.jsonl') == _lines(f'{out}/{name}/train.jsonl')
