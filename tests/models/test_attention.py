"""Every attention kernel against the dense-mask reference, and the decoder through each kernel
against transformers (padding, packing, GQA/MQA, Gemma's head_dim). The Pallas kernels run in
interpret mode on the CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mos_jax import models
from mos_jax.models import attention

from test_models import _padded_batch, _torch_forward, checkpoints, forward  # noqa: F401

PALLAS = ('triton', 'splash')


def _segments():
  """Row 0 packs three sequences then padding, row 1 is left-padded, row 2 right-padded."""
  seg = np.zeros((3, 40), np.int32)
  seg[0, :9], seg[0, 9:30], seg[0, 30:37] = 1, 2, 3
  seg[1, 6:] = 1
  seg[2, :25] = 1
  return jnp.asarray(seg)


@pytest.mark.parametrize('impl', PALLAS)
@pytest.mark.parametrize('heads,kv_heads,head_dim', [(4, 2, 16), (2, 1, 256)])  # GQA; MQA, Gemma H
def test_kernel_matches_reference(impl, heads, kv_heads, head_dim):
  rng = np.random.RandomState(0)
  seg = _segments()
  b, length = seg.shape
  q = jnp.asarray(rng.randn(b, length, heads, head_dim), jnp.float32)
  k, v = (jnp.asarray(rng.randn(b, length, kv_heads, head_dim), jnp.float32) for _ in range(2))
  cotangent = jnp.asarray(rng.randn(b, length, heads, head_dim), jnp.float32)
  real = (seg > 0)[:, :, None, None]  # Padded positions carry no loss; compare the rest.

  def loss(impl, q, k, v):
    return (attention.attend(q, k, v, seg, impl) * cotangent * real).sum()

  want = attention.attend(q, k, v, seg, 'xla')
  got = jax.jit(lambda q, k, v: attention.attend(q, k, v, seg, impl))(q, k, v)
  np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), atol=2e-5)
  want_grads = jax.grad(lambda *a: loss('xla', *a), argnums=(0, 1, 2))(q, k, v)
  got_grads = jax.jit(jax.grad(lambda *a: loss(impl, *a), argnums=(0, 1, 2)))(q, k, v)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, atol=5e-5)


def test_splash_window_and_softcap_match_reference():
  """Splash's LocalMask with segment ids and its soft-cap against the dense reference mask."""
  rng = np.random.RandomState(3)
  seg = _segments()
  b, length = seg.shape
  q = jnp.asarray(3 * rng.randn(b, length, 4, 16), jnp.float32)
  k, v = (jnp.asarray(rng.randn(b, length, 2, 16), jnp.float32) for _ in range(2))
  real = (seg > 0)[:, :, None, None]
  options = dict(window=7, softcap=2.0, scale=0.2)
  want = attention.attend(q, k, v, seg, 'xla', **options)
  # The reference itself: a window of 7 and the cap change the output.
  assert np.abs(np.asarray(want - attention.attend(q, k, v, seg, 'xla', scale=0.2))).max() > 0.1
  got = jax.jit(lambda q, k, v: attention.attend(q, k, v, seg, 'splash', **options))(q, k, v)
  np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), atol=2e-5)


def test_triton_falls_back_to_xla_for_window_and_softcap(caplog, monkeypatch):
  monkeypatch.setattr(attention, '_said', set())  # The message is logged once per process.
  rng = np.random.RandomState(4)
  seg = _segments()
  q, k, v = (jnp.asarray(rng.randn(3, 40, 2, 8), jnp.float32) for _ in range(3))
  with caplog.at_level('WARNING', logger='mos_jax.models.attention'):
    got = attention.attend(q, k, v, seg, 'triton', window=5)
  assert "'triton' has no window: these layers run on the xla attention" in caplog.text
  np.testing.assert_array_equal(got, attention.attend(q, k, v, seg, 'xla', window=5))


def test_auto_choice_per_platform():
  assert attention.resolve(None, 'tpu') == 'splash'
  assert attention.resolve('', 'gpu') == 'cudnn'
  assert attention.resolve(None, 'cpu') == 'xla'
  assert attention.resolve('triton', 'cpu') == 'triton'
  with pytest.raises(ValueError, match='attention_impl'):
    attention.resolve('flash', 'cpu')


@pytest.mark.parametrize('impl', PALLAS)
@pytest.mark.parametrize('family', ['llama', 'gemma'])
def test_decoder_through_kernel_matches_transformers(checkpoints, family, impl):  # noqa: F811
  folder, torch_model = checkpoints[family]
  model = models.load_hf(folder, attention_impl=impl)
  # Padded rows (left and right) against transformers with its attention mask.
  tokens, mask, positions = _padded_batch(np.random.RandomState(1))
  ref_logits, _ = _torch_forward(torch_model, tokens, mask, positions)
  out = forward(model, tokens, attention_mask=jnp.asarray(mask))
  real = mask.astype(bool)
  assert np.abs(np.asarray(out.logits) - ref_logits)[real].max() < 1e-4
  # A packed row of two sequences against transformers on each sequence alone.
  rng = np.random.RandomState(2)
  a, b = rng.randint(0, 96, (1, 7)), rng.randint(0, 96, (1, 5))
  packed = np.concatenate([a, b], axis=1).astype(np.int32)
  seg = np.array([[1] * 7 + [2] * 5], np.int32)
  out = forward(model, packed, segment_ids=jnp.asarray(seg))
  for part, sl in ((a, slice(0, 7)), (b, slice(7, 12))):
    n = part.shape[1]
    ref, _ = _torch_forward(torch_model, part, np.ones((1, n)), np.arange(n)[None])
    assert np.abs(np.asarray(out.logits[:, sl]) - ref).max() < 1e-4


_MESH_SCRIPT = '''
import jax, jax.numpy as jnp, numpy as np, ml_collections
from mos_jax.infra import sharding
from mos_jax.models import attention
mesh = sharding.make_mesh(ml_collections.ConfigDict({'data': 1, 'fsdp': 2, 'tensor': 2}))
rng = np.random.RandomState(0)
q = jnp.asarray(rng.randn(4, 40, 4, 16), jnp.float32)
k, v = (jnp.asarray(rng.randn(4, 40, 2, 16), jnp.float32) for _ in range(2))
seg = np.ones((4, 40), np.int32); seg[0, 20:] = 2; seg[1, 30:] = 0; seg = jnp.asarray(seg)
loss = lambda impl: lambda q, k, v: (attention.attend(q, k, v, seg, impl) ** 2).sum()
want = jax.grad(loss('xla'), argnums=(0, 1, 2))(q, k, v)
with jax.set_mesh(mesh):
  for impl in ('triton', 'splash'):
    got = jax.jit(jax.grad(loss(impl), argnums=(0, 1, 2)))(q, k, v)
    print(impl, max(float(jnp.abs(a - b).max()) for a, b in zip(got, want)))
'''


def test_kernels_under_a_mesh_match_reference():
  """Rows over fsdp and heads over tensor: the Pallas kernels run per shard (shard_map)."""
  import os
  import subprocess
  import sys
  from demo_run import REPO
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=4',
         'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': REPO}
  done = subprocess.run([sys.executable, '-c', _MESH_SCRIPT], env=env, capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  errors = dict(line.split() for line in done.stdout.splitlines() if line.split()[0] in PALLAS)
  assert set(errors) == set(PALLAS) and all(float(e) < 1e-4 for e in errors.values()), errors
