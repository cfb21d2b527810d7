"""The training step and loop: loss arithmetic, accumulation, skipping, rewards, exact resume."""

import copy
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mos_jax.workdir import metrics as metrics_lib
from mos_jax import models
from mos_jax.steps import sft
from mos_jax.steps import state as state_lib
from mos_jax import training
from mos_jax.models.build import build_model
from mos_jax.training import loop
from demo_run import REPO, demo_config, train_crashing

def _tiny_model(vocab=64):
  cfg = models.get_preset('tiny', vocab_size=vocab)
  return models.Decoder(cfg, rngs=nnx.Rngs(0))


def _random_batch(rng, rows, length, vocab, num_datasets=2):
  tokens = rng.integers(0, vocab, (rows, length)).astype(np.int32)
  lengths = rng.integers(length // 2, length + 1, rows)
  segment_ids = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  loss_mask = (segment_ids * (rng.random((rows, length)) < 0.6)).astype(np.float32)
  loss_mask[:, 0] = 1.0
  return {
      'tokens': tokens,
      'targets': np.roll(tokens, -1, axis=1),
      'loss_mask': loss_mask,
      'positions': np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy(),
      'segment_ids': segment_ids,
      'dataset_ids': (np.arange(rows) % num_datasets).astype(np.int32),
      'example_ids': np.arange(rows, dtype=np.int32),
  }


def _state(model, optimizer):
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(params)
  zero = jnp.zeros((), jnp.int32)
  return graphdef, state_lib.TrainState(step=zero, params=params, opt_state=optimizer.init(params),
                                    mixing=(), bad_steps=zero, skipped_steps=zero)


def _numpy_masked_loss(logits, batch):
  logits = np.asarray(logits, np.float64)
  logits = logits - logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  rows, length = batch['targets'].shape
  nll = -logp[np.arange(rows)[:, None], np.arange(length)[None], batch['targets']]
  return (nll * batch['loss_mask']).sum() / batch['loss_mask'].sum()


def test_train_step_loss_and_accumulation():
  import ml_collections
  tc = ml_collections.ConfigDict(dict(steps=10, lr=1e-3, warmup_fraction=0.1, grad_clip=1.0,
                                      b1=0.9, b2=0.999, weight_decay=0.0))
  optimizer = state_lib.make_optimizer(tc)
  model = _tiny_model()
  batch = _random_batch(np.random.default_rng(0), 8, 12, 64)
  logits = model(batch['tokens'], positions=batch['positions'],
                 segment_ids=batch['segment_ids']).logits
  expected = _numpy_masked_loss(logits, batch)

  results = []
  for micro in (1, 4):
    graphdef, state = _state(model, optimizer)
    fn = jax.jit(lambda s, b, m=micro: sft.train_step(
        s, b, graphdef=graphdef, optimizer=optimizer, num_datasets=2, micro_batches=m))
    state, metrics = fn(state, batch)
    state, _ = fn(state, batch)  # The second step uses a non-zero learning rate.
    results.append((metrics, state))
    np.testing.assert_allclose(float(metrics['loss']), expected, rtol=1e-5)
    # Per-dataset sums add up to the whole.
    np.testing.assert_allclose(float(metrics['dataset_tokens'].sum()), batch['loss_mask'].sum())
  # The gradient itself (not only Adam's sign-like step) matches.
  np.testing.assert_allclose(float(results[0][0]['grad_norm']), float(results[1][0]['grad_norm']),
                             rtol=1e-5)
  leaves = [jax.tree.leaves(s.params) for _, s in results]
  for a, b in zip(*leaves):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)  # Adam amplifies rounding.


def test_non_finite_update_is_skipped():
  import ml_collections
  tc = ml_collections.ConfigDict(dict(steps=10, lr=1e-3, warmup_fraction=0.0, grad_clip=1.0,
                                      b1=0.9, b2=0.999, weight_decay=0.0))
  optimizer = state_lib.make_optimizer(tc)
  graphdef, state = _state(_tiny_model(), optimizer)
  params = state.params
  first = jax.tree_util.tree_leaves_with_path(params)[0][0]
  poisoned = jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.full_like(x, jnp.nan) if p == first else x, params)
  state = state.replace(params=poisoned)
  batch = _random_batch(np.random.default_rng(1), 4, 8, 64)
  new, metrics = jax.jit(lambda s, b: sft.train_step(
      s, b, graphdef=graphdef, optimizer=optimizer, num_datasets=2))(state, batch)
  assert not bool(metrics['finite'])
  assert int(new.bad_steps) == 1 and int(new.skipped_steps) == 1 and int(new.step) == 1
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(poisoned)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _metric_lines(workdir):
  rows = metrics_lib.read_metrics(os.path.join(workdir, 'metrics.jsonl'))
  return [{k: v for k, v in r.items() if not k.startswith('perf/')} for r in rows]


