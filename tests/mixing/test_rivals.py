"""MultiDDS, MultiUAT, ODM and DoReMi against theta_0 (excess_theta0): each reward and update rule
on inputs with known answers (DoReMi with a reference run: test_doremi_reference.py)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mos_jax import models
from mos_jax.steps import sft
from mos_jax.steps import state as state_lib
from mos_jax.config import base_config
from mos_jax.mixing import base, doremi, make_strategy, odm, rewards, strategy_names
from mos_jax.steps import reward as reward_lib

NAMES = ('a', 'b')


def _config(**overrides):
  c = base_config().mixing
  c.update(overrides)
  return c


def _model(vocab=32):
  model = models.Decoder(models.get_preset('tiny', vocab_size=vocab), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  return graphdef, nnx.to_pure_dict(params)


def _rows(rng, n, length=10, vocab=32):
  tokens = rng.integers(0, vocab, (n, length)).astype(np.int32)
  return {
      'tokens': tokens, 'targets': np.roll(tokens, -1, 1),
      'loss_mask': np.ones((n, length), np.float32),
      'positions': np.broadcast_to(np.arange(length, dtype=np.int32), (n, length)).copy(),
      'segment_ids': np.ones((n, length), np.int32),
      'dataset_ids': np.zeros((n,), np.int32), 'example_ids': np.arange(n, dtype=np.int32),
  }


def _take(batch, rows):
  return {k: v[rows] for k, v in batch.items()}


def test_every_strategy_is_registered_and_declares_known_signals():
  assert set(strategy_names()) >= {'static', 'mos', 'mospec', 'multidds', 'multiuat', 'odm',
                                   'doremi', 'excess_theta0', 'replay'}
  for name in ('multidds', 'multiuat', 'odm', 'excess_theta0'):
    s = make_strategy(_config(strategy=name), NAMES, [10, 30])
    assert s.signals <= set(base.SIGNALS), name
    hash(s)  # closable over in a jit
  assert make_strategy(_config(strategy='multidds'), NAMES, [1, 1]).signals == {'grad_cos'}
  assert make_strategy(_config(strategy='multiuat', uncertainty='nll'), NAMES,
                       [1, 1]).signals == {'dev_nll'}
  assert make_strategy(_config(strategy='excess_theta0'), NAMES, [1, 1]).needs_reference
  o = make_strategy(_config(strategy='odm'), NAMES, [1, 1])
  assert o.per_step and not o.updates_scorer
  assert reward_lib.batches_needed({'grad_cos'}) == ('train', 'dev')
  assert reward_lib.batches_needed({'dev_entropy'}) == ('dev',)
  assert reward_lib.batches_needed({'nll', 'nll0'}) == ('train',)


@pytest.mark.parametrize('overrides,match', [
    ({'strategy': 'multiuat', 'uncertainty': 'mc'}, 'mixing.uncertainty'),
    ({'strategy': 'odm', 'odm_alpha': 1.0}, 'odm_alpha'),
    ({'strategy': 'excess_theta0', 'doremi_eta': 0.0}, 'doremi_eta'),
    ({'strategy': 'excess_theta0', 'doremi_smoothing': 2.0}, 'doremi_smoothing'),
    ({'strategy': 'doremi'}, 'needs mixing.doremi.reference=DIR.*excess_theta0'),
    ({'strategy': 'replay'}, 'needs mixing.replay.run=DIR'),
    ({'strategy': 'multidds', 'target': 'a'}, 'only used by'),
])
def test_bad_settings_are_named(overrides, match):
  with pytest.raises(ValueError, match=match):
    make_strategy(_config(**overrides), NAMES, [1, 1])


def test_multidds_identical_gradient_gives_one():
  graphdef, params = _model()
  rng = np.random.default_rng(0)
  same, other = _rows(rng, 1), _rows(rng, 1)
  # Dev batch: the same example for both datasets; dataset 0 trains on it, dataset 1 on another.
  dev = {k: np.concatenate([same[k], same[k]]) for k in same}
  train = {k: np.concatenate([same[k], other[k]]) for k in same}  # example-major, b = 1
  mask = reward_lib.gradient_mask(params, '')
  cos = jax.jit(lambda p, t, d: reward_lib.gradient_cosines(
      p, t, d, graphdef=graphdef, num_datasets=2, mask=mask))(params, train, dev)
  np.testing.assert_allclose(float(cos[0]), 1.0, rtol=1e-5)
  assert float(cos[1]) < 0.99

  # Independent reference for dataset 1: full gradients, flattened and compared in float64.
  def grad(batch):
    g = jax.grad(lambda p: sft.sum_loss(p, graphdef, batch, 2)[0])(params)
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(g)])
  g1, gd = grad(_take(train, [1])), grad(dev)
  np.testing.assert_allclose(float(cos[1]), g1 @ gd / np.linalg.norm(g1) / np.linalg.norm(gd),
                             rtol=1e-4)

  # Parameter subset: only the head's gradient is compared.
  head = reward_lib.gradient_mask(params, '^lm_head$')
  assert sum(head) == 1
  cos_head = reward_lib.gradient_cosines(params, train, dev, graphdef=graphdef, num_datasets=2,
                                      mask=head)
  gh = lambda b: np.asarray(jax.grad(lambda p: sft.sum_loss(p, graphdef, b, 2)[0])(
      params)['lm_head'], np.float64).ravel()
  h1, hd = gh(_take(train, [1])), gh(dev)
  np.testing.assert_allclose(float(cos_head[1]), h1 @ hd / np.linalg.norm(h1) / np.linalg.norm(hd),
                             rtol=1e-4)
  with pytest.raises(ValueError, match='matches no parameter'):
    reward_lib.gradient_mask(params, 'nothing_like_this')


def test_multidds_opposite_gradient_gives_minus_one():
  # Gradient ascent on a batch's loss is the negated gradient: a dataset whose examples are the
  # dev examples with the loss mask scaled by -1 has the opposite gradient (token sums).
  graphdef, params = _model()
  dev_rows = _rows(np.random.default_rng(1), 2)
  negated = dict(dev_rows, loss_mask=-dev_rows['loss_mask'])
  dev = _take(dev_rows, [0, 0, 1, 1])  # b = 2: both dev sets hold both examples
  train = {k: np.concatenate([negated[k][:1], dev_rows[k][:1], negated[k][1:], dev_rows[k][1:]])
           for k in dev_rows}  # dataset 0 = negated dev rows, dataset 1 = the dev rows
  mask = reward_lib.gradient_mask(params, '')
  cos = reward_lib.gradient_cosines(params, train, dev, graphdef=graphdef, num_datasets=2, mask=mask)
  np.testing.assert_allclose(np.asarray(cos), [-1.0, 1.0], rtol=1e-5)


def test_uniform_prediction_has_entropy_log_v():
  v = 37
  np.testing.assert_allclose(rewards.token_entropy(jnp.zeros((2, 3, v))), np.full((2, 3),
                                                                                   math.log(v)),
                             rtol=1e-6)
  # A one-hot-like prediction has (almost) none; two equal logits out of three, log 2.
  np.testing.assert_allclose(float(rewards.token_entropy(jnp.array([50.0, 50.0, -50.0]))),
                             math.log(2), rtol=1e-6)


def test_multiuat_reward_is_the_token_weighted_signal():
  s = make_strategy(_config(strategy='multiuat'), NAMES, [1, 1])
  np.testing.assert_allclose(s.rewards({'dev_entropy': jnp.array([2.0, 3.0])}), [2.0, 3.0])
  n = make_strategy(_config(strategy='multiuat', uncertainty='nll'), NAMES, [1, 1])
  np.testing.assert_allclose(n.rewards({'dev_nll': jnp.array([0.5, 0.0])}), [0.5, 0.0])


def test_example_uncertainty_matches_numpy():
  graphdef, params = _model()
  batch = _rows(np.random.default_rng(2), 3)
  batch['loss_mask'][:, :4] = 0.0
  ent, nll, tokens = reward_lib.token_uncertainty(graphdef, params, batch)
  model = state_lib.merge(graphdef, params)
  logits = np.asarray(model(batch['tokens'], positions=batch['positions'],
                            segment_ids=batch['segment_ids']).logits, np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  h = -(np.exp(logp) * logp).sum(-1)
  m = batch['loss_mask']
  # Per-row sums over the trained tokens.
  np.testing.assert_allclose(np.asarray(ent), (h * m).sum(1), rtol=1e-5)
  tok = -np.take_along_axis(logp, batch['targets'][..., None], -1)[..., 0]
  np.testing.assert_allclose(np.asarray(nll), (tok * m).sum(1), rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(tokens), m.sum(1))


def _odm_metrics(nll, tokens, finite=True):
  return {'dataset_nll': jnp.asarray(nll, jnp.float32),
          'dataset_tokens': jnp.asarray(tokens, jnp.float32), 'finite': jnp.asarray(finite)}


def test_odm_exp3_over_two_steps():
  s = make_strategy(_config(strategy='odm', odm_alpha=0.9), NAMES, [10, 30])
  state = s.init_state(None, [10, 30], None)
  np.testing.assert_allclose(state.probs, [0.5, 0.5])  # eps_1 = min(1/2, sqrt(ln 2 / 2)) = 1/2
  hook = jax.jit(s.after_train_step)
  # Step 1 draws dataset a: mean loss 20/10 = 2, pi = 0.5 -> R_a = 0.1 * 2 / 0.5 = 0.4.
  state = hook(state, _odm_metrics([20.0, 0.0], [10.0, 0.0]))
  np.testing.assert_allclose(state.reward, [0.4, 0.0], rtol=1e-6)
  eps1, eps2 = 0.5, math.sqrt(math.log(2) / 4)  # 0.4163 < 1/2
  soft = np.exp([0.5 * 0.4, 0.0]) / np.exp([0.5 * 0.4, 0.0]).sum()
  pi = (1 - 2 * eps2) * soft + eps2
  np.testing.assert_allclose(state.probs, pi, rtol=1e-5)
  assert int(state.steps) == 1
  # Step 2 draws dataset b: loss 3, importance weight 1 / pi_b.
  state = hook(state, _odm_metrics([0.0, 12.0], [0.0, 4.0]))
  r = np.array([0.4, 0.1 * 3.0 / pi[1]])
  np.testing.assert_allclose(state.reward, r, rtol=1e-5)
  eps3 = math.sqrt(math.log(2) / 6)
  soft = np.exp(eps2 * r) / np.exp(eps2 * r).sum()
  np.testing.assert_allclose(state.probs, (1 - 2 * eps3) * soft + eps3, rtol=1e-5)
  np.testing.assert_allclose(s.step_rewards(state), r, rtol=1e-5)
  # A skipped (non-finite) step changes nothing.
  same = hook(state, _odm_metrics([jnp.nan, 0.0], [5.0, 0.0], finite=False))
  for x, y in zip(jax.tree.leaves(same), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_odm_exploration_rate():
  np.testing.assert_allclose(float(odm.exploration(0, 4)), 0.25)
  np.testing.assert_allclose(float(odm.exploration(1, 4)), 0.25)  # sqrt(ln 4 / 4) > 1/4
  np.testing.assert_allclose(float(odm.exploration(100, 4)), math.sqrt(math.log(4) / 400),
                             rtol=1e-6)


def test_excess_theta0_update_over_two_steps():
  s = make_strategy(_config(strategy='excess_theta0', doremi_eta=1.0, doremi_smoothing=0.1), NAMES,
                    [10, 10])
  state = s.init_state(None, [10, 10], None)
  update = jax.jit(s.make_update(None))
  valid = jnp.ones((2, 2))
  # Step 1: excess (2 - 1, 1 - 1) = (1, 0).
  state, info = update(state, {'nll': jnp.array([[2.0, 2.0], [1.0, 1.0]]),
                               'nll0': jnp.ones((2, 2)), 'valid': valid})
  a = np.array([math.e, 1.0]) / (math.e + 1)
  a = 0.9 * a + 0.05
  np.testing.assert_allclose(info['reward'], [1.0, 0.0], rtol=1e-6)
  np.testing.assert_allclose(state.weights, a, rtol=1e-6)
  # Step 2: dataset a's examples are 0.5 below and 0.5 above theta_0: clipped per example, its
  # excess is (0 + 0.5) / 2; b is 0.5 above, its invalid example (NLL 100) is left out.
  state, info = update(state, {'nll': jnp.array([[0.5, 1.5], [1.5, 100.0]]),
                               'nll0': jnp.ones((2, 2)), 'valid': jnp.array([[1, 1], [1, 0]])})
  np.testing.assert_allclose(info['reward'], [0.25, 0.5], rtol=1e-6)
  b = a * np.exp([0.25, 0.5])
  b = 0.9 * b / b.sum() + 0.05
  np.testing.assert_allclose(state.weights, b, rtol=1e-6)
  np.testing.assert_allclose(s.probs(state), b, rtol=1e-6)
  assert int(state.updates) == 2
  np.testing.assert_allclose(doremi.excess_loss(jnp.ones((1, 1)), 2 * jnp.ones((1, 1)),
                                                jnp.ones((1, 1))), [0.0])
