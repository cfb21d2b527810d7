"""The q_tau prior and the scorer psi: exact init, the Eq. 6 gradient, the probability floor."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mos_jax.mixing import prior_probs, scorer

SIZES = [100, 300, 600]  # q = (0.1, 0.3, 0.6)
# q_tau by hand: q^(1/tau) / sum q^(1/tau).
_T10 = np.array([0.1 ** 0.1, 0.3 ** 0.1, 0.6 ** 0.1])
EXPECTED = {
    1.0: np.array([0.1, 0.3, 0.6]),
    10.0: _T10 / _T10.sum(),
    float('inf'): np.array([1 / 3, 1 / 3, 1 / 3]),
}


@pytest.mark.parametrize('tau', sorted(EXPECTED))
def test_prior_matches_hand_computed_q_tau(tau):
  np.testing.assert_allclose(prior_probs(SIZES, tau), EXPECTED[tau], rtol=1e-12)


def test_prior_temperature_10_value():
  # Spelled out so a wrong exponent (tau instead of 1/tau) cannot agree with itself.
  np.testing.assert_allclose(prior_probs(SIZES, 10.0), [0.3019, 0.3370, 0.3611], atol=1e-4)


@pytest.mark.parametrize('sizes,tau,match', [
    ([], 1.0, 'at least one'),
    ([10, 0], 1.0, 'positive integers'),
    ([10, -3], 1.0, 'positive integers'),
    ([10, 2.5], 1.0, 'positive integers'),
    ([10, 20], 0.0, 'temperature'),
    ([10, 20], -1.0, 'temperature'),
    ([10, 20], float('nan'), 'temperature'),
])
def test_prior_rejects_bad_inputs(sizes, tau, match):
  with pytest.raises(ValueError, match=match):
    prior_probs(sizes, tau)


@pytest.mark.parametrize('hidden', [0, 8])
@pytest.mark.parametrize('tau', sorted(EXPECTED))
def test_scorer_starts_at_q_tau(tau, hidden):
  params = scorer.init(3, prior_probs(SIZES, tau), hidden, jax.random.key(1))
  np.testing.assert_allclose(scorer.probs(params), EXPECTED[tau], rtol=1e-6)
  if hidden:
    assert params['hidden']['w'].shape == (3, hidden)
    assert float(jnp.abs(params['hidden']['w']).sum()) > 0  # random, not zero


def test_loss_gradient_wrt_logits_is_closed_form():
  logits = jnp.array([0.3, -1.2, 0.5, 2.0])
  r = jnp.array([1.5, 0.2, -0.7, 1.1])
  grad = jax.grad(scorer.loss)({'logits': logits}, r)['logits']
  z = np.asarray(logits, np.float64)
  p = np.exp(z - z.max())
  p /= p.sum()
  rr = np.asarray(r, np.float64)
  expected = -(rr - p * rr.sum())
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)


def test_loss_value_is_reward_weighted_log_prob():
  params = {'logits': jnp.log(jnp.array([0.2, 0.3, 0.5]))}
  r = np.array([1.0, 2.0, 3.0])
  expected = -(1.0 * np.log(0.2) + 2.0 * np.log(0.3) + 3.0 * np.log(0.5))
  np.testing.assert_allclose(scorer.loss(params, r), expected, rtol=1e-6)


def test_mlp_scorer_gradient_flows_to_both_layers_after_a_step():
  params = scorer.init(3, prior_probs(SIZES, 1.0), 4, jax.random.key(0))
  g = jax.grad(scorer.loss)(params, jnp.array([1.0, 0.0, 0.0]))
  assert float(jnp.abs(g['out']['w']).sum()) > 0
  assert float(jnp.abs(g['out']['b']).sum()) > 0


def test_min_prob_floor():
  params = {'logits': jnp.array([10.0, 0.0, -10.0, -20.0])}
  p = np.asarray(scorer.probs(params, 0.05))
  soft = np.exp([10.0, 0.0, -10.0, -20.0])
  soft /= soft.sum()
  np.testing.assert_allclose(p, (1 - 4 * 0.05) * soft + 0.05, rtol=1e-5, atol=1e-7)
  assert p.min() >= 0.05 - 1e-7
  np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-6)
  # The floor leaves the loss (and so the learning signal) on the unfloored softmax.
  np.testing.assert_allclose(scorer.loss(params, jnp.array([0.0, 0.0, 0.0, 1.0])),
                             -np.log(soft[3]), rtol=1e-4)


@pytest.mark.parametrize('floor', [-0.1, 0.26])
def test_min_prob_out_of_range(floor):
  with pytest.raises(ValueError, match='min_prob'):
    scorer.probs({'logits': jnp.zeros(4)}, floor)


def test_init_rejects_prior_of_wrong_length():
  with pytest.raises(ValueError, match='shape'):
    scorer.init(4, [0.5, 0.5], 0, jax.random.key(0))
