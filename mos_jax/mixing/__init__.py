"""MoS data mixing: the q_tau prior, the scorer psi, the rewards and the strategies around them."""

from mos_jax.mixing import rewards
from mos_jax.mixing import scorer
from mos_jax.mixing.prior import prior_probs
from mos_jax.mixing.scorer import loss as scorer_loss
from mos_jax.mixing.scorer import probs
from mos_jax.mixing.state import MixingState
from mos_jax.mixing.state import init_mixing_state
from mos_jax.mixing.state import make_update_fn
from mos_jax.mixing.state import update_mixing
from mos_jax.mixing.strategies import Strategy
from mos_jax.mixing.strategies import compute_rewards
from mos_jax.mixing.strategies import make_strategy

__all__ = [
    'MixingState', 'Strategy', 'compute_rewards', 'init_mixing_state', 'make_strategy',
    'make_update_fn', 'prior_probs', 'probs', 'rewards', 'scorer', 'scorer_loss', 'update_mixing',
]
