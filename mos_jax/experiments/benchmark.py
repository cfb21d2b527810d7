"""The bench's work: the real training loop, static mixture against MoS, with MFU and memory.

`run_bench(config, windows, repeats)` returns the JSON that `python -m mos_jax.bench` prints and
`table(result)` its table; see mos_jax/bench.py for what each field means.
"""

import copy
import json
import os
import statistics
import tempfile
import time

import jax
import numpy as np

from mos_jax import models
from mos_jax import training
from mos_jax.data import bundle
from mos_jax.experiments import perf
from mos_jax.infra import distributed
from mos_jax.models.build import embedding_rows
from mos_jax.workdir import metrics as metrics_lib

_PERF = {'step_s': 'perf/step_s', 'tokens_per_s': 'perf/tokens_per_s',
         'real_tokens_per_s': 'perf/real_tokens_per_s',
         'real_token_fraction': 'perf/real_token_fraction',
         'data_wait_fraction': 'perf/data_wait_fraction'}
_COMPILE_EVENTS = ('/jax/core/compile/jaxpr_trace_duration',
                   '/jax/core/compile/jaxpr_to_mlir_module_duration',
                   '/jax/core/compile/backend_compile_duration')


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


def _example_batch(run):
  """A global batch of the training shape (zeros): for the AOT memory analysis of the step."""
  c, rows = run.config, run.config.train.batch_size // run.data.train._spec.process_count  # pylint: disable=protected-access
  shape = (rows, c.data.max_len)
  local = {'tokens': np.zeros(shape, np.int32), 'targets': np.zeros(shape, np.int32),
           'loss_mask': np.ones(shape, np.float32), 'positions': np.zeros(shape, np.int32),
           'segment_ids': np.ones(shape, np.int32), 'dataset_ids': np.zeros(rows, np.int32),
           'example_ids': np.zeros(rows, np.int32)}
  return distributed.host_local_to_global(local, run.mesh)


def time_run(config, with_memory: bool = False) -> dict:
  """Medians over the logged windows after the first, compile seconds, optionally peak memory."""
  compile_s = []
  listener = lambda name, secs, **kw: compile_s.append(secs) if name in _COMPILE_EVENTS else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    with tempfile.TemporaryDirectory() as workdir:
      run = training.build(config, workdir)
      out = {}
      if with_memory:
        with jax.set_mesh(run.mesh):
          start = time.perf_counter()
          compiled = run.train_jit.lower(run.state, _example_batch(run), run.frozen).compile()
          out['step_compile_s'] = time.perf_counter() - start
        memory, source = perf.peak_memory_bytes(compiled=compiled)
        out.update(peak_memory_gib=None if memory is None else memory / 2**30,
                   peak_memory_source=source)
      training.train(run)
      rows = metrics_lib.read_metrics(f'{workdir}/metrics.jsonl')
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  windows = [r for r in rows if 'perf/step_s' in r][1:]
  out.update({k: statistics.median(r[m] for r in windows) for k, m in _PERF.items()})
  out['compile_s'] = sum(compile_s)
  if with_memory:  # The device's own peak, when it keeps one, is read after training.
    memory, source = perf.peak_memory_bytes()
    if memory is not None:
      out.update(peak_memory_gib=memory / 2**30, peak_memory_source=source)
  return out


def model_numbers(config, devices) -> dict:
  """Parameters, FLOPs per position and the peak FLOP/s of the chips."""
  m = config.model
  if m.hf_checkpoint:
    with open(os.path.join(m.hf_checkpoint, 'config.json')) as f:
      model_config = models.config_from_hf(json.load(f))
  else:
    vocab = len(bundle.load_tokenizer(bundle.tokenizer_path(config)))
    model_config = models.get_preset(m.preset, vocab_size=embedding_rows(m, vocab))
  peak = perf.peak_flops(devices[0].device_kind)
  return {'params': models.param_count(model_config),
          'flops_per_position': perf.flops_per_position(model_config, config.data.max_len),
          'peak_flops_per_chip': peak}


def derive(summary: dict, numbers: dict, config, num_devices: int) -> dict:
  """Positions/s, achieved FLOP/s and MFU of one strategy's medians."""
  positions_per_s = config.train.batch_size * config.data.max_len / summary['step_s']
  achieved = numbers['flops_per_position'] * positions_per_s
  peak = numbers['peak_flops_per_chip']
  real = numbers['flops_per_position'] * summary['real_tokens_per_s']
  return {**summary, 'positions_per_s': positions_per_s, 'achieved_flops_per_s': achieved,
          'mfu': achieved / (peak * num_devices) if peak else None,
          'mfu_real': real / (peak * num_devices) if peak else None}


def table(result: dict) -> str:
  """The JSON's per-strategy numbers as a fixed-width table."""
  keys = ('step_s', 'positions_per_s', 'tokens_per_s', 'real_tokens_per_s', 'real_token_fraction',
          'achieved_flops_per_s', 'mfu', 'mfu_real', 'data_wait_fraction', 'compile_s')
  fmt = lambda v: '-' if v is None else (f'{v:.4g}' if isinstance(v, float) else str(v))
  lines = ['metric'.ljust(22) + 'static'.rjust(14) + 'mos'.rjust(14)]
  lines += [k.ljust(22) + fmt(result['static'][k]).rjust(14) + fmt(result['mos'][k]).rjust(14)
            for k in keys]
  lines.append(f'peak memory: {fmt(result["peak_memory_gib"])} GiB ({result["peak_memory_source"]})'
               f'; MoS overhead {result["mos_overhead_percent"]:.1f}%; device '
               f'{result["device"]} x {result["devices"]}')
  return '\n'.join(lines)


def run_bench(config, windows: int, repeats: int) -> dict:
  results = {'static': [], 'mos': []}
  for i in range(repeats):
    for strategy in results:
      results[strategy].append(time_run(bench_config(config, strategy, windows),
                                        with_memory=(i == 0 and strategy == 'static')))
  memory = results['static'][0]
  summary = {s: {k: statistics.median(r[k] for r in runs) for k in list(_PERF) + ['compile_s']}
             for s, runs in results.items()}
  numbers = model_numbers(config, jax.devices())
  out = {'device': str(jax.devices()[0].device_kind), 'devices': jax.device_count(),
         'preset': config.model.preset if not config.model.hf_checkpoint else
         config.model.hf_checkpoint, 'dtype': config.model.dtype,
         'batch_size': config.train.batch_size, 'max_len': config.data.max_len,
         'packing': bool(config.data.packing), 'update_every': config.mixing.update_every,
         'reward': config.mixing.reward, **numbers,
         'peak_memory_gib': memory.get('peak_memory_gib'),
         'peak_memory_source': memory.get('peak_memory_source'),
         'step_compile_s': memory.get('step_compile_s')}
  for s in summary:
    out[s] = derive(summary[s], numbers, config, jax.device_count())
  out['mos_overhead_percent'] = 100 * (out['mos']['step_s'] / out['static']['step_s'] - 1.0)
  return out