def _resume_config(tmp_path):
  return demo_config(tmp_path, train__steps=8, train__checkpoint_every=4, train__log_every=2,
                     train__eval_every=4, train__eval_batches=1,
                     train__async_checkpoints=True)  # Saves overlap the donated next sft.


@pytest.mark.parametrize('saved_by', [1, 2], ids=['same-processes', 'other-process-count'])
def test_resume_gives_identical_metrics_and_params(tmp_path, saved_by):
  """saved_by=2: the checkpoint's loader files are those of a 2-process run (every process saves
  the same global position), as after resizing a slice; one process resumes from them."""
  config = _resume_config(tmp_path)
  # Scorer updates at every step: the checkpoint at step 4 follows one (and the prefetcher's hold).
  config.mixing.update_every = 1
  straight = str(tmp_path / 'straight')
  run = training.build(config, straight)
  training.train(run)
  final_straight = jax.tree.leaves(jax.device_get(run.state))

  resumed = str(tmp_path / 'resumed')
  run = training.build(copy.deepcopy(config), resumed)
  train_crashing(run, 5)  # Dies in step 6, after the checkpoint at step 4.
  if saved_by == 2:
    data = os.path.join(resumed, 'checkpoints', '4', 'data')
    state = open(os.path.join(data, 'process_0-of-1.json')).read()
    os.remove(os.path.join(data, 'process_0-of-1.json'))
    for p in range(2):
      with open(os.path.join(data, f'process_{p}-of-2.json'), 'w') as f:
        f.write(state)
  run = training.build(copy.deepcopy(config), resumed)
  assert run.start_step == 4
  training.train(run)
  final_resumed = jax.tree.leaves(jax.device_get(run.state))

  assert _metric_lines(straight) == _metric_lines(resumed)
  assert any('reward/' in k for line in _metric_lines(resumed) for k in line)
  for a, b in zip(final_straight, final_resumed):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_diff_reward_is_one_at_start_cache_matches_device(tmp_path):
  rewards = {}
  for reference in ('device', 'cache'):
    config = demo_config(tmp_path, train__steps=3, train__eval_batches=1)
    config.mixing.diff_reference = reference
    config.mixing.ema = False
    config.mixing.update_every = 1000  # One scorer update, after step 1 (Algorithm 1, t = 0).
    run = training.build(config, str(tmp_path / reference))
    initial_mixing = run.state.mixing
    with jax.set_mesh(run.mesh):
      loop.update_mixture(run)
    at_start = np.asarray(jax.device_get(run.state.mixing.last_reward))
    run.state = run.state.replace(mixing=initial_mixing)  # Both runs then train alike.
    training.train(run)
    assert int(run.state.mixing.updates) == 1
    rewards[reference] = np.asarray(jax.device_get(run.state.mixing.last_reward))
    if reference == 'device':
      np.testing.assert_array_equal(at_start, np.ones_like(at_start))
    else:
      np.testing.assert_allclose(at_start, 1.0, rtol=1e-5)
  # One step lowered the skills' perplexity on the whole (not each: one skill's batch can hurt
  # another, depending on the random init).
  assert rewards['device'].mean() < 0.98 and np.all(np.abs(rewards['device'] - 1) > 1e-3)
  np.testing.assert_allclose(rewards['cache'], rewards['device'], rtol=1e-5)
  assert os.listdir(tmp_path / 'cache' / 'reference_nll')


def test_static_strategy_keeps_prior_and_computes_no_rewards(tmp_path):
  config = demo_config(tmp_path, train__steps=4, train__log_every=2, train__eval_every=0)
  config.mixing.strategy = 'static'
  config.mixing.prior_temperature = 1.0
  workdir = str(tmp_path / 'static')
  run = training.build(config, workdir)
  training.train(run)
  lines = _metric_lines(workdir)
  sizes = np.asarray(run.data.sizes, np.float64)
  for name, size in zip(run.data.names, sizes):
    assert lines[-1][f'mixture/{name}'] == pytest.approx(size / sizes.sum(), rel=1e-5)
  assert not any(k.startswith('reward/') for line in lines for k in line)

  # Resuming onto different data is refused, and the checkpoint stays.
  config.data.max_len = 96
  with pytest.raises(ValueError, match='changed since the checkpoint'):
    training.build(config, workdir)
  assert os.listdir(os.path.join(workdir, 'checkpoints'))


