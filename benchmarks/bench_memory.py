"""Per-device memory of the compiled train step under FSDP, without weights or accelerators.

    python benchmarks/bench_memory.py [--presets qwen1.5-0.5b gemma-2b llama-3-8b]
        [--devices 8 16 64] [--batch 64] [--seq 1024 2048] [--remat recipe] [--loss-chunk 256]
        [--json out.json]

For each device count a subprocess simulates that many CPU devices (XLA_FLAGS), builds the
abstract model (eval_shape), lowers the project's `steps.sft.train_step` (forward, backward, AdamW)
with the parameter / optimizer-state / batch shardings of `mos_jax.infra.sharding` on a (1, N, 1)
mesh, compiles it ahead of time and prints `compiled.memory_analysis()` per device.
Setup: bf16 parameters and compute, fp32 AdamW moments, scanned layers, each preset's remat
policy in the paper recipes (`--remat recipe`; or one policy name for all), the chunked LM head +
loss (`--loss-chunk`, 0 = one chunk); the decoder pins its activations to batch sharding
(`sharding.constrain`). Attention is the XLA path by default (the only one XLA:CPU compiles
natively): it holds [rows, heads, L, L] scores that the GPU/TPU kernels do not; `--attention
splash` compiles the splash kernel in Pallas interpret mode instead (a loop over tiles), which
estimates the kernels' footprint.
Results and their reading: README.md, "Memory per device".
Numbers come from the XLA:CPU compiler: its buffer assignment (and how it lowers bf16) is not
the TPU's or GPU's, so treat them as estimates of what the sharding does, not as a guarantee.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2**30


def fp32_state(optimizer):
  """The same optimizer, its state kept in float32 while the parameters are bf16."""
  import jax
  import jax.numpy as jnp
  import optax
  return optax.GradientTransformation(
      lambda params: optimizer.init(jax.tree.map(lambda p: p.astype(jnp.float32), params)),
      optimizer.update)


RECIPE_REMAT = {'qwen1.5-0.5b': 'save_dots_no_batch', 'gemma-2b': 'full', 'llama-3-8b': 'full'}


def abstract_step_inputs(cfg, mesh, params, param_sh, num_datasets: int, batch: int, seq: int):
  """(optimizer, its state shardings, abstract TrainState, its shardings, abstract batch) of the
  train step over abstract `params` on `mesh`: everything AOT compilation needs, no memory."""
  import jax
  import jax.numpy as jnp

  from mos_jax import mixing
  from mos_jax.infra import sharding
  from mos_jax.steps import state as state_lib

  optimizer = fp32_state(state_lib.make_optimizer(cfg.train))
  opt_sh = sharding.opt_state_shardings(optimizer, params, param_sh, mesh)
  replicated = sharding.replicated(mesh)
  mixing_state = jax.eval_shape(
      lambda: mixing.init_mixing_state(cfg.mixing, [1000] * num_datasets, jax.random.key(0)))
  scalar = jax.ShapeDtypeStruct((), jnp.int32)
  state = state_lib.TrainState(step=scalar, params=params,
                               opt_state=jax.eval_shape(optimizer.init, params),
                               mixing=mixing_state, bad_steps=scalar, skipped_steps=scalar)
  state_sh = state_lib.TrainState(step=replicated, params=param_sh, opt_state=opt_sh,
                                  mixing=jax.tree.map(lambda _: replicated, mixing_state),
                                  bad_steps=replicated, skipped_steps=replicated)
  row = lambda dtype: jax.ShapeDtypeStruct((batch, seq), dtype, sharding=sharding.batch_sharding(mesh))
  vec = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sharding.batch_sharding(mesh, 1))
  batch_abs = dict(tokens=row(jnp.int32), targets=row(jnp.int32), loss_mask=row(jnp.float32),
                   positions=row(jnp.int32), segment_ids=row(jnp.int32), dataset_ids=vec,
                   example_ids=vec)
  return optimizer, opt_sh, state, state_sh, batch_abs


def measure(preset: str, batch: int, seq: int, num_datasets: int = 4, remat: str = 'recipe',
            loss_chunk: int = 256, attention: str = 'xla') -> dict:
  """Lowers and compiles one train step for `preset` on all local devices; memory per device."""
  import jax
  import ml_collections
  from flax import nnx

  from mos_jax import config as config_lib
  from mos_jax import models
  from mos_jax.infra import sharding
  from mos_jax.steps import sft

  cfg = config_lib.base_config()
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1)))
  remat = RECIPE_REMAT.get(preset, 'full') if remat == 'recipe' else remat
  model_config = models.get_preset(preset, dtype='bfloat16', param_dtype='bfloat16', remat=remat,
                                   scan_layers=True, attention_impl=attention, loss_chunk=loss_chunk)
  abstract_model = nnx.eval_shape(lambda: models.Decoder(model_config, rngs=nnx.Rngs(0)))
  graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
  param_sh = nnx.to_pure_dict(sharding.state_shardings(abstract_params, mesh))
  params = nnx.to_pure_dict(abstract_params)
  optimizer, opt_sh, state, state_sh, batch_abs = abstract_step_inputs(
      cfg, mesh, params, param_sh, num_datasets, batch, seq)
  replicated = sharding.replicated(mesh)
  # Nothing large may fall back to replication: that would make the numbers meaningless.
  unsharded = sharding.unsharded_large_params(
      sharding.sharded_abstract((params, state.opt_state), (param_sh, opt_sh)), min_size=2**20)

  step = jax.jit(functools.partial(sft.train_step, graphdef=graphdef, optimizer=optimizer,
                                   num_datasets=num_datasets),
                 in_shardings=(state_sh, None), out_shardings=(state_sh, replicated),
                 donate_argnums=(0,))
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = step.lower(sharding.sharded_abstract(state, state_sh), batch_abs).compile()
  seconds = time.perf_counter() - start
  mem = compiled.memory_analysis()
  n = jax.device_count()
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  opt_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.opt_state))
  return dict(
      preset=preset, devices=n, batch=batch, seq=seq, remat=remat, loss_chunk=loss_chunk,
      attention=attention,
      compile_s=round(seconds, 1),
      params_b=round(models.param_count(model_config) / 1e9, 3),
      ideal_state_gib=round((param_bytes + opt_bytes) / n / GIB, 3),
      argument_gib=round(mem.argument_size_in_bytes / GIB, 3),
      output_gib=round(mem.output_size_in_bytes / GIB, 3),
      alias_gib=round(mem.alias_size_in_bytes / GIB, 3),
      temp_gib=round(mem.temp_size_in_bytes / GIB, 3),
      peak_gib=round((mem.argument_size_in_bytes + mem.output_size_in_bytes
                      - mem.alias_size_in_bytes + mem.temp_size_in_bytes) / GIB, 3),
      unsharded=unsharded)


def child_rows(script: str, child_args, devices: int, timeout: float) -> list[dict]:
  """The JSON rows `script --child ...` prints on `devices` simulated CPU devices, in its own
  process: XLA_FLAGS must be set before jax starts (and compiled programs do not pile up)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT,
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  proc = subprocess.run([sys.executable, os.path.abspath(script), '--child', *child_args],
                        env=env, capture_output=True, text=True, timeout=timeout)
  rows = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith('{')]
  if proc.returncode or not rows:
    print(proc.stderr[-3000:], file=sys.stderr)
  return rows


