"""A config that points at another run (mixing.replay.run, mixing.static.from_run,
mixing.doremi.reference) is refused in one line naming what is wrong, before anything is built:
other dataset names, no logged mixture, another mixing.unit, another model, an unfinished run."""

import json
import os

import pytest

from mos_jax.config import base_config, check, config_to_json, dataset
from demo_run import set_mixing


def _config(names=('a', 'b'), **mixing):
  c = base_config()
  for name in names:
    c.data.datasets[name] = dataset(f'/data/{name}.jsonl')
  c.train.steps = 10
  return set_mixing(c, **mixing)


def _run_folder(path, config, mixture_lines=(), checkpoints=()):
  """A run folder as training leaves it: config.json, metrics.jsonl, checkpoints/<step>/."""
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    f.write(config_to_json(config))
  if mixture_lines is not None:
    with open(os.path.join(path, 'metrics.jsonl'), 'w') as f:
      for step, p in mixture_lines:
        names = list(config.data.datasets.keys())
        f.write(json.dumps({'step': step, **{f'mixture/{n}': v for n, v in zip(names, p)}})
                + '\n')
  for step in checkpoints:
    os.makedirs(os.path.join(path, 'checkpoints', str(step)))
  return str(path)


def _refused(config, match):
  with pytest.raises(ValueError, match=match) as info:
    check.validate(config)
  assert '\n' not in str(info.value)


def test_replay_and_from_run_sources(tmp_path):
  good = _run_folder(tmp_path / 'good', _config(), [(0, [0.5, 0.5]), (10, [0.2, 0.8])])
  check.validate(_config(strategy='replay', replay__run=good))
  check.validate(_config(strategy='static', static__from_run=good))

  other = _run_folder(tmp_path / 'other', _config(names=('a', 'c')), [(0, [0.5, 0.5])])
  for mixing in ({'strategy': 'replay', 'replay__run': other},
                 {'strategy': 'static', 'static__from_run': other}):
    _refused(_config(**mixing), r"trained on datasets \['a', 'c'\], this run on \['a', 'b'\]")

  silent = _run_folder(tmp_path / 'silent', _config(), mixture_lines=None)
  _refused(_config(strategy='replay', replay__run=silent), 'has no metrics.jsonl')
  empty = _run_folder(tmp_path / 'empty', _config(), mixture_lines=[])
  _refused(_config(strategy='replay', replay__run=empty), 'logs no mixture/<name> line')
  _refused(_config(strategy='replay', replay__run=str(tmp_path / 'nowhere')),
           'is not a run folder')
  _refused(_config(strategy='replay', replay__run=good, unit='token'),
           'logged p over examples, this run mixes tokens')
  _refused(_config(strategy='replay'), 'needs mixing.replay.run=DIR')


def test_doremi_reference_run(tmp_path):
  def ref(name, **kw):
    return _run_folder(tmp_path / name, kw.pop('config', _config(strategy='static')), **kw)

  finished = ref('finished', checkpoints=(5, 10))
  check.validate(_config(strategy='doremi', doremi__reference=finished))

  unfinished = ref('unfinished', checkpoints=(5,))
  _refused(_config(strategy='doremi', doremi__reference=unfinished),
           r'has not finished: no checkpoint of its last step 10 \(saved steps: \[5\]\)')
  other_data = ref('other_data', config=_config(names=('a', 'c')), checkpoints=(10,))
  _refused(_config(strategy='doremi', doremi__reference=other_data),
           r"trained on datasets \['a', 'c'\].*same data")
  bigger = _config()
  bigger.model.preset = 'qwen1.5-0.5b'
  other_model = ref('other_model', config=bigger, checkpoints=(10,))
  _refused(_config(strategy='doremi', doremi__reference=other_model),
           "trained another model \\(model.preset='qwen1.5-0.5b' there, 'tiny' here\\)")
  _refused(_config(strategy='doremi', doremi__reference=str(tmp_path / 'nowhere')),
           'is not a run folder')
  _refused(_config(strategy='doremi'), 'needs mixing.doremi.reference=DIR')
  _refused(_config(strategy='excess_theta0', doremi__reference=finished),
           "is only read by mixing.strategy=doremi, but the strategy is 'excess_theta0'")
  _refused(_config(strategy='mos', replay__run=finished),
           "mixing.replay.run=.* is only read by mixing.strategy=replay")
