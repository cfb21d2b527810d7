"""The decoder against transformers' PyTorch models, and its own invariants (causality, packing).

Reference checkpoints are tiny random HF models built here with
AutoModelForCausalLM.from_config(...).save_pretrained(dir), with norms and biases perturbed so
that a wrong convention (Gemma's 1 + w, a missing bias) shows in the logits.
"""

import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from mos_jax import models
from mos_jax.models import rope as rope_lib

VOCAB = 96
LLAMA3_ROPE = {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0,
               'high_freq_factor': 4.0, 'original_max_position_embeddings': 16}
# Small but each family's features on: GQA + llama3 rope + untied (Llama), biases + tied (Qwen2),
# MQA + head_dim != hidden / heads + GeGLU + tied (Gemma).
HF_CONFIGS = {
    'llama': lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
        rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE), tie_word_embeddings=False),
    'qwen2': lambda: transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=True),
    'gemma': lambda: transformers.GemmaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16),
}
FAMILIES = tuple(HF_CONFIGS)


def _torch_model(family, seed=0):
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(
      HF_CONFIGS[family](), dtype=torch.float32, attn_implementation='eager').eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name or name.endswith('bias'):
        p.add_(0.5 * torch.randn_like(p))
  return model


def save_torch_models(tmp_path_factory, families, make_model):
  """family -> (folder, torch model): make_model(family) saved with save_pretrained."""
  out = {}
  for family in families:
    model = make_model(family)
    folder = tmp_path_factory.mktemp(family)
    model.save_pretrained(folder)
    out[family] = (folder, model)
  return out


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
  """family -> (folder, torch model), saved in the transformers-5 config layout."""
  return save_torch_models(tmp_path_factory, FAMILIES, _torch_model)


def _padded_batch(rng, batch=3, length=12):
  """Row 0 left-padded, row 1 right-padded, row 2 full; positions count real tokens only."""
  tokens = rng.randint(0, VOCAB, (batch, length)).astype(np.int32)
  mask = np.ones((batch, length), np.int32)
  mask[0, :4] = 0
  mask[1, 7:] = 0
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  return tokens, mask, positions


def _torch_forward(model, tokens, mask, positions=None):
  """(logits, last hidden state) of transformers' model; positions None = its own."""
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long),
                position_ids=None if positions is None else torch.tensor(positions,
                                                                         dtype=torch.long),
                output_hidden_states=True)
  # HF's last hidden state is taken after the final norm.
  return out.logits.float().numpy(), out.hidden_states[-1].float().numpy()


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens, positions=None, segment_ids=None, attention_mask=None):
  return nnx.merge(graphdef, state)(tokens, positions, segment_ids, attention_mask)


def forward(model, tokens, **kw):
  graphdef, state = nnx.split(model)
  return _forward(graphdef, state, jnp.asarray(tokens), **kw)


def _max_err(a, b, mask):
  return float(np.abs(np.asarray(a, np.float32) - b)[mask.astype(bool)].max())


@pytest.mark.parametrize('family', FAMILIES)
def test_logits_match_transformers_fp32(checkpoints, family):
  folder, torch_model = checkpoints[family]
  tokens, mask, positions = _padded_batch(np.random.RandomState(1))
  ref_logits, ref_hidden = _torch_forward(torch_model, tokens, mask, positions)

  model = models.load_hf(folder)
  assert model.config.family == family
  out = forward(model, tokens, attention_mask=jnp.asarray(mask))  # positions derived from the mask
  assert out.logits.shape == (3, 12, VOCAB) and out.logits.dtype == jnp.float32
  assert _max_err(out.logits, ref_logits, mask) < 1e-4
  assert _max_err(out.hidden, ref_hidden, mask) < 1e-4
  assert np.isfinite(np.asarray(out.logits)).all()  # Padded rows too.

  if family == 'llama':  # Explicit positions and segment ids instead of the mask.
    explicit = forward(model, tokens, positions=jnp.asarray(positions),
                       segment_ids=jnp.asarray(mask))
    assert _max_err(explicit.logits, ref_logits, mask) < 1e-4


def test_llama3_rope_scaling_is_applied(checkpoints):
  # The parity test above would not notice a missing rescaling if it changed nothing here.
  config = models.load_hf(checkpoints['llama'][0]).config
  assert config.rope_scaling_dict['rope_type'] == 'llama3'
  scaled = rope_lib.rope_inv_freq(config)
  plain = rope_lib.rope_inv_freq(config.replace(rope_scaling=None))
  assert np.abs(scaled - plain).max() > 1e-3


def _to_classic_layout(hf):
  """config.json as the published checkpoints have it (rope_theta / rope_scaling, torch_dtype)."""
  hf = dict(hf)
  rope = dict(hf.pop('rope_parameters'))
  hf['rope_theta'] = rope.pop('rope_theta')
  hf['rope_scaling'] = None if rope.pop('rope_type') == 'default' else LLAMA3_ROPE
  hf['torch_dtype'] = hf.pop('dtype')
  if hf['model_type'] == 'gemma':  # As in google/gemma-2b's config.json.
    hf['hidden_act'] = 'gelu'
    hf['hidden_activation'] = 'gelu_pytorch_tanh'
  return hf