def test_demo_loss_falls_over_50_steps(tmp_path):
  config = demo_config(tmp_path, train__steps=50, train__log_every=10, train__eval_every=0,
                       train__checkpoint_every=0, train__eval_batches=1)
  workdir = str(tmp_path / 'fifty')
  run = training.build(config, workdir)
  summary = training.train(run)
  losses = [r['train/loss'] for r in _metric_lines(workdir) if 'train/loss' in r]
  assert losses[-1] < 0.8 * losses[0], losses
  for name, d in summary['datasets'].items():
    assert d['dev_loss_after'] < d['dev_loss_before'], name


def test_too_many_non_finite_updates_stop_the_run(tmp_path):
  config = demo_config(tmp_path, train__steps=30, train__lr=1e30, train__max_bad_steps=3,
                       train__warmup_fraction=0.0, train__checkpoint_every=0)
  config.mixing.strategy = 'static'
  with pytest.raises(training.TrainingError, match='non-finite'):
    training.train(training.build(config, str(tmp_path / 'bad')))

  # Below the limit, skipped steps are counted and left out of the logged loss.
  config.train.steps, config.train.max_bad_steps, config.train.log_every = 4, 100, 2
  workdir = str(tmp_path / 'bad_but_going')
  training.train(training.build(config, workdir))
  lines = [r for r in _metric_lines(workdir) if 'train/loss' in r]
  assert np.isfinite(lines[0]['train/loss'])  # Step 1 is finite, step 2 blows up.
  assert np.isnan(lines[1]['train/loss']) and lines[1]['train/skipped_steps'] == 3


