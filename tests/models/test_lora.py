"""LoRA / QLoRA through qwix: adapter counts, zero-init parity, PEFT and transformers parity,
quantized-base tolerance, and the trainer (frozen base, exact resume, DIFF 'base')."""

import copy
import json
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from mos_jax import models
from mos_jax.steps import sft
from mos_jax.steps import state as state_lib
from mos_jax import training
from mos_jax.workdir import metrics as metrics_lib
from mos_jax.infra import distributed
from mos_jax.steps import reward as reward_lib
from mos_jax.steps import reference_cache
from mos_jax.models import lora
from demo_run import demo_config, resume_after_crash, train_crashing
from test_families import HF_CONFIGS as NEW_FAMILY_CONFIGS

VOCAB = 96
HF_CONFIGS = {  # One tiny model per family (GQA untied Llama, biased tied Qwen2, MQA GeGLU Gemma).
    'llama': lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False),
    'qwen2': lambda: transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    'gemma': lambda: transformers.GemmaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16),
    **NEW_FAMILY_CONFIGS,  # Qwen3, Gemma 2, Gemma 3 text, Mistral (windows, soft-caps).
}


def _lora_config(rank=4, alpha=8.0, targets='.*_proj', dropout=0.0):
  c = ml_collections.ConfigDict()
  c.rank, c.alpha, c.targets, c.dropout = rank, alpha, targets, dropout
  return c


def _tiny(vocab=64, scan_layers=False):
  return models.init_model(models.get_preset('tiny', vocab_size=vocab, scan_layers=scan_layers),
                           seed=0)


def _logits(model, tokens):
  return np.asarray(model(jnp.asarray(tokens)).logits)


def test_trainable_count_is_the_hand_count():
  model = _tiny()
  c = model.config
  for rank, targets, per_layer in [
      # q, k, v, o: A [in, r] and B [r, out] each; gate, up, down likewise.
      (4, '.*_proj', lambda r, d, n, k, h, f: (
          (d * r + r * n * h) + 2 * (d * r + r * k * h) + (n * h * r + r * d)
          + 2 * (d * r + r * f) + (f * r + r * d))),
      (2, '.*/attn/.*', lambda r, d, n, k, h, f: (
          (d * r + r * n * h) + 2 * (d * r + r * k * h) + (n * h * r + r * d))),
  ]:
    adapted = lora.add_adapters(model, _lora_config(rank, targets=targets))
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(adapted, nnx.LoRAParam)))
    hand = c.num_layers * per_layer(rank, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
                                    c.intermediate_size)
    assert count == hand, (rank, targets)
  # The base parameters are untouched: same count as the plain model.
  base = sum(math.prod(x.shape) for x in jax.tree.leaves(
      nnx.state(adapted, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))))
  assert base == models.param_count(c)
  # Scanned layers get the same adapters, stacked on [Y].
  stacked = lora.add_adapters(_tiny(scan_layers=True), _lora_config(2, targets='.*/attn/.*'))
  assert sum(math.prod(x.shape) for x in jax.tree.leaves(
      nnx.state(stacked, nnx.LoRAParam))) == count


@pytest.mark.parametrize('scan_layers', [False, True])
def test_zero_init_lora_gives_the_base_logits_exactly(scan_layers):
  model = _tiny(scan_layers=scan_layers)
  tokens = np.random.default_rng(0).integers(0, 64, (2, 12))
  adapted = lora.add_adapters(model, _lora_config())
  np.testing.assert_array_equal(_logits(adapted, tokens), _logits(model, tokens))
  # And the adapters are live: a non-zero B changes the logits.
  a = adapted.layers.attn if scan_layers else adapted.layers[0].attn
  a.q_proj_lora_b[...] = jnp.ones_like(a.q_proj_lora_b[...])
  assert np.abs(_logits(adapted, tokens) - _logits(model, tokens)).max() > 1e-3


def _torch_base(family, folder):
  """A seeded random HF model of `family` (eval mode), saved to `folder`."""
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(
      HF_CONFIGS[family](), dtype=torch.float32, attn_implementation='eager').eval()
  model.save_pretrained(folder)
  return model


