"""Per-device memory of the compiled train step: full fine-tuning vs LoRA vs QLoRA (AOT, no weights).

    python benchmarks/bench_lora_memory.py [--preset llama-3-8b] [--devices 8 1]
        [--batch 8] [--seq 2048] [--rank 16] [--modes full lora int4 nf4] [--json out.json]

For each device count a subprocess simulates that many CPU devices (XLA_FLAGS) and, per mode,
builds the abstract model (nnx.eval_shape; for LoRA modes qwix adds the adapters and, for
int4 / nf4, quantizes the frozen base inside the same abstract trace), lowers the project's
`sft.train_step` with the trainer's shardings on a (1, N, 1) FSDP mesh (LoRA: adapters +
AdamW in the state, the frozen base as its own argument), compiles it ahead of time and prints
`compiled.memory_analysis()` per device. Setup: bf16 parameters and compute, fp32 AdamW moments,
full remat, unscanned layers or (--scan) scanned ones, the chunked LM head.
Numbers come from the XLA:CPU compiler: treat them as estimates of what sharding and freezing
do, not as a TPU/GPU guarantee. Results: README.md, "LoRA and QLoRA".
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
import bench_memory  # pylint: disable=g-import-not-at-top,wrong-import-position
GIB = 2**30


def measure(preset: str, mode: str, batch: int, seq: int, rank: int, scan: bool = False,
            num_datasets: int = 4) -> dict:
  import jax
  import jax.numpy as jnp
  import ml_collections
  from flax import nnx

  from mos_jax import config as config_lib
  from mos_jax import models
  from mos_jax.infra import sharding
  from mos_jax.steps import sft
  from mos_jax.models import lora

  cfg = config_lib.base_config()
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1)))
  quantize = mode if mode in ('int8', 'int4', 'nf4') else 'none'
  model_config = models.get_preset(preset, dtype='bfloat16', param_dtype='bfloat16', remat='full',
                                   scan_layers=scan)
  cfg.model.lora.rank = rank

  def build():
    model = models.Decoder(model_config, rngs=nnx.Rngs(0))
    return model if mode == 'full' else lora.add_adapters(model, cfg.model.lora, quantize)
  # Split inside the abstract trace: qwix's quantized weights hold tracers there, so they are
  # state (outside it their ShapeDtypeStructs would be taken for static attributes).
  graphdef_box = []

  def split():
    parts = nnx.split(build(), *((nnx.Param,) if mode == 'full' else (nnx.LoRAParam, ...)))
    graphdef_box.append(parts[0])
    return parts[1:]
  parts = jax.eval_shape(split)
  graphdef, abstract_params = graphdef_box[0], parts[0]
  frozen = frozen_sh = None
  if mode != 'full':
    frozen = nnx.to_pure_dict(parts[1])
    frozen_sh = lora.frozen_shardings(model_config, frozen, mesh)
  param_sh = nnx.to_pure_dict(sharding.state_shardings(abstract_params, mesh))
  params = nnx.to_pure_dict(abstract_params)
  optimizer, opt_sh, state, state_sh, batch_abs = bench_memory.abstract_step_inputs(
      cfg, mesh, params, param_sh, num_datasets, batch, seq)
  replicated = sharding.replicated(mesh)
  step = jax.jit(functools.partial(sft.train_step, graphdef=graphdef, optimizer=optimizer,
                                   num_datasets=num_datasets),
                 in_shardings=(state_sh, None, frozen_sh), out_shardings=(state_sh, replicated),
                 donate_argnums=(0,))
  frozen_abs = None if frozen is None else sharding.sharded_abstract(frozen, frozen_sh)
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = step.lower(sharding.sharded_abstract(state, state_sh), batch_abs,
                          frozen_abs).compile()
  seconds = time.perf_counter() - start
  mem = compiled.memory_analysis()
  bits = lambda dtype: jnp.iinfo(dtype).bits if jnp.issubdtype(dtype, jnp.integer) else (
      jnp.finfo(dtype).bits)  # int4 / uint4 take half a byte (their itemsize says 1).
  nbytes = lambda tree: sum(x.size * bits(x.dtype) // 8 for x in jax.tree.leaves(tree))
  n = jax.device_count()
  return dict(
      preset=preset, mode=mode, rank=0 if mode == 'full' else rank, scan=scan, devices=n, batch=batch,
      seq=seq, compile_s=round(seconds, 1),
      trainable_m=round(sum(x.size for x in jax.tree.leaves(params)) / 1e6, 2),
      frozen_gib=round(nbytes(frozen or {}) / GIB, 3),
      argument_gib=round(mem.argument_size_in_bytes / GIB, 3),
      temp_gib=round(mem.temp_size_in_bytes / GIB, 3),
      peak_gib=round((mem.argument_size_in_bytes + mem.output_size_in_bytes
                      - mem.alias_size_in_bytes + mem.temp_size_in_bytes) / GIB, 3))


def run_devices(devices, args) -> list[dict]:
  rows = []
  for mode in args.modes:  # One process per measurement: compiled programs do not pile up.
    got = bench_memory.child_rows(
        __file__, ['--preset', args.preset, '--modes', mode, '--batch', str(args.batch), '--seq',
                   str(args.seq), '--rank', str(args.rank)] + (['--scan'] if args.scan else []),
        devices, args.timeout)
    for r in got:
      print(json.dumps(r), flush=True)
    rows += got
  return rows


def table(rows) -> str:
  lines = ['| mode | layers | devices | trainable (M) | frozen base (GiB, total) | arguments/device (GiB) | '
           'temp/device (GiB) | peak/device (GiB) | compile (s) |', '|' + '---|' * 9]
  names = {'full': 'full fine-tuning', 'lora': 'LoRA r={rank}', 'int8': 'QLoRA int8 r={rank}',
           'int4': 'QLoRA int4 r={rank}', 'nf4': 'QLoRA nf4 r={rank}'}
  for r in rows:
    lines.append(f"| {names[r['mode']].format(rank=r['rank'])} | "
                 f"{'scanned' if r.get('scan') else 'unscanned'} | {r['devices']} | "
                 f"{r['trainable_m']} | {r['frozen_gib']} | {r['argument_gib']} | {r['temp_gib']} | "
                 f"{r['peak_gib']} | {r['compile_s']} |")
  return '\n'.join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--preset', default='llama-3-8b')
  p.add_argument('--devices', nargs='+', type=int, default=[8, 1])
  p.add_argument('--modes', nargs='+', default=['full', 'lora', 'int4', 'nf4'])
  p.add_argument('--batch', type=int, default=8, help='global batch (rows)')
  p.add_argument('--seq', type=int, default=2048, help='tokens per row')
  p.add_argument('--rank', type=int, default=16)
  p.add_argument('--timeout', type=float, default=3600, help='seconds per measurement')
  p.add_argument('--json', default='', help='also write the rows here')
  p.add_argument('--scan', action='store_true',
                  help='scanned layers (the default of model.scan_layers)')
  p.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    for mode in args.modes:
      print(json.dumps(measure(args.preset, mode, args.batch, args.seq, args.rank, args.scan)),
            flush=True)
    return
  rows = []
  for devices in args.devices:
    rows += run_devices(devices, args)
  bench_memory.report(rows, table(rows), args.json)


if __name__ == '__main__':
  main()
