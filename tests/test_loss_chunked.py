"""The chunked LM head + cross-entropy against the full-logits loss: values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mos_jax import loss as loss_lib


def _full(hidden, weight, targets, mask, vocab_first):
  """Today's path: all [B, L, V] logits in fp32, then the masked NLL sum."""
  spec = 'BLD,VD->BLV' if vocab_first else 'BLD,DV->BLV'
  logits = jnp.einsum(spec, hidden, weight, preferred_element_type=jnp.float32)
  log_norm = jax.nn.logsumexp(logits, axis=-1)
  nll = log_norm - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return (nll * mask).sum()


def _chunked(hidden, weight, targets, mask, vocab_first, chunk):
  nll = loss_lib.chunked_token_nll(hidden, weight, targets, vocab_first=vocab_first,
                                   dtype=jnp.float32, chunk=chunk)
  return (nll * mask).sum()


@pytest.mark.parametrize('vocab_first', [True, False])
@pytest.mark.parametrize('chunk', [0, 4, 5, 64])  # one chunk, divides L, pads L, larger than L
def test_chunked_loss_and_grads_equal_full_logits(vocab_first, chunk):
  rng = np.random.RandomState(0)
  b, length, d, v = 3, 20, 8, 37
  hidden = jnp.asarray(rng.randn(b, length, d), jnp.float32)
  weight = jnp.asarray(rng.randn(*((v, d) if vocab_first else (d, v))), jnp.float32)
  targets = jnp.asarray(rng.randint(0, v, (b, length)), jnp.int32)
  mask = jnp.asarray(rng.rand(b, length) > 0.3, jnp.float32)
  want, want_grads = jax.value_and_grad(_full, argnums=(0, 1))(hidden, weight, targets, mask,
                                                               vocab_first)
  got, got_grads = jax.jit(jax.value_and_grad(_chunked, argnums=(0, 1)), static_argnums=(4, 5))(
      hidden, weight, targets, mask, vocab_first, chunk)
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