def _random_adapters(model, seed):
  """Every B random (A is already random): an adapter that changes the model visibly."""
  rng = np.random.default_rng(seed)
  for _, name, module in lora.adapter_pairs(model):
    b = getattr(module, name + '_lora_b')
    b[...] = jnp.asarray(0.3 * rng.standard_normal(b[...].shape), b[...].dtype)


@pytest.mark.parametrize('family,scan_layers', [
    ('llama', False), ('qwen2', False), ('gemma', False), ('llama', True), ('qwen3', False),
    ('gemma2', False), ('gemma3_text', True), ('mistral', False)])
def test_peft_and_merged_exports_match_our_adapted_model(family, scan_layers, tmp_path):
  import peft
  base_dir = tmp_path / 'base'
  base_torch = _torch_base(family, base_dir)
  ours = lora.add_adapters(models.load_hf(base_dir, scan_layers=scan_layers), _lora_config(4, 8.0),
                           seed=1)
  _random_adapters(ours, 2)
  tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 10))
  want = _logits(ours, tokens)

  lora.save_peft(ours, _lora_config(4, 8.0), str(tmp_path / 'adapter'))
  saved = json.loads((tmp_path / 'adapter' / 'adapter_config.json').read_text())
  assert saved['target_modules'] == sorted(lora.HF_MODULES)
  with torch.no_grad():
    peft_model = peft.PeftModel.from_pretrained(base_torch, tmp_path / 'adapter').eval()
    got = peft_model(torch.as_tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=2e-4)
  assert np.abs(want - _logits(models.load_hf(base_dir), tokens)).max() > 1e-2  # Adapters matter.

  models.save_hf(lora.merged_model(ours, _lora_config(4, 8.0)), tmp_path / 'merged')
  merged = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / 'merged', dtype=torch.float32, attn_implementation='eager').eval()
  with torch.no_grad():
    got = merged(torch.as_tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=2e-4)


def _lora_run_config(tmp_path, **train):
  config = demo_config(tmp_path, **train)  # Scanned layers (the default).
  config.model.lora.rank = 4
  config.mixing.diff_reference = 'base'
  return config


