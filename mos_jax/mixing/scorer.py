"""The scorer psi (Sec. 3.1): a distribution over datasets, as a pure-functional params dict.

The paper's scorer is a 2-layer MLP whose input says which datasets are available (all of them,
so an all-ones vector [N]); the authors' released code uses one free logit per dataset. Both are
here: `hidden > 0` builds the MLP, `hidden == 0` the logit vector. Either starts exactly at the
prior q_tau: the last layer's weights are zero and its bias is log q_tau.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Params = dict[str, Any]


def init(num_datasets: int, prior, hidden: int, key: jax.Array) -> Params:
  """Params whose softmax is exactly `prior` [N]; `key` draws the hidden layer (hidden > 0)."""
  prior = np.asarray(prior, np.float64)
  if prior.shape != (num_datasets,):
    raise ValueError(f'scorer.init: prior has shape {prior.shape}, expected ({num_datasets},).')
  if np.any(prior <= 0):
    raise ValueError(f'scorer.init: prior probabilities must be > 0, got {prior}.')
  if hidden < 0:
    raise ValueError(f'scorer.init: hidden must be >= 0 (0 = one logit per dataset), got {hidden}.')
  bias = jnp.asarray(np.log(prior), jnp.float32)
  if hidden == 0:
    return {'logits': bias}
  # Scale 1/sqrt(N) keeps the pre-activations of the all-ones input at unit variance.
  w1 = jax.random.normal(key, (num_datasets, hidden), jnp.float32) / np.sqrt(num_datasets)
  return {
      'hidden': {'w': w1, 'b': jnp.zeros((hidden,), jnp.float32)},
      'out': {'w': jnp.zeros((hidden, num_datasets), jnp.float32), 'b': bias},
  }


def logits(params: Params) -> jax.Array:
  """Unnormalised log-probabilities [N]."""
  if 'logits' in params:
    return params['logits']
  available = jnp.ones((params['hidden']['w'].shape[0],), jnp.float32)  # every dataset is usable
  # tanh, not relu: with a constant input a relu unit that starts negative never recovers.
  h = jnp.tanh(available @ params['hidden']['w'] + params['hidden']['b'])  # [H]
  return h @ params['out']['w'] + params['out']['b']  # [N]


def probs(params: Params, min_prob: float = 0.0) -> jax.Array:
  """Sampling probabilities [N]: p = (1 - N * min_prob) * softmax(logits) + min_prob.

  The floor keeps every dataset drawable (each p_i >= min_prob) and the result still sums to 1.
  It only shapes sampling: the scorer loss uses the unfloored softmax.
  """
  z = logits(params)
  n = z.shape[-1]
  min_prob = float(min_prob)
  if min_prob < 0 or n * min_prob > 1:
    raise ValueError(f'min_prob must be in [0, 1/N] = [0, {1 / n:.6g}] for N={n} datasets, '
                     f'got {min_prob}.')
  p = jax.nn.softmax(z)
  if min_prob == 0.0:
    return p
  return (1.0 - n * min_prob) * p + min_prob


def loss(params: Params, rewards: jax.Array) -> jax.Array:
  """Eq. 6 as a loss: -sum_i R_i log p_psi(i), the exact expectation over all N datasets.

  Minimising it with gradient descent is the update psi += sum_i R_i grad log p_psi(i); with
  respect to the logits its gradient is -(R - p * sum(R)). Rewards are constants here.
  """
  rewards = jax.lax.stop_gradient(jnp.asarray(rewards, jnp.float32))
  return -jnp.sum(rewards * jax.nn.log_softmax(logits(params)))