@pytest.mark.parametrize('family', FAMILIES)
def test_classic_config_layout(checkpoints, family, tmp_path):
  folder, torch_model = checkpoints[family]
  new_layout = json.loads((folder / 'config.json').read_text())
  assert 'rope_parameters' in new_layout
  classic = _to_classic_layout(new_layout)
  (tmp_path / 'config.json').write_text(json.dumps(classic))
  shutil.copy(folder / 'model.safetensors', tmp_path / 'model.safetensors')
  assert models.config_from_hf(classic) == models.config_from_hf(new_layout)

  tokens, mask, positions = _padded_batch(np.random.RandomState(2))
  ref_logits, _ = _torch_forward(torch_model, tokens, mask, positions)
  out = forward(models.load_hf(tmp_path), tokens, attention_mask=jnp.asarray(mask))
  assert _max_err(out.logits, ref_logits, mask) < 1e-4


def test_logits_match_transformers_bf16(checkpoints, tmp_path):
  folder, torch_model = checkpoints['gemma']
  tokens, mask, positions = _padded_batch(np.random.RandomState(3))
  ref32, _ = _torch_forward(torch_model, tokens, mask, positions)
  ref16, _ = _torch_forward(_torch_model('gemma').to(torch.bfloat16), tokens, mask, positions)

  model = models.load_hf(folder, dtype=jnp.bfloat16)
  assert model.embed[...].dtype == jnp.bfloat16
  out = forward(model, tokens, attention_mask=jnp.asarray(mask))
  assert out.hidden.dtype == jnp.bfloat16
  ours_vs_torch16 = _max_err(out.logits, ref16, mask)
  torch16_vs_32 = _max_err(ref16, ref32, mask)
  # Both bf16 models round differently; stay within bf16 noise of each other and of fp32.
  assert ours_vs_torch16 < 0.1, ours_vs_torch16
  assert _max_err(out.logits, ref32, mask) < max(0.1, 2 * torch16_vs_32)

  # bf16 parameters are saved as BF16 tensors that transformers reads back exactly.
  models.save_hf(model, tmp_path / 'bf16')
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / 'bf16', dtype=torch.bfloat16, attn_implementation='eager').eval()
  for name, p in torch_model.state_dict().items():
    assert torch.equal(reloaded.state_dict()[name], p.to(torch.bfloat16)), name

  # fp32 parameters with bf16 compute: also close to the fp32 reference.
  mixed = models.load_hf(folder, dtype=jnp.bfloat16, param_dtype=jnp.float32)
  assert mixed.embed[...].dtype == jnp.float32
  out = forward(mixed, tokens, attention_mask=jnp.asarray(mask))
  assert _max_err(out.logits, ref32, mask) < 0.1


def _stack_layers(list_state, num_layers):
  """Params of a plain-loop model -> the scanned model's stacked [layers, ...] layout."""
  pure = nnx.to_pure_dict(list_state)
  layers = [pure['layers'][i] for i in range(num_layers)]
  pure['layers'] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return pure


@functools.partial(jax.jit, static_argnums=0)
def _logits_loss_grad(graphdef, state, tokens, segments, weights):
  def loss(state):
    logits = nnx.merge(graphdef, state)(tokens, segment_ids=segments).logits
    return jnp.sum(logits * weights * (segments > 0)[..., None]), logits
  (loss, logits), grad = jax.value_and_grad(loss, has_aux=True)(state)
  return logits, loss, grad


def test_scan_and_remat_match_plain_loop(checkpoints):
  folder, _ = checkpoints['gemma']
  tokens = jnp.asarray(np.random.RandomState(4).randint(0, VOCAB, (3, 12)), jnp.int32)
  # Left padding; two packed sequences and right padding; a row of padding only.
  segments = jnp.asarray([[0] * 3 + [1] * 9, [1] * 5 + [2] * 4 + [0] * 3, [0] * 12], jnp.int32)
  weights = jnp.asarray(np.random.RandomState(5).randn(3, 12, VOCAB), jnp.float32)

  plain = models.load_hf(folder)
  plain_logits, plain_loss, plain_grad = _logits_loss_grad(*nnx.split(plain), tokens, segments,
                                                           weights)
  # Padding must not poison the gradients of a masked loss.
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(plain_grad))
  assert np.isfinite(np.asarray(plain_logits)).all()
  plain_grad = _stack_layers(plain_grad, plain.config.num_layers)

  remat_loop = models.load_hf(folder, remat=True)
  logits = forward(remat_loop, tokens, segment_ids=segments).logits
  np.testing.assert_allclose(logits, plain_logits, atol=1e-5)

  # Scan + remat (the scan body is the rematerialised block); remat matters in the backward pass.
  model = models.load_hf(folder, scan_layers=True, remat=True)
  assert nnx.state(model)['layers']['attn']['q_proj'][...].shape[0] == 2
  logits, loss, grad = _logits_loss_grad(*nnx.split(model), tokens, segments, weights)
  np.testing.assert_allclose(logits, plain_logits, atol=1e-5)
  np.testing.assert_allclose(loss, plain_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
               nnx.to_pure_dict(grad), plain_grad)


