"""Step time of LoRA vs full fine-tuning on the demo-size model (CPU), as a ratio.

    python benchmarks/bench_lora_step.py [--preset tiny] [--rank 8] [--batch 16] [--seq 128]
        [--rounds 5] [--steps 10]

Jits the project's `sft.train_step` twice on one device — all parameters trained, and qwix
LoRA adapters trained over the frozen base — and times `--steps` steps of each, alternating the
two for `--rounds` rounds so that load from other processes hits both alike; prints the median
seconds per step and the ratio LoRA / full. Scanned layers for both (model.scan_layers' default).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mos_jax import config as config_lib
from mos_jax import models
from mos_jax.steps import sft
from mos_jax.steps import state as state_lib
from mos_jax.models import lora


def make_step(model, train_config, use_lora: bool):
  if use_lora:
    graphdef, params, frozen = nnx.split(model, nnx.LoRAParam, ...)
    frozen = nnx.to_pure_dict(frozen)
  else:
    (graphdef, params), frozen = nnx.split(model, nnx.Param), None
  params = jax.tree.map(jnp.copy, nnx.to_pure_dict(params))  # Own buffers: the state is donated.
  optimizer = state_lib.make_optimizer(train_config)
  zero = lambda: jnp.zeros((), jnp.int32)
  state = state_lib.TrainState(step=zero(), params=params, opt_state=optimizer.init(params), mixing=(),
                           bad_steps=zero(), skipped_steps=zero())
  fn = jax.jit(functools.partial(sft.train_step, graphdef=graphdef, optimizer=optimizer,
                                 num_datasets=1), donate_argnums=(0,))
  return fn, state, frozen


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--preset', default='tiny')
  p.add_argument('--rank', type=int, default=8)
  p.add_argument('--batch', type=int, default=16)
  p.add_argument('--seq', type=int, default=128)
  p.add_argument('--rounds', type=int, default=5)
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--only', choices=('both', 'lora', 'full'), default='both',
                 help="'lora' for models whose full fine-tuning does not fit the device")
  p.add_argument('--dtype', default='float32', help='compute and parameter dtype')
  args = p.parse_args()
  cfg = config_lib.base_config()
  cfg.train.steps = 1000
  model = models.init_model(models.get_preset(args.preset, scan_layers=True, dtype=args.dtype,
                                              param_dtype=args.dtype), seed=0)
  lora_config = ml_collections.ConfigDict(dict(rank=args.rank, alpha=16.0, dropout=0.0,
                                               targets=cfg.model.lora.targets))
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, model.config.vocab_size, (args.batch, args.seq)).astype(np.int32)
  batch = dict(tokens=tokens, targets=np.roll(tokens, -1, 1),
               loss_mask=np.ones(tokens.shape, np.float32),
               positions=np.broadcast_to(np.arange(args.seq, dtype=np.int32), tokens.shape).copy(),
               segment_ids=np.ones(tokens.shape, np.int32),
               dataset_ids=np.zeros(args.batch, np.int32), example_ids=np.arange(args.batch))
  batch = jax.tree.map(jnp.asarray, batch)
  runs = {}
  if args.only in ('both', 'full'):
    runs['full'] = make_step(model, cfg.train, False)
  if args.only in ('both', 'lora'):
    runs['lora'] = make_step(lora.add_adapters(model, lora_config), cfg.train, True)
  states = {k: v[1] for k, v in runs.items()}
  times = {k: [] for k in runs}
  for name, (fn, _, frozen) in runs.items():  # Compile and warm up.
    states[name], m = fn(states[name], batch, frozen)
    jax.block_until_ready(m)
  for _ in range(args.rounds):
    for name, (fn, _, frozen) in runs.items():
      start = time.perf_counter()
      for _ in range(args.steps):
        states[name], m = fn(states[name], batch, frozen)
      jax.block_until_ready((states[name], m))
      times[name].append((time.perf_counter() - start) / args.steps)
  med = {k: statistics.median(v) for k, v in times.items()}
  print(f'preset={args.preset} rank={args.rank} batch={args.batch}x{args.seq} dtype={args.dtype} '
        f'device={jax.devices()[0].device_kind}')
  for name, seconds in med.items():
    print(f'{name}: {seconds * 1e3:.1f} ms/step, {args.batch * args.seq / seconds:,.0f} tokens/s')
  if len(med) == 2:
    print(f"ratio lora/full: {med['lora'] / med['full']:.2f}")


if __name__ == '__main__':
  main()