def test_lora_run_resumes_exactly_trains_adapters_only_and_exports(tmp_path):
  config = _lora_run_config(tmp_path, train__steps=8, train__checkpoint_every=4,
                            train__log_every=2, train__eval_every=4, train__eval_batches=1)
  config.mixing.update_every = 2
  straight = str(tmp_path / 'straight')
  run = training.build(config, straight)
  base_before = jax.device_get(run.frozen)
  adapters_before = jax.device_get(run.state.params)
  training.train(run)
  final_straight = jax.tree.leaves(jax.device_get(run.state))
  # The frozen base is bit-identical after training; every B moved off zero; AdamW holds
  # moments for the adapters only.
  for a, b in zip(jax.tree.leaves(base_before), jax.tree.leaves(jax.device_get(run.frozen))):
    np.testing.assert_array_equal(a, b)
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), adapters_before,
                       jax.device_get(run.state.params))
  assert min(jax.tree.leaves(moved)) > 0
  adapter_count = sum(x.size for x in jax.tree.leaves(adapters_before))
  moments = [x for x in jax.tree.leaves(run.state.opt_state) if x.ndim > 0]
  assert sum(x.size for x in moments) == 2 * adapter_count

  resumed = str(tmp_path / 'resumed')
  run = training.build(copy.deepcopy(config), resumed)
  train_crashing(run, 5)  # Dies in step 6, after the checkpoint at step 4.
  run = training.build(copy.deepcopy(config), resumed)
  assert run.start_step == 4
  training.train(run)
  for a, b in zip(final_straight, jax.tree.leaves(jax.device_get(run.state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  lines = lambda d: [{k: v for k, v in r.items() if not k.startswith('perf/')}
                     for r in metrics_lib.read_metrics(d + '/metrics.jsonl')]
  assert lines(straight) == lines(resumed)
  assert any('reward/' in k for line in lines(resumed) for k in line)

  # Another base under the same workdir is refused.
  other = copy.deepcopy(config)
  other.model.dtype = 'bfloat16'
  with pytest.raises(ValueError, match='another base model'):
    training.build(other, resumed)

  # Export: the PEFT tensors are the checkpoint's adapters in [out, in] layout.
  from mos_jax.inference import export
  export.export(copy.deepcopy(config), resumed, str(tmp_path / 'adapter'), adapters_only=True)
  import safetensors.numpy
  tensors = safetensors.numpy.load_file(tmp_path / 'adapter' / 'adapter_model.safetensors')
  a = np.asarray(jax.device_get(run.state.params['layers']['attn']['q_proj_lora_a']))[1]
  np.testing.assert_array_equal(
      tensors['base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight'], a.T)
  assert len(tensors) == 2 * 7 * models.get_preset('tiny').num_layers


def test_diff_base_reference_equals_device_and_cache_at_step_0(tmp_path):
  nll0 = {}
  for reference in ('base', 'device', 'cache'):
    config = _lora_run_config(tmp_path, train__steps=2, train__eval_batches=1)
    config.mixing.diff_reference = reference
    run = training.build(config, str(tmp_path / reference))
    batch = reward_lib.stack_reward_batches(run.data.train.reward_batches(), run.data.names)
    if run.reference_tables is not None:
      batch['nll0'] = reference_cache.lookup(run.reference_tables, run.data.names, batch)
    with jax.set_mesh(run.mesh):
      out = jax.device_get(run.reward_fn(run.state.params, {
          'train': distributed.host_local_to_global(batch, run.mesh)}))
    nll0[reference] = np.asarray(out['nll0'])
    if reference == 'base':  # At step 0 the adapters are zero: theta == theta_0 exactly.
      np.testing.assert_array_equal(out['nll'], out['nll0'])
    run.data.close()
    run.checkpointer.close()
  np.testing.assert_array_equal(nll0['base'], nll0['device'])
  np.testing.assert_allclose(nll0['base'], nll0['cache'], rtol=1e-5)


# Relative logit error ||q - ref|| / ||ref|| of a QLoRA base (zero adapters) against the
# unquantized one, on the random tiny model (Gaussian weights, the hard case for 4 bits).
QLORA_TOLERANCE = {'int8': 0.02, 'int4': 0.3, 'nf4': 0.3}


@pytest.fixture(scope='module')
def qlora_base(tmp_path_factory):
  torch.manual_seed(0)
  folder = tmp_path_factory.mktemp('qlora_base')
  transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=32), dtype=torch.float32
  ).save_pretrained(folder)
  return folder


@pytest.mark.parametrize('quantize', tuple(QLORA_TOLERANCE))
def test_qlora_forward_within_tolerance_and_trains_adapters(quantize, qlora_base):
  model = models.load_hf(qlora_base, scan_layers=False)
  tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 12))
  ref = _logits(model, tokens)
  adapted = lora.add_adapters(model, _lora_config(), quantize)
  got = _logits(adapted, tokens)
  err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
  assert 0 < err < QLORA_TOLERANCE[quantize], err
  # Scanned layers quantize each layer the same way (stacked): the same logits.
  scanned = lora.add_adapters(models.load_hf(qlora_base, scan_layers=True), _lora_config(),
                              quantize)
  np.testing.assert_allclose(_logits(scanned, tokens), got, atol=1e-5, rtol=1e-5)
  # The frozen weights are qwix quantized arrays of the requested type; adapters stay fp32.
  graphdef, params, frozen = nnx.split(adapted, nnx.LoRAParam, ...)
  qvalue = nnx.to_pure_dict(frozen)['layers'][0]['mlp']['up_proj']['array']['qvalue']
  assert qvalue.shape == (128, 256)
  assert str(qvalue.dtype) == {'int8': 'int8', 'int4': 'int4', 'nf4': 'uint4'}[quantize]
  # Gradients reach every adapter through the quantized base (B starts at zero, so A's gradient
  # is zero at step 0: only B is checked).
  params, frozen = nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)
  loss = lambda p: state_lib.merge(graphdef, p, frozen)(jnp.asarray(tokens)).logits.std()
  grads = jax.jit(jax.grad(loss))(params)
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    if 'lora_b' in jax.tree_util.keystr(path):
      assert float(jnp.abs(g).max()) > 0, path