def test_causal_and_segment_isolation_in_gradients(checkpoints):
  model = models.load_hf(checkpoints['llama'][0])
  graphdef, state = nnx.split(model)
  rng = np.random.RandomState(6)
  length = 8
  tokens = jnp.asarray(rng.randint(0, VOCAB, (2, length)), jnp.int32)
  # Row 0: one sequence. Row 1: two packed sequences, [0, 5) and [5, 8).
  segments = jnp.asarray([[1] * 8, [1] * 5 + [2] * 3], jnp.int32)
  probe = jnp.asarray(rng.randn(VOCAB), jnp.float32)

  @jax.jit
  def jacobian(state):
    m = nnx.merge(graphdef, state)
    x = m.embed_tokens(tokens)  # [B, L, D]
    per_position = lambda x: m.from_embeddings(x, segment_ids=segments).logits @ probe  # [B, L]
    return jax.jacrev(per_position)(x)  # [B, L(out), B, L(in), D]

  jac = np.abs(np.asarray(jacobian(state))).sum(-1)  # [B, L(out), B, L(in)]
  for b in range(2):
    for t in range(length):
      for s in range(length):
        same_segment = segments[b, t] == segments[b, s]
        if s > t or not same_segment:
          assert jac[b, t, b, s] == 0.0, (b, t, s)
        else:
          assert jac[b, t, b, s] > 0.0, (b, t, s)
  # Rows never see each other.
  assert jac[0, :, 1, :].max() == 0.0 and jac[1, :, 0, :].max() == 0.0


def test_packed_row_equals_sequences_alone(checkpoints):
  model = models.load_hf(checkpoints['qwen2'][0])
  rng = np.random.RandomState(7)
  a, b = rng.randint(0, VOCAB, 5), rng.randint(0, VOCAB, 4)
  length = 12
  tokens = np.zeros((4, length), np.int32)
  segments = np.zeros((4, length), np.int32)
  tokens[0, :5], tokens[0, 5:9], segments[0, :5], segments[0, 5:9] = a, b, 1, 2  # packed + pad
  tokens[1, :5], segments[1, :5] = a, 1
  tokens[2, :4], segments[2, :4] = b, 1
  # Row 3: all padding; it must stay finite.
  out = forward(model, tokens, segment_ids=jnp.asarray(segments))
  logits = np.asarray(out.logits)
  np.testing.assert_allclose(logits[0, :5], logits[1, :5], atol=1e-5)
  np.testing.assert_allclose(logits[0, 5:9], logits[2, :4], atol=1e-5)
  assert np.isfinite(logits).all() and np.isfinite(np.asarray(out.hidden)).all()


def test_round_trip_through_transformers(checkpoints, tmp_path):
  tok_dir = tmp_path / 'tok'
  _tiny_tokenizer().save_pretrained(tok_dir)
  tokens, mask, positions = _padded_batch(np.random.RandomState(8))
  for family in FAMILIES:
    folder, torch_model = checkpoints[family]
    ref_logits, _ = _torch_forward(torch_model, tokens, mask, positions)
    # Save from the scanned layout too, and as several shards for one family.
    model = models.load_hf(folder, scan_layers=family == 'gemma')
    out_dir = tmp_path / family
    models.save_hf(model, out_dir, tokenizer_dir=tok_dir,
                   max_shard_bytes=20_000 if family == 'qwen2' else 5 * 2**30)
    if family == 'qwen2':
      assert (out_dir / 'model.safetensors.index.json').is_file()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        out_dir, dtype=torch.float32, attn_implementation='eager').eval()
    assert type(reloaded) is type(torch_model)
    got, _ = _torch_forward(reloaded, tokens, mask, positions)
    assert _max_err(got, ref_logits, mask) < 1e-6, family
    # And back into JAX (the sharded-index reader for qwen2).
    again = models.load_hf(out_dir)
    assert again.config == model.config.replace(scan_layers=False)
    out = forward(again, tokens, attention_mask=jnp.asarray(mask))
    assert _max_err(out.logits, ref_logits, mask) < 1e-4
  tok = transformers.AutoTokenizer.from_pretrained(tmp_path / 'llama')
  assert tok('a b').input_ids == [3, 4]


def _tiny_tokenizer():
  from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
  vocab = {'<pad>': 0, '<s>': 1, '</s>': 2, 'a': 3, 'b': 4}
  tok = Tokenizer(tok_models.WordLevel(vocab, unk_token='<pad>'))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token='<pad>',
                                              bos_token='<s>', eos_token='</s>')
