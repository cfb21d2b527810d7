"""Step time of the demo model on 1 device vs 8 simulated CPU devices (FSDP), same global batch.

    python benchmarks/bench_devices.py [--windows 3] [--meshes 1,1,1 1,8,1 2,2,2]

Each mesh runs in its own subprocess (XLA_FLAGS simulates the devices) through the real training
loop (`mos_jax.bench.time_run`, static mixture, first logged window dropped). Simulated devices
share this machine's cores, so this measures the cost of the sharded program's communication and
partitioning on the demo model, not a speed-up.
"""

import argparse
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = '''
import json, sys
from mos_jax import bench
from mos_jax.infra import cli
mesh, windows = json.loads(sys.argv[1]), int(sys.argv[2])
overrides = ['--config.mesh.%s=%d' % (k, v) for k, v in zip(('data', 'fsdp', 'tensor'), mesh)]
config = bench.bench_config(cli.load_config('configs/demo.py', overrides), 'static', windows)
config.mixing.update_every = 20  # Log windows of 20 steps.
config.train.log_every = 20
config.train.steps = 20 * (windows + 1)
print('RESULT', json.dumps(bench.time_run(config)))
'''


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--windows', type=int, default=3)
  parser.add_argument('--meshes', nargs='+', default=['1,1,1', '1,8,1', '2,2,2'])
  args = parser.parse_args()
  rows = []
  for spec in args.meshes:
    mesh = [int(x) for x in spec.split(',')]
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': ROOT,
           'XLA_FLAGS': f'--xla_force_host_platform_device_count={math.prod(mesh)}'}
    out = subprocess.run([sys.executable, '-c', CHILD, json.dumps(mesh), str(args.windows)],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.split('RESULT', 1)[1])
    rows.append({'mesh': mesh, 'devices': math.prod(mesh), **result})
    print(json.dumps(rows[-1]), flush=True)
  base = rows[0]['step_s']
  for row in rows:
    print(f"mesh {tuple(row['mesh'])}: {row['step_s'] * 1e3:.1f} ms/step "
          f"({row['step_s'] / base:.2f}x the first mesh), {row['tokens_per_s']:.0f} trained tokens/s")


if __name__ == '__main__':
  main()
