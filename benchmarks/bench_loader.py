"""Examples per second of the mixture loader on the demo skills (a benchmark, not a test).

    python benchmarks/bench_loader.py [--demo-dir DIR] [--steps 500] [--workers 0 2]
        [--batch 16] [--max-len 128]

Builds the data of the four demo skills once per setting (build time reported too), draws
`--steps` training batches after a short warm-up, and prints one JSON line per setting:
per-batch (Algorithm 1) and per-example mixing, with and without packing, for each worker count.
The demo trainer takes ~20-50 ms per step of 16 examples on a CPU, i.e. 300-800 examples/s;
the loader should deliver at least 20x that.
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mos_jax import config as config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from mos_jax.data import build_data  # pylint: disable=g-import-not-at-top,wrong-import-position
from mos_jax.data import demo_skills  # pylint: disable=g-import-not-at-top,wrong-import-position


def demo_config(demo_dir: str, batch: int, max_len: int, **data):
  c = config_lib.base_config()
  c.data.demo_dir = demo_dir
  c.data.max_len = max_len
  c.train.batch_size = batch
  for name, entry in demo_skills.config_entries(demo_dir).items():
    c.data.datasets[name] = entry
  for key, value in data.items():
    c.data[key] = value
  return c


def measure(config, steps: int, warmup: int = 20) -> dict:
  start = time.perf_counter()
  data = build_data(config)
  built = time.perf_counter() - start
  for _ in range(warmup):  # Worker start-up is not throughput.
    next(data.train)
  start = time.perf_counter()
  tokens = examples = 0
  for step in range(steps):
    batch = next(data.train)
    tokens += int(batch['segment_ids'].astype(bool).sum())
    examples += int(batch['segment_ids'].max(axis=1).sum())  # Packed rows hold several.
    if step % 100 == 0:
      data.train.reward_batches()
  seconds = time.perf_counter() - start
  data.close()
  return {'build_s': round(built, 2), 'examples_per_s': round(examples / seconds),
          'rows_per_s': round(steps * config.train.batch_size / seconds),
          'tokens_per_s': round(tokens / seconds), 'ms_per_batch': round(1e3 * seconds / steps, 3)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--demo-dir', default='')
  parser.add_argument('--steps', type=int, default=500)
  parser.add_argument('--workers', type=int, nargs='+', default=[0])
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--max-len', type=int, default=128)
  args = parser.parse_args()
  demo_dir = args.demo_dir or os.path.join(tempfile.gettempdir(), 'mos_jax_demo_bench')
  demo_skills.ensure_demo(demo_dir)
  machine = f'{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}'
  for workers in args.workers:
    for mix_per in ('batch', 'example'):
      for packing in (False, True):
        config = demo_config(demo_dir, args.batch, args.max_len, mix_per=mix_per,
                             packing=packing, num_workers=workers)
        result = measure(config, args.steps)
        print(json.dumps({'mix_per': mix_per, 'packing': packing, 'workers': workers,
                          'batch': args.batch, 'max_len': args.max_len, **result,
                          'machine': machine}), flush=True)


if __name__ == '__main__':
  main()