SHARDED_SCRIPT = '''
import json, sys
import jax
from ml_collections import config_dict
from mos_jax import training
assert jax.device_count() == 8
config = config_dict.ConfigDict(json.loads(sys.argv[1]))
config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 4, 2
run = training.build(config, sys.argv[2])
big = [x for x in jax.tree.leaves(run.frozen) if x.size >= 64 * 64]
assert big and all(not x.sharding.is_fully_replicated for x in big)
training.train(run)
'''


@pytest.mark.slow
def test_sharded_qlora_matches_one_device(tmp_path):
  import os
  import subprocess
  import sys
  from demo_run import REPO
  config = _lora_run_config(tmp_path, train__steps=3, train__log_every=1, train__eval_every=0,
                            train__eval_batches=1)
  config.model.quantize = 'nf4'
  config.model.lora.dropout = 0.1  # The masks of sharded activations are the one-device masks.
  config.mixing.update_every = 1
  training.train(training.build(copy.deepcopy(config), str(tmp_path / 'one')))
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8',
         'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': REPO}
  done = subprocess.run([sys.executable, '-c', SHARDED_SCRIPT, config.to_json(),
                         str(tmp_path / 'mesh')], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-4000:]
  read = lambda d: [{k: v for k, v in r.items() if not k.startswith('perf/')}
                    for r in metrics_lib.read_metrics(str(tmp_path / d / 'metrics.jsonl'))]
  one, mesh = read('one'), read('mesh')
  assert [r['step'] for r in one] == [r['step'] for r in mesh]
  assert any(k.startswith('reward/') for k in one[-1])
  for a, b in zip(one, mesh):
    for key in a:
      np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_lora_runs_mospec_cossim_and_static(tmp_path):
  """The other strategy paths (pooled embeddings for COSSIM, no scorer for static) with adapters."""
  for strategy, reward in (('mospec', 'cossim'), ('static', 'diff')):
    config = _lora_run_config(tmp_path, train__steps=2, train__log_every=1, train__eval_every=0,
                              train__eval_batches=1)
    config.mixing.strategy, config.mixing.reward, config.mixing.target = strategy, reward, 'math'
    config.mixing.update_every = 1
    run = training.build(config, str(tmp_path / strategy))
    before = jax.device_get(run.state.params)
    summary = training.train(run)
    assert summary
    lines = metrics_lib.read_metrics(str(tmp_path / strategy / 'metrics.jsonl'))
    assert any(k.startswith('reward/') for k in lines[-1]) == (strategy == 'mospec')
    assert all(np.isfinite(line['train/loss']) for line in lines if 'train/loss' in line)
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), before,
                         jax.device_get(run.state.params))
    assert max(jax.tree.leaves(moved)) > 0


