"""The architecture description shared by the decoder, the presets and the HF import/export."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

FAMILIES = ('gemma', 'llama', 'qwen2')
ACTIVATIONS = ('silu', 'gelu_tanh')
ROPE_SCALING_TYPES = ('llama3',)
ATTENTION_IMPLS = (None, 'xla', 'cudnn', 'triton', 'splash')  # mos_jax.models.attention
REMAT = ('none', 'full', 'save_dots', 'save_dots_no_batch')  # decoder.REMAT_POLICIES
DTYPES = ('float32', 'bfloat16', 'float16')


def _frozen_items(value: Mapping[str, Any] | tuple | None) -> tuple | None:
  """A dict (e.g. HF `rope_scaling`) as a sorted tuple of items, so the config stays hashable."""
  if value is None:
    return None
  items = value.items() if isinstance(value, Mapping) else value
  return tuple(sorted((str(k), v) for k, v in items))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """One decoder-only transformer of the Llama / Qwen2 / Gemma families.

  Family conventions that are not separate fields: `gemma` scales the embeddings by
  sqrt(hidden_size) (in the compute dtype, as HF does) and its RMSNorm multiplies by (1 + weight).
  """
  family: str                      # 'llama' | 'qwen2' | 'gemma' (HF model_type)
  vocab_size: int                  # rows of the embedding table (override it from the tokenizer)
  hidden_size: int                 # D, the residual stream width
  intermediate_size: int           # F, the gated MLP width
  num_layers: int
  num_heads: int                   # N, query heads
  num_kv_heads: int                # K, key/value heads (grouped-query attention when < N)
  head_dim: int                    # H, independent of hidden_size / num_heads (Gemma)
  rope_theta: float = 10000.0
  rope_scaling: tuple | None = None  # sorted (key, value) items of HF rope_scaling, or None
  rms_norm_eps: float = 1e-6
  tie_embeddings: bool = False     # output projection = embedding table transposed
  qkv_bias: bool = False           # bias on q/k/v projections (Qwen2)
  activation: str = 'silu'         # gate activation: 'silu' (SwiGLU) | 'gelu_tanh' (GeGLU)
  max_position_embeddings: int = 8192
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None
  param_dtype: str = 'float32'     # storage dtype of the parameters
  dtype: str = 'float32'           # compute dtype of activations (logits are always float32)
  remat: str = 'none'              # per-layer remat policy (REMAT); True/False mean 'full'/'none'
  scan_layers: bool = False        # stack layers on a leading 'layers' axis and lax.scan over them
  attention_impl: str | None = None  # attention kernel (ATTENTION_IMPLS); None = auto per platform
  loss_chunk: int = 256            # positions per LM-head + cross-entropy chunk in losses (0 = all)

  def __post_init__(self):
    # Normalise user-friendly inputs (dicts, lists, jnp dtypes) into hashable canonical values.
    set_ = lambda name, value: object.__setattr__(self, name, value)
    set_('rope_scaling', _frozen_items(self.rope_scaling))
    if isinstance(self.eos_token_id, (list, tuple)):
      set_('eos_token_id', tuple(int(t) for t in self.eos_token_id))
    for name in ('param_dtype', 'dtype'):
      set_(name, jnp.dtype(getattr(self, name)).name)
    if isinstance(self.remat, bool) or self.remat is None:
      set_('remat', 'full' if self.remat else 'none')
    if self.attention_impl == '':
      set_('attention_impl', None)
    self._validate()

  def _validate(self):
    def fail(msg):
      raise ValueError(f'ModelConfig: {msg}')
    if self.family not in FAMILIES:
      fail(f'family {self.family!r} is not supported; supported: {", ".join(FAMILIES)}.')
    for name in ('vocab_size', 'hidden_size', 'intermediate_size', 'num_layers', 'num_heads',
                 'num_kv_heads', 'head_dim'):
      if int(getattr(self, name)) <= 0:
        fail(f'{name} must be positive, got {getattr(self, name)}.')
    if self.num_heads % self.num_kv_heads:
      fail(f'num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads}).')
    if self.head_dim % 2:
      fail(f'head_dim must be even for rotary embeddings, got {self.head_dim}.')
    if self.activation not in ACTIVATIONS:
      fail(f'activation {self.activation!r} is not supported; supported: {", ".join(ACTIVATIONS)}.')
    if self.qkv_bias != (self.family == 'qwen2'):
      fail(f'qkv_bias={self.qkv_bias} does not match family {self.family!r} '
           '(Qwen2 always has q/k/v biases, Llama and Gemma never do).')
    for name in ('param_dtype', 'dtype'):
      if getattr(self, name) not in DTYPES:
        fail(f'{name} {getattr(self, name)!r} is not supported; supported: {", ".join(DTYPES)}.')
    if self.remat not in REMAT:
      fail(f'remat {self.remat!r} is not one of {REMAT}.')
    if int(self.loss_chunk) < 0:
      fail(f'loss_chunk must be >= 0, got {self.loss_chunk}.')
    if self.attention_impl not in ATTENTION_IMPLS:
      fail(f'attention_impl {self.attention_impl!r} is not one of {ATTENTION_IMPLS}.')
    if self.rope_scaling is not None:
      kind = self.rope_scaling_dict.get('rope_type')
      if kind not in ROPE_SCALING_TYPES:
        fail(f'rope_scaling type {kind!r} is not supported; supported: '
             f'{", ".join(ROPE_SCALING_TYPES)} (or None).')
      missing = {'factor', 'low_freq_factor', 'high_freq_factor',
                 'original_max_position_embeddings'} - set(self.rope_scaling_dict)
      if missing:
        fail(f'rope_scaling of type llama3 lacks {sorted(missing)}.')

  @property
  def rope_scaling_dict(self) -> dict[str, Any]:
    return dict(self.rope_scaling or ())

  @property
  def gemma_norm(self) -> bool:
    """RMSNorm scales by (1 + weight), weights initialised at 0."""
    return self.family == 'gemma'

  @property
  def scale_embeddings(self) -> bool:
    """Embeddings are multiplied by sqrt(hidden_size)."""
    return self.family == 'gemma'

  def replace(self, **overrides) -> 'ModelConfig':
    unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
    if unknown:
      raise TypeError(f'ModelConfig has no field(s) {sorted(unknown)}; fields: '
                      f'{[f.name for f in dataclasses.fields(self)]}.')
    return dataclasses.replace(self, **overrides)
