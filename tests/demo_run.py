"""The shipped demo recipe, shrunk for tests."""

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def demo_config(tmp_path, **train):
  """The shipped demo recipe, shrunk to a few steps and pointed at a per-test data folder."""
  from mos_jax.infra import cli
  config = cli.load_config(os.path.join(REPO, 'configs', 'demo.py'))
  data_dir = str(tmp_path / 'demo_data')
  from mos_jax.data import demo_skills
  config.data.demo_dir = data_dir
  config.data.tokenizer = os.path.join(data_dir, 'tokenizer')
  for name, entry in demo_skills.config_entries(data_dir).items():
    config.data.datasets[name].path = entry.path
  config.train.progress_bar = False
  config.train.async_checkpoints = False
  for key, value in train.items():
    section, field = key.split('__')
    config[section][field] = value
  return config


def set_mixing(config, **mixing):
  """config.mixing.<key> = value; `section__field` sets config.mixing.<section>.<field>."""
  for key, value in mixing.items():
    section, _, field = key.partition('__')
    if field:
      config.mixing[section][field] = value
    else:
      config.mixing[key] = value
  return config


class Crash(Exception):
  """Raised by `train_crashing`'s loader: a run dying mid-way."""


def train_crashing(run, after_batches: int):
  """Trains `run` with a loader that dies when asked for batch `after_batches + 1` (counting
  from the run's start), as a crash would; the loader is put back afterwards."""
  import pytest
  from mos_jax import training
  loader = type(run.data.train)
  real_next = loader.__next__
  calls = {'n': 0}

  def crashing_next(self):
    calls['n'] += 1
    if calls['n'] > after_batches:
      raise Crash()
    return real_next(self)

  loader.__next__ = crashing_next
  try:
    with pytest.raises(Crash):
      training.train(run)
  finally:
    loader.__next__ = real_next


def resume_after_crash(config, workdir: str, after_batches: int, start_step: int) -> list:
  """Trains `config` in `workdir` until it crashes (train_crashing), builds it again — it must
  resume at `start_step` — and trains to the end; returns the final state's leaves (host)."""
  import copy
  import jax
  from mos_jax import training
  train_crashing(training.build(copy.deepcopy(config), workdir), after_batches)
  run = training.build(copy.deepcopy(config), workdir)
  assert run.start_step == start_step
  training.train(run)
  return jax.tree.leaves(jax.device_get(run.state))