@pytest.mark.parametrize('scan_layers,remat', [(False, 'none'), (True, 'full')])
def test_lora_dropout_drops_the_adapter_input_at_rate_p(scan_layers, remat, monkeypatch):
  """Every adapted einsum (7 per layer) draws its own mask at rate p from the step's key (scanned
  layers too, under remat with gradients); kept inputs are scaled by 1 / (1 - p); without a key
  nothing is dropped (the trainer test below checks eval against a dropout-free run)."""
  p = 0.3
  masks = []
  real_call = nnx.Dropout.__call__

  def recording_call(self, x, *args, **kwargs):  # Records (input != 0, output) of each mask.
    out = real_call(self, x, *args, **kwargs)
    jax.debug.callback(lambda a, b, r=self.rate: masks.append((np.asarray(a), np.asarray(b), r)),
                       x, out)
    return out

  monkeypatch.setattr(nnx.Dropout, '__call__', recording_call)
  model = models.init_model(models.get_preset('tiny', vocab_size=64, scan_layers=scan_layers,
                                              remat=remat), seed=0)
  adapted = lora.add_adapters(model, _lora_config(dropout=p))
  _random_adapters(adapted, 3)
  graphdef, params, frozen = nnx.split(adapted, nnx.LoRAParam, ...)
  params, frozen = nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)
  tokens = np.random.default_rng(0).integers(1, 64, (4, 32))
  batch = {'tokens': jnp.asarray(tokens), 'targets': jnp.asarray(np.roll(tokens, -1, 1)),
           'positions': jnp.broadcast_to(jnp.arange(32), (4, 32)),
           'segment_ids': jnp.ones((4, 32), jnp.int32), 'loss_mask': jnp.ones((4, 32))}
  nll = jax.jit(lambda p_, key: sft.forward_nll(graphdef, p_, batch, frozen, key)[0].sum())

  deterministic = float(nll(params, None))
  assert masks == []  # No key: qwix's dropout is never called.
  key = sft.dropout_key(0, 5)
  dropped = float(nll(params, key))
  if remat != 'none':  # Through the scan and remat's recomputation, as in training.
    jax.grad(nll)(params, key)
  jax.effects_barrier()
  assert dropped != deterministic
  forward = masks[:model.config.num_layers * 7]
  assert len(forward) == model.config.num_layers * 7
  rates = []
  for x, out, rate in forward:
    assert rate == p
    kept = out != 0
    np.testing.assert_allclose(out[kept], x[kept] / (1 - p), rtol=1e-6)
    rates.append(1 - kept[x != 0].mean())
  assert abs(np.mean(rates) - p) < 0.02, rates  # ~50K inputs per mask: p to about 0.005.
  assert all(abs(r - p) < 0.06 for r in rates), rates
  # Different layers and projections draw different masks; the same key draws the same ones.
  patterns = {(m[1] != 0).tobytes() for m in forward}
  assert len(patterns) == len(forward)
  # The gradient's forward (and remat's recomputation) draws the very same masks.
  assert {(m[1] != 0).tobytes() for m in masks} == patterns
  masks.clear()
  assert float(nll(params, key)) == dropped
  assert float(nll(params, sft.dropout_key(0, 6))) != dropped


