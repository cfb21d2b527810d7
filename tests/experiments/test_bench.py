"""python -m mos_jax.bench on the tiny demo: every JSON field, the table, and the FLOP arithmetic."""

import math

from mos_jax.experiments import benchmark
from mos_jax import models
from mos_jax.experiments import perf
from demo_run import demo_config


def test_flops_per_position_by_hand():
  c = models.get_preset('qwen1.5-0.5b')  # Tied embeddings: the table is the LM head's matmul.
  assert perf.matmul_params(c) == models.param_count(c) == 463_987_712
  llama = models.get_preset('llama-3-8b')  # Untied: the embedding lookup is no matmul.
  assert perf.matmul_params(llama) == 8_030_261_248 - 128256 * 4096
  attention = 6 * 24 * 16 * 64 * 2048
  assert perf.flops_per_position(c, 2048) == 6 * 463_987_712 + attention
  assert perf.peak_flops('NVIDIA H100 80GB HBM3') == 989e12
  assert perf.peak_flops('TPU v5 lite') == 197e12 and perf.peak_flops('TPU v5p') == 459e12
  assert perf.peak_flops('cpu') is None


def test_bench_json_has_every_field(tmp_path):
  config = demo_config(tmp_path, mixing__update_every=2)
  result = benchmark.run_bench(config, windows=1, repeats=1)
  for key in ('device', 'devices', 'params', 'flops_per_position', 'peak_flops_per_chip',
              'peak_memory_gib', 'peak_memory_source', 'step_compile_s', 'mos_overhead_percent',
              'packing', 'max_len', 'batch_size'):
    assert key in result, key
  for strategy in ('static', 'mos'):
    numbers = result[strategy]
    for key in ('step_s', 'positions_per_s', 'tokens_per_s', 'real_tokens_per_s',
                'real_token_fraction', 'achieved_flops_per_s', 'data_wait_fraction',
                'compile_s'):
      assert numbers[key] is not None and math.isfinite(numbers[key]) and numbers[key] >= 0, key
    assert numbers['mfu'] is None and numbers['mfu_real'] is None  # No peak for a CPU.
    assert 0 < numbers['real_token_fraction'] <= 1
  assert result['peak_memory_gib'] > 0 and 'memory_analysis' in result['peak_memory_source']
  text = benchmark.table(result)
  assert 'real_tokens_per_s' in text and 'MoS overhead' in text
