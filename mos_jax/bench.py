"""Benchmark: wall time per training step of MoS against the static mixture on the same config.

  python -m mos_jax.bench --config configs/demo.py [--windows 4] [--repeats 2]

Both strategies run the real training loop (`mos_jax.trainer`) with `log_every = update_every`, so
each logged window of S steps holds exactly one scorer update for MoS. The first window (compiles)
is dropped; runs alternate static/MoS to share the machine's noise. Prints seconds per step, tokens/s
and the MoS overhead in percent (the paper reports about 20%).
"""

import copy
import json
import statistics
import tempfile

from absl import flags

from mos_jax import cli

_WINDOWS = flags.DEFINE_integer('windows', 4, 'Timed windows of update_every steps per run.')
_REPEATS = flags.DEFINE_integer('repeats', 2, 'Alternating static/MoS runs of each strategy.')
_CONFIG = cli.define_config_flag()


def bench_config(config, strategy: str, windows: int):
  c = copy.deepcopy(config)
  c.mixing.strategy = strategy
  every = c.mixing.update_every
  c.train.steps = every * (windows + 1)
  c.train.log_every = every
  c.train.eval_every = 0
  c.train.checkpoint_every = 0
  c.train.progress_bar = False
  return c


def time_run(config) -> dict:
  """Median seconds per step and tokens/s over the logged windows after the first."""
  from mos_jax import metrics as metrics_lib
  from mos_jax import trainer
  with tempfile.TemporaryDirectory() as workdir:
    trainer.train(trainer.build(config, workdir))
    rows = metrics_lib.read_metrics(f'{workdir}/metrics.jsonl')
  windows = [r for r in rows if 'perf/step_s' in r][1:]
  return {'step_s': statistics.median(r['perf/step_s'] for r in windows),
          'tokens_per_s': statistics.median(r['perf/tokens_per_s'] for r in windows)}


def main(argv):
  del argv
  import jax
  config = _CONFIG.value
  if _WINDOWS.value < 1 or _REPEATS.value < 1:
    raise ValueError('--windows and --repeats must be at least 1.')
  results = {'static': [], 'mos': []}
  for _ in range(_REPEATS.value):
    for strategy in results:
      results[strategy].append(time_run(bench_config(config, strategy, _WINDOWS.value)))
  summary = {s: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
             for s, runs in results.items()}
  overhead = summary['mos']['step_s'] / summary['static']['step_s'] - 1.0
  print(json.dumps({'device': str(jax.devices()[0].device_kind), 'devices': jax.device_count(),
                    'update_every': config.mixing.update_every, 'reward': config.mixing.reward,
                    **summary, 'mos_overhead_percent': 100 * overhead}, indent=2))


if __name__ == '__main__':
  cli.run(main, 'bench')