def test_lora_dropout_run_trains_differently_evaluates_deterministically_resumes_exactly(tmp_path):
  """dropout 0.5 vs 0 (micro-batches, scanned layers): the same losses while B = 0, different
  ones after; eval and reward outputs of one set of
  adapters are the same in both runs; a run killed in step 5 and resumed from step 3 ends equal
  to an uninterrupted one."""
  def config_for(dropout):
    config = _lora_run_config(tmp_path, train__steps=6, train__checkpoint_every=3,
                              train__log_every=1, train__eval_every=3, train__eval_batches=1,
                              train__micro_batches=2)
    config.mixing.update_every = 2
    config.model.lora.dropout = dropout
    return config

  runs, lines = {}, {}
  read = lambda d: [{k: v for k, v in r.items() if not k.startswith('perf/')}
                    for r in metrics_lib.read_metrics(d + '/metrics.jsonl')]
  for dropout in (0.0, 0.5):
    runs[dropout] = training.build(config_for(dropout), str(tmp_path / f'p{dropout}'))
    if not dropout:  # One batch from every dataset, for the reward and eval forwards below.
      batch = reward_lib.stack_reward_batches(runs[dropout].data.train.reward_batches(),
                                            runs[dropout].data.names)
    training.train(runs[dropout])
    lines[dropout] = [r for r in read(str(tmp_path / f'p{dropout}')) if 'train/loss' in r]
  assert lines[0.0][0]['train/loss'] == lines[0.5][0]['train/loss']
  # Warm-up starts at lr 0, so B is still 0 in step 2 as well: the dropped input meets a zero
  # adapter and the losses agree; from step 3 on the masks matter.
  assert [r['train/loss'] for r in lines[0.0][:2]] == [r['train/loss'] for r in lines[0.5][:2]]
  assert all(a['train/loss'] != b['train/loss'] for a, b in zip(lines[0.0][2:], lines[0.5][2:]))

  params = runs[0.5].state.params  # Trained with dropout: B is non-zero.
  plain, dropped = runs[0.0], runs[0.5]
  with jax.set_mesh(plain.mesh):
    batch = distributed.host_local_to_global(batch, plain.mesh)
    outs = [jax.device_get(r.reward_fn(params, {'train': batch})) for r in (plain, dropped)]
    evals = [jax.device_get(r.eval_fn(params, batch)) for r in (plain, dropped)]
  for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(evals[0], evals[1])
  assert np.abs(np.asarray(outs[0]['nll']) - np.asarray(outs[0]['nll0'])).max() > 0
  final_straight = jax.tree.leaves(jax.device_get(dropped.state))
  for run in runs.values():
    run.data.close()
    run.checkpointer.close()

  resumed = str(tmp_path / 'resumed')
  run = training.build(config_for(0.5), resumed)
  train_crashing(run, 4)  # Dies in step 5, after the checkpoint at step 3.
  run = training.build(config_for(0.5), resumed)
  assert run.start_step == 3
  training.train(run)
  for a, b in zip(final_straight, jax.tree.leaves(jax.device_get(run.state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert read(str(tmp_path / 'p0.5')) == read(resumed)


@pytest.mark.parametrize('scan_layers', [False, True])
def test_targets_select_single_projections_and_peft_loads_them(scan_layers, tmp_path):
  """targets='.*/(q|v)_proj' (PEFT's usual choice): adapters on q and v only, the hand count of
  trainable parameters, target_modules ['q_proj', 'v_proj'], and PEFT's logits equal ours."""
  import peft
  base_torch = _torch_base('llama', tmp_path / 'base')
  lc = _lora_config(4, 8.0, targets='.*/(q|v)_proj')
  ours = lora.add_adapters(models.load_hf(tmp_path / 'base', scan_layers=scan_layers), lc, seed=1)
  c = ours.config
  assert sorted({name for _, name, _ in lora.adapter_pairs(ours)}) == ['q_proj', 'v_proj']
  r, d, n, k, h = 4, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
  hand = c.num_layers * ((d * r + r * n * h) + (d * r + r * k * h))
  assert sum(x.size for x in jax.tree.leaves(nnx.state(ours, nnx.LoRAParam))) == hand
  _random_adapters(ours, 2)
  tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 10))
  want = _logits(ours, tokens)
  lora.save_peft(ours, lc, str(tmp_path / 'adapter'))
  saved = json.loads((tmp_path / 'adapter' / 'adapter_config.json').read_text())
  assert saved['target_modules'] == ['q_proj', 'v_proj']
  with torch.no_grad():
    peft_model = peft.PeftModel.from_pretrained(base_torch, tmp_path / 'adapter').eval()
    got = peft_model(torch.as_tensor(tokens)).logits.numpy()
    adapted = sorted(name for name, m in peft_model.named_modules() if hasattr(m, 'lora_A')
                     and len(m.lora_A))
  assert adapted == sorted(f'base_model.model.model.layers.{i}.self_attn.{p}'
                           for i in range(c.num_layers) for p in ('q_proj', 'v_proj'))
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=2e-4)
  models.save_hf(lora.merged_model(ours, lc), tmp_path / 'merged')
  merged = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / 'merged', dtype=torch.float32, attn_implementation='eager').eval()
  with torch.no_grad():
    np.testing.assert_allclose(merged(torch.as_tensor(tokens)).logits.numpy(), want, atol=2e-4,
                               rtol=2e-4)


