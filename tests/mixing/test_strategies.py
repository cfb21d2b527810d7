"""make_strategy validation and compute_rewards dispatch for static, mos and mospec."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mos_jax.config import base_config
from mos_jax.mixing import compute_rewards, make_strategy

NAMES = ['math', 'medicine', 'general', 'nlp']
SIZES = [100, 100, 200, 600]


def _config(**overrides):
  c = base_config().mixing
  c.update(overrides)
  return c


@pytest.mark.parametrize('tau,expected', [
    (1.0, [0.1, 0.1, 0.2, 0.6]), (float('inf'), [0.25] * 4)])
def test_static_strategies(tau, expected):
  s = make_strategy(_config(strategy='static', prior_temperature=tau), NAMES, SIZES)
  assert not s.updates_scorer and s.reward is None
  assert not s.needs_reference and not s.needs_embeddings
  np.testing.assert_allclose(s.prior, expected, rtol=1e-12)
  with pytest.raises(ValueError, match='no rewards'):
    compute_rewards(s, jnp.ones((4, 2)))


def test_mos_flags():
  cos = make_strategy(_config(reward='cossim', ema=True), NAMES, SIZES)
  assert cos.updates_scorer and cos.needs_embeddings and not cos.needs_reference and cos.ema
  dif = make_strategy(_config(reward='diff', ema=False), NAMES, SIZES)
  assert dif.needs_reference and not dif.needs_embeddings and not dif.ema
  assert dif.target_index is None
  hash(dif)  # closable over in a jit


def test_mospec_cossim_uses_target_similarity():
  s = make_strategy(_config(strategy='mospec', reward='cossim', target='general'), NAMES, SIZES)
  assert s.target_index == 2
  z = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
  c = 1 / math.sqrt(2)
  np.testing.assert_allclose(jax.jit(lambda e: compute_rewards(s, e))(z), [c, c, 1.0, c],
                             rtol=1e-6)


def test_mospec_diff_multiplies_target():
  s = make_strategy(_config(strategy='mospec', reward='diff', target='math', target_factor=2.0),
                    NAMES, SIZES)
  nll = jnp.log(jnp.array([[2.0, 4.0], [1.0, 1.0], [3.0, 3.0], [1.0, 2.0]]))
  nll0 = jnp.zeros((4, 2))
  r = compute_rewards(s, nll=nll, nll0=nll0, valid=jnp.ones((4, 2)))
  np.testing.assert_allclose(r, [2 * 3.0, 1.0, 3.0, 1.5], rtol=1e-5)


def test_mos_cossim_rewards_are_mean_similarity():
  s = make_strategy(_config(reward='cossim'), NAMES, SIZES)
  z = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
  np.testing.assert_allclose(compute_rewards(s, z), [0.75, 0.25, 0.75, 0.75], rtol=1e-6)


def test_unknown_target_names_it_and_lists_datasets():
  with pytest.raises(ValueError, match=r"'code'.*\['math', 'medicine', 'general', 'nlp'\]"):
    make_strategy(_config(strategy='mospec', target='code'), NAMES, SIZES)


def test_mospec_requires_target():
  with pytest.raises(ValueError, match='needs mixing.target'):
    make_strategy(_config(strategy='mospec', target=''), NAMES, SIZES)


@pytest.mark.parametrize('overrides,match', [
    ({'strategy': 'dds'}, 'mixing.strategy'),
    ({'reward': 'entropy'}, 'mixing.reward'),
    ({'strategy': 'mos', 'target': 'math'}, 'only used by'),
])
def test_bad_config(overrides, match):
  with pytest.raises(ValueError, match=match):
    make_strategy(_config(**overrides), NAMES, SIZES)


def test_missing_inputs_are_named():
  s = make_strategy(_config(reward='diff'), NAMES, SIZES)
  with pytest.raises(ValueError, match='nll'):
    compute_rewards(s, jnp.ones((4, 2)))
