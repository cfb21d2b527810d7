"""Table 2's rivals (MultiDDS, MultiUAT) run without MoS's EMA unless mixing.rival_ema asks for
it; MoS keeps mixing.ema; `compare --list` names the setting each row runs with."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mos_jax.config import base_config
from mos_jax.experiments import comparison
from mos_jax.mixing import make_strategy

NAMES = ('a', 'b')


def _mixing(**overrides):
  c = base_config().mixing
  c.update(overrides)
  return c


def _reward_after_one_update(config):
  strategy = make_strategy(config, NAMES, [10, 10])
  state = strategy.init_state(config, [10, 10], jax.random.key(0))
  signal = {'multidds': {'grad_cos': jnp.array([0.2, -0.4])},
            'multiuat': {'dev_entropy': jnp.array([0.2, -0.4])},
            'mos': {'embeddings': jnp.array([[1.0, 0.0], [0.0, 1.0]])}}[config.strategy]
  _, info = jax.jit(strategy.make_update(config))(state, signal)
  return np.asarray(info['raw_reward']), np.asarray(info['reward'])


@pytest.mark.parametrize('name', ['multidds', 'multiuat'])
def test_rivals_take_raw_rewards_by_default_and_smooth_on_request(name):
  config = _mixing(strategy=name)
  assert config.ema  # MoS's default stays on; it does not reach the rivals.
  raw, used = _reward_after_one_update(config)
  np.testing.assert_allclose(used, raw)
  raw, used = _reward_after_one_update(_mixing(strategy=name, rival_ema=True, ema=False))
  np.testing.assert_allclose(used, 0.9 * raw + 0.1 * 1.0, rtol=1e-6)  # Eq. 11, memory at 1.


def test_mos_keeps_its_ema():
  raw, used = _reward_after_one_update(_mixing(strategy='mos', reward='cossim'))
  np.testing.assert_allclose(used, 0.9 * raw + 0.1, rtol=1e-6)
  raw, used = _reward_after_one_update(_mixing(strategy='mos', reward='cossim', ema=False,
                                               rival_ema=True))
  np.testing.assert_allclose(used, raw)


def test_compare_rows_name_the_rivals_ema():
  listing = comparison.describe().splitlines()
  for name in ('multidds', 'multiuat'):
    assert comparison.STRATEGIES[name]['mixing.rival_ema'] is False
    line, = [l for l in listing if l.split()[0] == name]
    assert '--config.mixing.rival_ema=False' in line
  runs = comparison.plan('configs/demo.py', ['--config.mixing.rival_ema=True'], ['multidds'],
                         [0], '/tmp/unused')
  argv = runs[0].argv
  # The row's own setting comes after the user's and wins.
  assert argv.index('--config.mixing.rival_ema=False') > argv.index(
      '--config.mixing.rival_ema=True')