def test_per_layer_targets_export_exact_modules_and_bad_targets_are_refused(tmp_path):
  """Unscanned layers may adapt one layer only: PEFT's target_modules then name the modules in
  full, and PEFT adapts exactly those. A regex matching nothing, or a subset of layers with
  scanned layers, is refused naming model.lora.targets."""
  import peft
  base_torch = _torch_base('qwen2', tmp_path / 'base')
  lc = _lora_config(2, 4.0, targets='layers/1/(attn/o_proj|mlp/.*)')
  ours = lora.add_adapters(models.load_hf(tmp_path / 'base', scan_layers=False), lc, seed=1)
  assert sorted((p, name) for p, name, _ in lora.adapter_pairs(ours)) == [
      (('layers', 1, 'attn'), 'o_proj'), (('layers', 1, 'mlp'), 'down_proj'),
      (('layers', 1, 'mlp'), 'gate_proj'), (('layers', 1, 'mlp'), 'up_proj')]
  _random_adapters(ours, 2)
  tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 10))
  lora.save_peft(ours, lc, str(tmp_path / 'adapter'))
  saved = json.loads((tmp_path / 'adapter' / 'adapter_config.json').read_text())
  assert saved['target_modules'] == ['model.layers.1.mlp.down_proj', 'model.layers.1.mlp.gate_proj',
                                     'model.layers.1.mlp.up_proj', 'model.layers.1.self_attn.o_proj']
  with torch.no_grad():
    peft_model = peft.PeftModel.from_pretrained(base_torch, tmp_path / 'adapter').eval()
    got = peft_model(torch.as_tensor(tokens)).logits.numpy()
    adapted = [name for name, m in peft_model.named_modules() if hasattr(m, 'lora_A')
               and len(m.lora_A)]
  assert len(adapted) == 4
  np.testing.assert_allclose(got, _logits(ours, tokens), atol=2e-4, rtol=2e-4)

  with pytest.raises(ValueError, match=r"model.lora.targets='.\*/qproj' matches no projection.*"
                                       r"layers/0/attn/q_proj"):
    lora.add_adapters(_tiny(), _lora_config(targets='.*/qproj'))
  with pytest.raises(ValueError, match='model.lora.targets.*scan_layers'):
    lora.add_adapters(_tiny(scan_layers=True), _lora_config(targets='layers/1/.*'))
  config = demo_config(tmp_path)
  config.model.lora.rank, config.model.lora.targets = 4, '(q_proj'
  with pytest.raises(ValueError, match='model.lora.targets'):
    lora.check_config(config)


def test_qlora_quantizes_every_projection_whatever_the_targets(qlora_base):
  """QLoRA with adapters on q and v only still stores the whole base quantized (k, o and the MLP
  too), scanned and unscanned alike: zero adapters give the all-targets model's logits."""
  tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 12))
  lc = _lora_config(targets='.*/(q|v)_proj')
  want = _logits(lora.add_adapters(models.load_hf(qlora_base, scan_layers=False), _lora_config(),
                                   'int8'), tokens)
  for scan_layers in (False, True):
    adapted = lora.add_adapters(models.load_hf(qlora_base, scan_layers=scan_layers), lc, 'int8')
    np.testing.assert_allclose(_logits(adapted, tokens), want, atol=1e-5, rtol=1e-5)
    frozen = nnx.to_pure_dict(nnx.split(adapted, nnx.LoRAParam, ...)[2])['layers']
    layer = frozen if scan_layers else frozen[0]
    for module, name in (('attn', 'k_proj'), ('attn', 'o_proj'), ('mlp', 'down_proj')):
      assert str(layer[module][name]['array']['qvalue'].dtype) == 'int8'
    assert sorted({name for _, name, _ in lora.adapter_pairs(adapted)}) == ['q_proj', 'v_proj']


