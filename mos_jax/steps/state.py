"""The train state: parameters, AdamW and its schedule, the strategy's mixing state, and the
layout (shardings) a run's state lives on at step 0.

`initial_state` places every part on its shardings as it is made (the optimizer state through
`jit(optimizer.init, out_shardings=...)`), so no unsharded copy of a large model ever exists.
Shared by training (build, resume) and by reading another run's checkpoint (workdir.restore).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mos_jax.infra import sharding
from mos_jax.models import lora


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken (skipped ones included).
  params: Any  # Pure dict of the trained backbone parameters (with LoRA: the adapters only).
  opt_state: Any  # AdamW state over params.
  mixing: Any  # mos_jax.mixing.MixingState: scorer, its Adam state, EMA rewards.
  bad_steps: jax.Array  # int32 scalar: non-finite updates in a row.
  skipped_steps: jax.Array  # int32 scalar: non-finite updates skipped in total.


def make_optimizer(train_config) -> optax.GradientTransformation:
  """AdamW with linear warm-up then linear decay to 0, and optional global-norm clipping."""
  steps = int(train_config.steps)
  warmup = int(round(train_config.warmup_fraction * steps))
  schedule = optax.join_schedules(
      [optax.linear_schedule(0.0, train_config.lr, max(warmup, 1)),
       optax.linear_schedule(train_config.lr, 0.0, max(steps - warmup, 1))], [warmup])
  parts = []
  if train_config.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(train_config.grad_clip))
  parts.append(optax.adamw(schedule, b1=train_config.b1, b2=train_config.b2,
                           weight_decay=train_config.weight_decay))
  return optax.chain(*parts)


def learning_rate(train_config, step):
  """The schedule's value at `step`, for logging."""
  steps = int(train_config.steps)
  warmup = int(round(train_config.warmup_fraction * steps))
  if step < warmup:
    return train_config.lr * step / max(warmup, 1)
  return train_config.lr * max(0.0, 1.0 - (step - warmup) / max(steps - warmup, 1))


def merge(graphdef, params, frozen=None):
  """The model from its trained parameters and (with LoRA) the frozen base they adapt."""
  return nnx.merge(graphdef, params, frozen) if frozen else nnx.merge(graphdef, params)


def initial_state(config, model, sizes, mesh, strategy):
  """The train state at step 0 on its shardings: parameters, AdamW, the strategy's start.

  With LoRA the state's params are the adapters; the frozen base comes back separately (pure
  dict, as loaded: on the rule table's shardings), else as None.
  """
  if lora.enabled(config.model):
    graphdef, param_state, frozen_state = nnx.split(model, nnx.LoRAParam, ...)
    frozen = nnx.to_pure_dict(frozen_state)  # A quantized base's arrays land on the rule table too.
    frozen = jax.device_put(frozen, lora.frozen_shardings(model.config, frozen, mesh))
  else:
    (graphdef, param_state), frozen = nnx.split(model, nnx.Param), None
  param_shardings = nnx.to_pure_dict(sharding.state_shardings(param_state, mesh))
  params = jax.device_put(nnx.to_pure_dict(param_state), param_shardings)
  replicated = sharding.replicated(mesh)
  with jax.set_mesh(mesh):
    optimizer = make_optimizer(config.train)
    opt_shardings = sharding.opt_state_shardings(optimizer, params, param_shardings, mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
    mixing_state = jax.device_put(
        strategy.init_state(config.mixing, sizes, jax.random.key(config.seed + 1)),
        replicated)
  zero = lambda: jax.device_put(jnp.zeros((), jnp.int32), replicated)  # Distinct buffers:
  state = TrainState(step=zero(), params=params, opt_state=opt_state,  # all are donated.
                     mixing=mixing_state, bad_steps=zero(), skipped_steps=zero())
  state_shardings = TrainState(
      step=replicated, params=param_shardings, opt_state=opt_shardings,
      mixing=jax.tree.map(lambda _: replicated, mixing_state), bad_steps=replicated,
      skipped_steps=replicated)
  return graphdef, state, state_shardings, optimizer, frozen
