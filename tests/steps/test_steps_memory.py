"""Memory-saving step paths against the plain ones: the chunked LM head + cross-entropy against
full logits (values and gradients), micro-batched reward / theta_0 forwards against one forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mos_jax.models import loss as loss_lib
from mos_jax import models
from mos_jax.steps import sft
from mos_jax.steps import reward as reward_lib


def _full(hidden, weight, targets, mask, vocab_first, cap=None):
  """Today's path: all [B, L, V] logits in fp32 (soft-capped at `cap`), then the masked NLL sum."""
  spec = 'BLD,VD->BLV' if vocab_first else 'BLD,DV->BLV'
  logits = jnp.einsum(spec, hidden, weight, preferred_element_type=jnp.float32)
  if cap is not None:  # Gemma 2's final_logit_softcapping, as transformers writes it.
    logits = jnp.tanh(logits / cap) * cap
  log_norm = jax.nn.logsumexp(logits, axis=-1)
  nll = log_norm - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return (nll * mask).sum()


def _chunked(hidden, weight, targets, mask, vocab_first, chunk, cap=None):
  nll = loss_lib.chunked_token_nll(hidden, weight, targets, vocab_first=vocab_first,
                                   dtype=jnp.float32, chunk=chunk, cap=cap)
  return (nll * mask).sum()


@pytest.mark.parametrize('vocab_first,cap', [(True, None), (False, None), (True, 2.5)])
@pytest.mark.parametrize('chunk', [0, 4, 5, 64])  # one chunk, divides L, pads L, larger than L
def test_chunked_loss_and_grads_equal_full_logits(vocab_first, chunk, cap):
  rng = np.random.RandomState(0)
  b, length, d, v = 3, 20, 8, 37
  hidden = jnp.asarray(rng.randn(b, length, d), jnp.float32)
  weight = jnp.asarray(rng.randn(*((v, d) if vocab_first else (d, v))), jnp.float32)
  targets = jnp.asarray(rng.randint(0, v, (b, length)), jnp.int32)
  mask = jnp.asarray(rng.rand(b, length) > 0.3, jnp.float32)
  want, want_grads = jax.value_and_grad(_full, argnums=(0, 1))(hidden, weight, targets, mask,
                                                               vocab_first, cap)
  got, got_grads = jax.jit(jax.value_and_grad(_chunked, argnums=(0, 1)),
                           static_argnums=(4, 5, 6))(hidden, weight, targets, mask, vocab_first,
                                                     chunk, cap)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_no_full_logits_in_the_compiled_gradient():
  """No [B, L, V] fp32 buffer exists in the jitted gradient: the largest has a chunk's size."""
  b, length, d, v, chunk = 2, 64, 16, 1000, 8
  args = (jnp.zeros((b, length, d)), jnp.zeros((v, d)), jnp.zeros((b, length), jnp.int32),
          jnp.ones((b, length)))
  grad = jax.jit(jax.grad(lambda h, w, t, m: _chunked(h, w, t, m, True, chunk), argnums=(0, 1)))
  text = grad.lower(*args).compile().as_text()
  assert f'f32[{b},{length},{v}]' not in text and f'f32[{b * length},{v}]' not in text
  assert f'f32[{b},{chunk},{v}]' in text  # (a check that the search can see the chunk)


def _batch(rng, rows, length, vocab):
  tokens = rng.integers(0, vocab, (rows, length)).astype(np.int32)
  lengths = rng.integers(length // 2, length + 1, rows)
  segment_ids = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  return {'tokens': tokens, 'targets': np.roll(tokens, -1, axis=1),
          'loss_mask': (segment_ids * (rng.random((rows, length)) < 0.7)).astype(np.float32),
          'positions': np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy(),
          'segment_ids': segment_ids, 'dataset_ids': np.arange(rows, dtype=np.int32) % 2}


@pytest.mark.parametrize('tied', [False, True])
def test_step_loss_and_param_grads_equal_full_logits(tied):
  config = models.get_preset('tiny', vocab_size=64, tie_embeddings=tied, loss_chunk=5)
  graphdef, params = nnx.split(models.Decoder(config, rngs=nnx.Rngs(0)), nnx.Param)
  params = nnx.to_pure_dict(params)
  batch = _batch(np.random.default_rng(0), 4, 12, 64)

  def full(params):  # Today's path: the model's [B, L, V] logits, then the NLL.
    logits = nnx.merge(graphdef, params)(batch['tokens'], positions=batch['positions'],
                                         segment_ids=batch['segment_ids']).logits
    return (loss_lib.token_nll(logits, batch['targets']) * batch['loss_mask']).sum()

  chunked = lambda p: sft.sum_loss(p, graphdef, batch, 2)[0]
  want, want_grads = jax.value_and_grad(full)(params)
  got, got_grads = jax.jit(jax.value_and_grad(chunked))(params)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def test_reward_and_reference_passes_in_micro_batches_equal_one_pass():
  config = models.get_preset('tiny', vocab_size=64)
  model = models.Decoder(config, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(params)
  reference = nnx.to_pure_dict(nnx.split(models.Decoder(config, rngs=nnx.Rngs(1)), nnx.Param)[1])
  batch = _batch(np.random.default_rng(1), 8, 10, 64)  # 4 examples x 2 datasets
  outs = []
  for micro in (0, 2):
    reward = jax.jit(lambda p, r, b, m=micro: reward_lib.reward_step(
        p, r, b, graphdef=graphdef, num_datasets=2, micro_rows=m))
    nll0 = jax.jit(lambda p, b, m=micro: reward_lib.reference_nll_step(p, b, graphdef=graphdef,
                                                                  micro_rows=m))
    outs.append((reward(params, reference, batch), nll0(reference, batch)))
  (one, one0), (micro, micro0) = outs
  mask = batch['loss_mask']  # theta_0 pass: masked token NLL; its per-row means are the rewards'.
  one0, micro0 = (x.sum(axis=1) / np.maximum(mask.sum(axis=1), 1) for x in (one0, micro0))
  # Per-example values per segment slot: [N, rows x L]; unpacked rows hold segment 1 only.
  assert one['embeddings'].shape == (2, config.hidden_size) and one['nll'].shape == (2, 4 * 10)
  for key in ('nll', 'nll0', 'embeddings', 'valid'):
    np.testing.assert_allclose(micro[key], one[key], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(micro0, one0, rtol=1e-5)
  first = np.asarray(one['nll0']).reshape(2, 4, 10)[:, :, 0]
  np.testing.assert_allclose(one0, first.T.reshape(-1), rtol=1e-5)  # Row order kept.
  # Eq. 7 straight from the model's hidden states, dataset by dataset (rows j * 2 + i).
  from mos_jax.mixing import rewards
  hidden = model(batch['tokens'], positions=batch['positions'],
                 segment_ids=batch['segment_ids']).hidden
  for i in range(2):
    want = rewards.pooled_embedding(hidden[i::2], batch['segment_ids'][i::2])
    np.testing.assert_allclose(one['embeddings'][i], want, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='reward_micro_batch=3'):
    reward_lib.reference_nll_step(params, batch, graphdef=graphdef, micro_rows=3)