def test_lora_run_generates_the_tokens_of_its_merged_export(tmp_path):
  """A trained LoRA run (dropout on in training, adapters on some projections only) generates,
  through qwix and the KV cache, the greedy tokens of its merged model and of transformers'
  generate on the exported merged folder; the adapters change what the base would say."""
  from mos_jax.inference import export
  from mos_jax.inference import sampler
  from mos_jax.inference import loaded as loaded_lib
  config = _lora_run_config(tmp_path, train__steps=6, train__checkpoint_every=6,
                            train__log_every=3, train__eval_every=0, train__eval_batches=1)
  config.train.lr = 0.05  # Adapters far enough from zero to change greedy tokens.
  config.model.lora.dropout = 0.1
  config.model.lora.targets = '.*/(q|v|o|down)_proj'
  workdir = str(tmp_path / 'run')
  training.train(training.build(copy.deepcopy(config), workdir))
  loaded = loaded_lib.load(copy.deepcopy(config), workdir)
  gen = loaded_lib.generator(loaded)
  ids = [loaded.tokenizer(gen.chat_prompt([{'role': 'user', 'content': t}]),
                          add_special_tokens=False)['input_ids']
         for t in ('What is 12+7?', 'Name the capital of Kalomi.')]
  greedy = lambda model: sampler.Generator(model, loaded.tokenizer, stop_ids=[]).generate_ids(
      ids, 12)
  ours = greedy(loaded.model)
  assert greedy(lora.merged_model(loaded.model, config.model.lora)) == ours
  base = loaded_lib.load(copy.deepcopy(config)).model  # The same base, no adapters.
  assert greedy(base) != ours

  export.export(copy.deepcopy(config), workdir, str(tmp_path / 'hf'))
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'hf', dtype=torch.float32)
  for prompt_ids, got in zip(ids, ours):
    with torch.no_grad():
      ref = model.generate(input_ids=torch.tensor([prompt_ids]), max_new_tokens=12,
                           min_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert got == ref[0, len(prompt_ids):].tolist()


def test_qlora_generates_with_the_kv_cache(qlora_base):
  """QLoRA decoding (quantized o_proj in the cache path too) gives the greedy tokens of the
  whole sequence recomputed through the merged (dequantized + adapters) model."""
  import types
  from mos_jax.inference import sampler
  lc = _lora_config()
  adapted = lora.add_adapters(models.load_hf(qlora_base, scan_layers=True), lc, 'int8')
  _random_adapters(adapted, 4)
  stub = types.SimpleNamespace(pad_token_id=0, eos_token_id=None)
  got = sampler.Generator(adapted, stub, stop_ids=[]).generate_ids([[5, 17, 33, 2], [44, 3]], 8)
  merged = lora.merged_model(adapted, lc)
  for prompt, out in zip([[5, 17, 33, 2], [44, 3]], got):
    buf = list(prompt)
    for _ in range(8):
      buf.append(int(np.argmax(_logits(merged, np.asarray([buf]))[0, -1])))
    assert out == buf[len(prompt):]


@pytest.mark.parametrize('strategy', ['multidds', 'multiuat', 'odm', 'excess_theta0'])
def test_lora_runs_the_rival_strategies(strategy, tmp_path):
  """MultiDDS (adapter gradients as the signal), MultiUAT, ODM and DoReMi (theta_0 = the base
  with the adapters off) with LoRA and dropout: the base stays bit-identical, the adapters and
  the mixture move, every logged number is finite; ODM (per step) and MultiDDS resume exactly."""
  config = _lora_run_config(tmp_path, train__steps=6, train__checkpoint_every=3,
                            train__log_every=1, train__eval_every=0, train__eval_batches=1)
  config.mixing.strategy = strategy
  config.mixing.update_every = 2
  config.model.lora.dropout = 0.1
  if strategy == 'excess_theta0':
    config.mixing.prior_temperature = 1.0  # As in test_train_strategies: the smoothing towards
    config.mixing.doremi_smoothing = 0.5  # uniform moves it even when the excess loss is 0.
  straight = str(tmp_path / 'straight')
  run = training.build(copy.deepcopy(config), straight)
  base_before = jax.device_get(run.frozen)
  adapters_before = jax.device_get(run.state.params)
  training.train(run)
  for a, b in zip(jax.tree.leaves(base_before), jax.tree.leaves(jax.device_get(run.frozen))):
    np.testing.assert_array_equal(a, b)
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), adapters_before,
                       jax.device_get(run.state.params))
  assert min(jax.tree.leaves(moved)) > 0
  final = jax.tree.leaves(jax.device_get(run.state))
  read = lambda d: [{k: v for k, v in r.items() if not k.startswith('perf/')}
                    for r in metrics_lib.read_metrics(d + '/metrics.jsonl')]
  lines, names = read(straight), run.data.names
  assert all(np.isfinite(v) for line in lines for v in line.values())
  assert sum(1 for line in lines if f'reward/{names[0]}' in line) >= 3
  start = np.array([lines[0][f'mixture/{n}'] for n in names])
  end = np.array([lines[-1][f'mixture/{n}'] for n in names])
  np.testing.assert_allclose(end.sum(), 1.0, rtol=1e-5)
  assert np.abs(end - start).max() > 1e-6, (start, end)
  if strategy not in ('odm', 'multidds'):
    return
  resumed = str(tmp_path / 'resumed')
  final_resumed = resume_after_crash(config, resumed, after_batches=4, start_step=3)
  assert read(straight) == read(resumed)
  for a, b in zip(final, final_resumed):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