def report(rows, table_text: str, json_path: str) -> None:
  """Prints the table; with a path, also writes the rows there as JSON."""
  print(table_text)
  if json_path:
    with open(json_path, 'w') as f:
      json.dump(rows, f, indent=1)


def run_devices(devices: int, presets, batch: int, seqs, timeout: float, remat: str,
                loss_chunk: int, attention: str) -> list[dict]:
  """One subprocess per device count."""
  return child_rows(__file__, ['--presets', *presets, '--batch', str(batch), '--seq',
                               *map(str, seqs), '--remat', remat, '--loss-chunk', str(loss_chunk),
                               '--attention', attention], devices, timeout)


def table(rows) -> str:
  head = ('| preset | params (B) | devices | batch x seq | remat | attention | '
          'state/device, ideal (GiB) | arguments (GiB) | temp (GiB) | peak (GiB) | compile (s) |')
  lines = [head, '|' + '---|' * 11]
  for r in rows:
    lines.append(f"| {r['preset']} | {r['params_b']} | {r['devices']} | {r['batch']} x {r['seq']} "
                 f"| {r['remat']} | {r.get('attention', 'xla')} | {r['ideal_state_gib']} | {r['argument_gib']} | "
                 f"{r['temp_gib']} | {r['peak_gib']} | {r['compile_s']} |")
  return '\n'.join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--presets', nargs='+', default=['qwen1.5-0.5b', 'gemma-2b', 'llama-3-8b'])
  p.add_argument('--devices', nargs='+', type=int, default=[8, 16, 64])
  p.add_argument('--batch', type=int, default=64, help='global batch (rows)')
  p.add_argument('--seq', type=int, nargs='+', default=[1024], help='tokens per row')
  p.add_argument('--remat', default='recipe', help="'recipe' (each preset's) or a policy name")
  p.add_argument('--loss-chunk', type=int, default=256, help='positions per loss chunk (0 = all)')
  p.add_argument('--attention', default='xla',
                 help="attention_impl: 'xla', or 'splash' (Pallas interpret mode on CPU: no L x L "
                      "scores, as on the accelerators)")
  p.add_argument('--timeout', type=float, default=3600, help='seconds per device count')
  p.add_argument('--json', default='', help='also write the rows here')
  p.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    for preset in args.presets:
      for seq in args.seq:
        print(json.dumps(measure(preset, args.batch, seq, remat=args.remat,
                                 loss_chunk=args.loss_chunk, attention=args.attention)),
              flush=True)
    return
  rows = []
  for devices in args.devices:
    rows += run_devices(devices, args.presets, args.batch, args.seq, args.timeout, args.remat,
                        args.loss_chunk, args.attention)
  report(rows, table(rows), args.json)


if __name__ == '__main__':
  main()
