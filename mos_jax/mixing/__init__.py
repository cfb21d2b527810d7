"""Data mixing: the q_tau prior, the scorer psi, the rewards, and every strategy behind one interface
(base.Strategy; one file per strategy family, found by make_strategy)."""

from mos_jax.mixing import rewards
from mos_jax.mixing import scorer
from mos_jax.mixing.prior import prior_probs
from mos_jax.mixing.scorer import loss as scorer_loss
from mos_jax.mixing.scorer import probs
from mos_jax.mixing.state import MixingState
from mos_jax.mixing.state import init_mixing_state
from mos_jax.mixing.state import make_update_fn
from mos_jax.mixing.state import update_mixing
from mos_jax.mixing.base import Strategy
from mos_jax.mixing.strategies import compute_rewards
from mos_jax.mixing.strategies import make_strategy
from mos_jax.mixing.strategies import strategy_names

__all__ = [
    'MixingState', 'Strategy', 'compute_rewards', 'init_mixing_state', 'make_strategy',
    'make_update_fn', 'prior_probs', 'probs', 'rewards', 'scorer', 'scorer_loss', 'strategy_names', 'update_mixing',
]