def test_train_command_end_to_end(tmp_path):
  """The README's main job, shrunk: files of the run folder contract, then a resume."""
  data_dir = tmp_path / 'demo_data'
  workdir = tmp_path / 'run'
  # Run from another folder with a relative workdir, as users do.
  base = [sys.executable, '-m', 'mos_jax.train', '--config', f'{REPO}/configs/demo.py',
          '--workdir', 'run', f'--config.data.demo_dir={data_dir}',
          f'--config.data.tokenizer={data_dir}/tokenizer', '--config.train.log_every=2',
          '--config.train.eval_every=2', '--config.train.eval_batches=1',
          '--config.mixing.update_every=2', '--config.train.checkpoint_every=2']
  from mos_jax.data import demo_skills
  paths = [f'--config.data.datasets.{n}.path={e.path}'
           for n, e in demo_skills.config_entries(str(data_dir)).items()]
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': REPO}
  done = subprocess.run(base + paths + ['--config.train.steps=4'], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'dev loss before -> after' in done.stdout
  for name in ('metrics.jsonl', 'config.json', 'mixture.png', 'loss.png'):
    assert (workdir / name).stat().st_size > 0, name
  assert os.listdir(workdir / 'tb') and os.listdir(workdir / 'checkpoints')
  json.loads((workdir / 'config.json').read_text())
  lines = metrics_lib.read_metrics(str(workdir / 'metrics.jsonl'))
  names = list(demo_skills.config_entries(str(data_dir)))
  assert all(f'mixture/{n}' in lines[-1] for n in names)
  assert any(f'reward/{names[0]}' in line for line in lines)
  assert any(f'eval/{names[0]}/loss' in line for line in lines)

  again = subprocess.run(base + paths + ['--config.train.steps=4'], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'Resumed' in again.stderr + again.stdout

  wrong = subprocess.run(base + paths + ['--config.train.lrr=1'], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
  assert wrong.returncode != 0 and 'train.lrr' in wrong.stderr + wrong.stdout

  # Export: transformers (PyTorch) loads the folder and computes the logits of the checkpoint.
  from mos_jax.infra import cli
  from mos_jax.inference import export
  overrides = [a for a in base + paths if a.startswith('--config.')] + ['--config.train.steps=4']
  config = cli.load_config(f'{REPO}/configs/demo.py', overrides)
  out = tmp_path / 'hf'
  metrics_before = (workdir / 'metrics.jsonl').read_text()
  assert export.export(config, str(workdir), str(out)) == 4
  assert (workdir / 'metrics.jsonl').read_text() == metrics_before  # Export only reads.
  run = training.build(config, str(workdir))
  batch = next(iter(run.data.dev_batches(names[0])))
  ours = nnx.merge(run.graphdef, run.state.params)(
      batch['tokens'], positions=batch['positions'], segment_ids=batch['segment_ids']).logits
  import torch
  import transformers
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
  with torch.no_grad():
    theirs = hf(torch.tensor(batch['tokens'], dtype=torch.long),
                attention_mask=torch.tensor(batch['segment_ids'] == 1, dtype=torch.long),
                position_ids=torch.tensor(batch['positions'], dtype=torch.long)).logits.numpy()
  real = batch['segment_ids'] == 1  # Each row's first sequence (the demo packs dev rows).
  np.testing.assert_allclose(np.asarray(ours)[real], theirs[real], atol=1e-4)
  assert transformers.AutoTokenizer.from_pretrained(str(out)).chat_template


@pytest.mark.parametrize('strategy,reward', [('mos', 'cossim'), ('mospec', 'diff')])
def test_other_rewards_run_end_to_end(tmp_path, strategy, reward):
  config = demo_config(tmp_path, train__steps=2, train__log_every=1, train__eval_every=0,
                       train__checkpoint_every=0, train__eval_batches=1)
  config.mixing.strategy, config.mixing.reward = strategy, reward
  config.mixing.update_every, config.mixing.ema = 1, False
  if strategy == 'mospec':
    config.mixing.target = 'math'
  workdir = str(tmp_path / f'{strategy}-{reward}')
  run = training.build(config, workdir)
  training.train(run)
  last = [r for r in _metric_lines(workdir) if 'reward/math' in r][-1]
  raw = np.array([last[f'reward_raw/{n}'] for n in run.data.names])
  if reward == 'cossim':  # Mean cosine of mean-pooled hidden states, itself included.
    assert np.all(raw <= 1.0 + 1e-6) and np.all(raw > 0)
  else:  # One DIFF ratio per dataset, the target's doubled.
    assert last['reward_raw/math'] > 1.5 * np.median(raw)
  # Started uniform; COSSIM rewards are all close to 1, so p moves only a little (p ~ R).
  moved = [abs(last[f'mixture/{n}'] - 0.25) for n in run.data.names]
  assert max(moved) > 1e-5, moved


@pytest.mark.parametrize('strategy', ['mos', 'multiuat'])
def test_buckets_with_reward_and_dev_batches(tmp_path, strategy):
  """Unpacked rows cropped to buckets: the reward step stacks every dataset's batch (train
  reward batches, or dev windows for MultiUAT), which must all have one width."""
  config = demo_config(tmp_path, train__steps=2, train__log_every=1, train__eval_every=0,
                       train__checkpoint_every=0, train__eval_batches=1)
  config.data.packing, config.data.buckets = False, (32, 64, 96)
  config.mixing.strategy, config.mixing.update_every = strategy, 1
  config.mixing.diff_reference = 'cache'
  workdir = str(tmp_path / strategy)
  run = training.build(config, workdir)
  training.train(run)
  last = [r for r in _metric_lines(workdir) if 'reward/math' in r][-1]
  assert all(np.isfinite(last[f'reward_raw/{n}']) for n in run.data.names)


def test_model_vocab_size_sizes_a_presets_embedding_table(tmp_path):
  """model.vocab_size pads a preset's table past the tokenizer (as released checkpoints are
  padded); fewer rows than tokens, or the key with a checkpoint, is refused by name."""
  from mos_jax.config import check as config_check
  from mos_jax.data import build_data
  config = demo_config(tmp_path)
  tokens = len(build_data(config).tokenizer)  # The demo tokenizer: 512.
  config.model.vocab_size = 1000
  model = build_model(config, None, tokens)
  assert model.embed[...].shape[0] == model.config.vocab_size == 1000
  config.model.vocab_size = tokens - 1
  with pytest.raises(ValueError, match='model.vocab_size'):
    build_model(config, None, tokens)
  config.model.vocab_size, config.model.hf_checkpoint = 1000, str(tmp_path)
  with pytest.raises(ValueError, match='model.vocab_size=1000.*sizes a preset only'):
    config_check.validate(config)
