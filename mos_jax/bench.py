"""Benchmark: the real training loop, static mixture against MoS, with MFU and memory.

  python -m mos_jax.bench --config configs/demo.py [--windows 4] [--repeats 2] [--json bench.json]

Both strategies run the real training loop (`mos_jax.training`) with `log_every = update_every`, so
each logged window of S steps holds exactly one scorer update for MoS. The first window (compiles)
is dropped; runs alternate static/MoS to share the machine's noise. Reports, as JSON and a table:
step time, positions/s, trained tokens/s and real tokens/s, the real-token fraction, model FLOPs
per position (mos_jax.experiments.perf), achieved FLOP/s and MFU against the chip's peak bf16 FLOP/s (None on
CPUs), compile time, peak device memory, the data-wait fraction, and the MoS overhead in percent
(the paper reports about 20%).
"""

import json

from absl import flags

from mos_jax.infra import cli

_WINDOWS = flags.DEFINE_integer('windows', 4, 'Timed windows of update_every steps per run.')
_REPEATS = flags.DEFINE_integer('repeats', 2, 'Alternating static/MoS runs of each strategy.')
_JSON = flags.DEFINE_string('json', '', 'Also write the JSON to this file.')
_CONFIG = cli.define_config_flag()


def main(argv):
  del argv
  if _WINDOWS.value < 1 or _REPEATS.value < 1:
    raise ValueError('--windows and --repeats must be at least 1.')
  from mos_jax.experiments import benchmark  # Imported after flag parsing: it pulls in jax.
  result = benchmark.run_bench(_CONFIG.value, _WINDOWS.value, _REPEATS.value)
  text = json.dumps(result, indent=2)
  print(text)
  print(benchmark.table(result))
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      f.write(text + '\n')


if __name__ == '__main__':
  cli.run(main, 'bench')
