"""The scorer update: it moves p towards rewarded datasets, keeps the EMA, and is a jit pytree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mos_jax.config import base_config
from mos_jax.mixing import MixingState, init_mixing_state, make_update_fn, scorer

SIZES = [1000, 2000, 3000, 4000]
FAVOUR_FIRST = jnp.array([2.0, 1.0, 1.0, 1.0])


def _config(**overrides):
  c = base_config().mixing
  c.ema = False
  c.update(overrides)
  return c


def _run(config, rewards_seq):
  state = init_mixing_state(config, SIZES, jax.random.key(0))
  update = jax.jit(make_update_fn(config))
  infos = []
  for r in rewards_seq:
    state, info = update(state, jnp.asarray(r, jnp.float32))
    infos.append(info)
  return state, infos


@pytest.mark.parametrize('hidden', [0, 16])
def test_rewarded_dataset_gains_probability(hidden):
  config = _config(scorer_hidden=hidden)  # released defaults: 200 inner steps, lr 1e-4, uniform
  state, (info,) = _run(config, [FAVOUR_FIRST])
  p = np.asarray(info['probs'])
  np.testing.assert_allclose(p, scorer.probs(state.params), rtol=1e-6)
  assert p[0] > 0.25 + 0.005, p  # noticeable: +0.0075 (logits), +0.08 (MLP, hidden 16)
  np.testing.assert_allclose(p[1:], p[1], rtol=1e-5)  # the others stay tied
  assert int(state.updates) == 1


def test_inner_steps_matter():
  _, (one,) = _run(_config(inner_steps=1), [FAVOUR_FIRST])
  _, (many,) = _run(_config(inner_steps=200), [FAVOUR_FIRST])
  gain_one = float(one['probs'][0]) - 0.25
  gain_many = float(many['probs'][0]) - 0.25
  assert 0 < gain_one < 1e-4
  assert gain_many > 50 * gain_one


def test_ema_state_over_two_updates():
  config = _config(ema=True, ema_alpha=0.9)
  state, infos = _run(config, [[3.0, 0.0, 1.0, 1.0], [1.0, 2.0, 1.0, 1.0]])
  np.testing.assert_allclose(infos[0]['reward'], [2.8, 0.1, 1.0, 1.0], rtol=1e-6)
  np.testing.assert_allclose(infos[1]['reward'], [1.18, 1.81, 1.0, 1.0], rtol=1e-6)
  np.testing.assert_allclose(state.prev_reward, [1.18, 1.81, 1.0, 1.0], rtol=1e-6)
  np.testing.assert_allclose(state.last_reward, [1.0, 2.0, 1.0, 1.0])
  assert int(state.updates) == 2


def test_without_ema_the_raw_reward_is_used():
  state, (info,) = _run(_config(ema=False), [[3.0, 0.0, 1.0, 1.0]])
  np.testing.assert_allclose(info['reward'], [3.0, 0.0, 1.0, 1.0])


def test_normalisation_removes_the_pull_of_equal_rewards():
  # Without a baseline, equal positive rewards still push a non-uniform p towards uniform
  # (grad = -R (1 - N p)); standardised rewards are all 0 and leave p where it is.
  equal = [[1.0, 1.0, 1.0, 1.0]]
  prior = np.array(SIZES) / sum(SIZES)
  _, (raw,) = _run(_config(prior_temperature=1.0), equal)
  _, (norm,) = _run(_config(prior_temperature=1.0, normalize_rewards=True), equal)
  assert float(raw['probs'][0]) > prior[0] + 1e-3
  np.testing.assert_allclose(norm['probs'], prior, rtol=1e-5)


def test_update_applies_min_prob_to_reported_probs():
  _, (info,) = _run(_config(min_prob=0.1), [FAVOUR_FIRST])
  _, (free,) = _run(_config(), [FAVOUR_FIRST])
  np.testing.assert_allclose(info['probs'], 0.6 * np.asarray(free['probs']) + 0.1, rtol=1e-6)


def test_static_update_changes_nothing():
  config = _config(strategy='static', prior_temperature=1.0)
  state, (info,) = _run(config, [FAVOUR_FIRST])
  np.testing.assert_allclose(info['probs'], np.array(SIZES) / sum(SIZES), rtol=1e-6)
  assert int(state.updates) == 0


def test_state_is_a_pytree_and_a_jit_argument():
  state = init_mixing_state(_config(scorer_hidden=4), SIZES, jax.random.key(0))
  leaves, treedef = jax.tree.flatten(state)
  assert len(leaves) > 5
  rebuilt = jax.tree.unflatten(treedef, leaves)
  assert isinstance(rebuilt, MixingState)
  doubled = jax.jit(lambda s: jax.tree.map(lambda x: x * 2, s))(state)
  np.testing.assert_allclose(doubled.prev_reward, 2 * np.ones(4))
  assert isinstance(doubled, MixingState)


@pytest.mark.parametrize('key,value', [('inner_steps', 0), ('ema_alpha', 1.5), ('scorer_lr', 0.0)])
def test_update_fn_rejects_bad_settings(key, value):
  with pytest.raises(ValueError, match=key):
    make_update_fn(_config(**{key: value}))
