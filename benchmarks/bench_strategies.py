"""Per-strategy cost: step-time overhead over static (real loop) and MultiDDS's reward-step memory.

    python benchmarks/bench_strategies.py overhead [--config configs/demo.py] [--windows 3] [--repeats 2]
    python benchmarks/bench_strategies.py memory [--preset qwen1.5-0.5b] [--rows 1] [--seq 128]

overhead: every strategy runs the real training loop (`mos_jax.training`) in this one process with
`log_every = update_every`, so each logged window of S steps holds exactly one reward step; the
first window (compiles) is dropped, strategies alternate over `--repeats` rounds (each round
starts with the next strategy), and the median
seconds per step is printed as a ratio to static's.
memory: lowers MultiDDS's reward step (`reward_lib.signal_step` with the `grad_cos` signal) for a
preset (bf16 by default) on one CPU device and compiles it ahead of time; its temporary memory is
compared with that of one plain backward pass over one chunk of the same rows (activations only:
its gradient is an output) in units of the model's gradient size. The design bound is 2 gradient-sized buffers (the
dev gradient, then one dataset's gradient at a time). XLA:CPU buffer assignment, not a TPU/GPU's.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

VARIANTS = {
    'static': {'strategy': 'static'},
    'mos_diff': {'strategy': 'mos', 'reward': 'diff'},
    'mos_cossim': {'strategy': 'mos', 'reward': 'cossim'},
    'multidds': {'strategy': 'multidds'},
    'multiuat': {'strategy': 'multiuat'},
    'odm': {'strategy': 'odm'},
    'excess_theta0': {'strategy': 'excess_theta0'},  # doremi's cost without a reference run
}


def overhead(args):
  from mos_jax.infra import cli
  from mos_jax.workdir import metrics as metrics_lib
  from mos_jax.training import run as trainer
  import jax
  base = cli.load_config(args.config)
  every = base.mixing.update_every
  base.train.steps = every * (args.windows + 1)
  base.train.log_every = every
  base.train.eval_every = 0
  base.train.checkpoint_every = 0
  base.train.progress_bar = False
  times = {k: [] for k in VARIANTS}
  names = list(VARIANTS)
  for r in range(args.repeats):
    for name in names[r % len(names):] + names[:r % len(names)]:  # rotate who runs first
      mixing = VARIANTS[name]
      c = copy.deepcopy(base)
      c.mixing.update(mixing)
      with tempfile.TemporaryDirectory() as workdir:
        trainer.train(trainer.build(c, workdir))
        rows = metrics_lib.read_metrics(f'{workdir}/metrics.jsonl')
      timed = [r['perf/step_s'] for r in rows if 'perf/step_s' in r][1:]
      times[name].append(statistics.median(timed))
  step_s = {k: statistics.median(v) for k, v in times.items()}
  out = {'device': jax.devices()[0].device_kind, 'config': args.config, 'update_every': every,
         'step_s': step_s, 'ratio_to_static': {k: v / step_s['static'] for k, v in step_s.items()}}
  print(json.dumps(out, indent=1))
  print('| strategy | s/step | ratio to static |\n|---|---|---|')
  for k in VARIANTS:
    print(f'| {k} | {step_s[k]:.4f} | {out["ratio_to_static"][k]:.2f} |')


def memory(args):
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from mos_jax import models
  from mos_jax.steps import sft
  from mos_jax.steps import reward as reward_lib
  n = args.datasets
  cfg = models.get_preset(args.preset, dtype=args.dtype, param_dtype=args.dtype, remat=True,
                          scan_layers=True)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: models.Decoder(cfg, rngs=nnx.Rngs(0))),
                                 nnx.Param)
  params = nnx.to_pure_dict(abstract)
  grad_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))

  def batch(rows):
    m = lambda dt: jax.ShapeDtypeStruct((rows, args.seq), dt)
    return dict(tokens=m(jnp.int32), targets=m(jnp.int32), loss_mask=m(jnp.float32),
                positions=m(jnp.int32), segment_ids=m(jnp.int32),
                dataset_ids=jax.ShapeDtypeStruct((rows,), jnp.int32),
                example_ids=jax.ShapeDtypeStruct((rows,), jnp.int32))

  rows = args.rows * n
  mask = reward_lib.gradient_mask(params, args.grad_params)
  dds = jax.jit(functools.partial(reward_lib.signal_step, reference_params=None, graphdef=graphdef,
                                  num_datasets=n, signals={'grad_cos'}, grad_mask=mask))
  dds_mem = dds.lower(params, batches={'train': batch(rows), 'dev': batch(rows)}).compile(
      ).memory_analysis()
  one = jax.jit(jax.grad(lambda p, b: sft.sum_loss(p, graphdef, b, n)[0]))
  one_mem = one.lower(params, batch(args.rows)).compile().memory_analysis()  # one chunk
  gib = 2**30
  extra = (dds_mem.temp_size_in_bytes - one_mem.temp_size_in_bytes) / grad_bytes
  out = {'preset': args.preset, 'dtype': args.dtype, 'rows_per_dataset': args.rows,
         'datasets': n, 'seq': args.seq, 'grad_params': args.grad_params or '(all)',
         'gradient_gib': round(grad_bytes / gib, 3),
         'multidds_temp_gib': round(dds_mem.temp_size_in_bytes / gib, 3),
         'one_backward_temp_gib': round(one_mem.temp_size_in_bytes / gib, 3),
         'extra_in_gradients': round(extra, 3)}
  print(json.dumps(out, indent=1))


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  sub = p.add_subparsers(dest='what', required=True)
  o = sub.add_parser('overhead')
  o.add_argument('--config', default=os.path.join(ROOT, 'configs', 'demo.py'))
  o.add_argument('--windows', type=int, default=3)
  o.add_argument('--repeats', type=int, default=2)
  m = sub.add_parser('memory')
  m.add_argument('--preset', default='qwen1.5-0.5b')
  m.add_argument('--datasets', type=int, default=4)
  m.add_argument('--rows', type=int, default=1, help='examples per dataset in each reward batch')
  m.add_argument('--seq', type=int, default=128)
  m.add_argument('--grad_params', default='')
  m.add_argument('--dtype', default='bfloat16', help='parameter and compute dtype')
  args = p.parse_args()
  overhead(args) if args.what == 'overhead' else memory(args)


if __name__ == '__main__':
  main()
