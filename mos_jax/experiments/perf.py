"""Model FLOPs, peak accelerator FLOP/s, MFU and peak memory: the arithmetic behind the bench.

FLOPs per trained position (forward + backward = 3x forward, a multiply-add = 2 FLOPs):
  6 * N_matmul                       every weight matrix once per token (N_matmul: all parameters
                                     but an untied embedding table, which is a lookup);
  + 6 * layers * heads * head_dim * L   causal attention (QK^T and PV, 2 * 2 * heads * head_dim * L
                                     per token forward, halved by causality, times 3).
MFU = FLOPs per position x positions per second / (peak bf16 FLOP/s per chip x chips), counting
every position of the batch (padding included, as the hardware computes it); `mfu_real` counts
only real tokens, which is the work that trains the model.
"""

from __future__ import annotations

import math

import jax
from flax import nnx

from mos_jax.models.config import ModelConfig
from mos_jax.models.decoder import abstract_model

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets (no sparsity).
PEAK_BF16_FLOPS = (
    ('h200', 989e12),  # NVIDIA H200 SXM
    ('h100', 989e12),  # NVIDIA H100 SXM (the PCIe card is 756e12)
    ('a100', 312e12),  # NVIDIA A100
    ('v6 lite', 918e12), ('v6e', 918e12),  # Cloud TPU v6e (Trillium)
    ('v5 lite', 197e12), ('v5e', 197e12),  # Cloud TPU v5e
    ('v5p', 459e12), ('tpu v5', 459e12),  # Cloud TPU v5p
    ('v4', 275e12),  # Cloud TPU v4
)


def peak_flops(device_kind: str) -> float | None:
  """Peak bf16 FLOP/s of one chip of this `device.device_kind`, or None (CPUs, unknown chips)."""
  kind = device_kind.lower()
  for key, flops in PEAK_BF16_FLOPS:
    if key in kind:
      return flops
  return None


def matmul_params(config: ModelConfig) -> int:
  """Parameters that enter a matmul per token: all of them but an untied embedding table."""
  shapes = jax.tree.leaves(nnx.state(abstract_model(config.replace(scan_layers=True)), nnx.Param))
  total = sum(math.prod(s.shape) for s in shapes)
  return total if config.tie_embeddings else total - config.vocab_size * config.hidden_size


def flops_per_position(config: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per position of a row of `seq_len` positions (see the module docstring)."""
  attention = 6 * config.num_layers * config.num_heads * config.head_dim * seq_len
  return 6.0 * matmul_params(config) + attention


def peak_memory_bytes(device=None, compiled=None) -> tuple[int | None, str]:
  """(bytes, source): the device's own peak (`memory_stats`) where it keeps one, else what XLA
  planned for `compiled` (a jax `Compiled`: arguments + outputs + temporaries, less donated
  aliases), else None."""
  device = device or jax.local_devices()[0]
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  if stats and stats.get('peak_bytes_in_use'):
    return int(stats['peak_bytes_in_use']), 'memory_stats'
  if compiled is not None:
    m = compiled.memory_analysis()
    if m is not None:
      total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)
      return int(total), 'compiled step memory_analysis'
  return None, 'unavailable'
