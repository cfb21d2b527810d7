"""The architecture description shared by the decoder, the presets and the HF import/export."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

# HF model_type of each family (mos_jax.models.families maps their config.json and tensor names).
FAMILIES = ('gemma', 'gemma2', 'gemma3_text', 'llama', 'mistral', 'qwen2', 'qwen3')
GEMMA_FAMILIES = ('gemma', 'gemma2', 'gemma3_text')  # (1 + w) RMSNorm, sqrt(D)-scaled embeddings.
ACTIVATIONS = ('silu', 'gelu_tanh')
ROPE_SCALING_TYPES = ('llama3', 'linear')
LAYER_TYPES = ('full_attention', 'sliding_attention')  # HF `layer_types` values.
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
  """One decoder-only transformer of the Llama / Qwen2 / Qwen3 / Mistral / Gemma 1-3 families.

  Family conventions that are not separate fields: the Gemma families scale the embeddings by
  sqrt(hidden_size) (in the compute dtype, as HF does) and their RMSNorm multiplies by (1 + weight).
  The architecture options below the first block are what the newer families add
  (transformers/models/{qwen3,gemma2,gemma3,mistral}/modeling_*.py are the reference).
  """
  family: str                      # HF model_type, one of FAMILIES
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
  qk_norm: bool = False            # RMSNorm over head_dim on q and k before RoPE (Qwen3, Gemma 3)
  post_norms: bool = False         # also norm the attention and MLP outputs (Gemma 2 / 3 sandwich)
  query_pre_attn_scalar: float | None = None  # attention scale is this**-0.5 (None: head_dim)
  attn_logit_softcap: float | None = None   # scores -> cap * tanh(scores / cap) (Gemma 2)
  final_logit_softcap: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma 2)
  sliding_window: int | None = None  # keys within this many tokens (self included) on local layers
  layer_types: tuple[str, ...] | None = None  # per layer, LAYER_TYPES; None: all local if a window
  rope_local_theta: float | None = None  # RoPE base of local layers, unscaled (Gemma 3); None: same
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
    if self.layer_types is not None:
      set_('layer_types', tuple(str(t) for t in self.layer_types))
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
      need = {'factor'} | ({'low_freq_factor', 'high_freq_factor',
                            'original_max_position_embeddings'} if kind == 'llama3' else set())
      missing = need - set(self.rope_scaling_dict)
      if missing:
        fail(f'rope_scaling of type {kind} lacks {sorted(missing)}.')
    self._validate_options(fail)

  def _validate_options(self, fail):
    """The newer families' options: each only where its HF family has it."""
    gemma_new = self.family in ('gemma2', 'gemma3_text')
    if self.qk_norm != (self.family in ('qwen3', 'gemma3_text')):
      fail(f'qk_norm={self.qk_norm} does not match family {self.family!r} (Qwen3 and Gemma 3 '
           'always norm q and k, the others never do).')
    if self.post_norms != gemma_new:
      fail(f'post_norms={self.post_norms} does not match family {self.family!r} (Gemma 2 and 3 '
           'always have them, the others never do).')
    # transformers' Gemma3Attention never passes attn_logit_softcapping to its attention.
    for name, owners in (('query_pre_attn_scalar', ('gemma2', 'gemma3_text')),
                         ('attn_logit_softcap', ('gemma2',)),
                         ('final_logit_softcap', ('gemma2', 'gemma3_text'))):
      value = getattr(self, name)
      if value is not None and self.family not in owners:
        fail(f'{name} is an option of {" / ".join(owners)} only, not of {self.family!r}.')
      if value is not None and float(value) <= 0:
        fail(f'{name} must be positive, got {value}.')
    if self.sliding_window is not None:
      if self.family not in ('gemma2', 'gemma3_text', 'mistral', 'qwen3'):
        fail(f'sliding_window is not an option of family {self.family!r}.')
      if int(self.sliding_window) <= 0:
        fail(f'sliding_window must be positive, got {self.sliding_window}.')
    if self.layer_types is not None:
      if len(self.layer_types) != self.num_layers:
        fail(f'layer_types has {len(self.layer_types)} entries for {self.num_layers} layers.')
      bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
      if bad:
        fail(f'layer_types {bad} not supported; supported: {", ".join(LAYER_TYPES)}.')
      if 'sliding_attention' in self.layer_types and self.sliding_window is None:
        fail('layer_types has sliding_attention layers but sliding_window is None.')
    if self.rope_local_theta is not None and self.family != 'gemma3_text':
      fail(f'rope_local_theta is a Gemma 3 option; family {self.family!r} has none.')

  @property
  def rope_scaling_dict(self) -> dict[str, Any]:
    return dict(self.rope_scaling or ())

  @property
  def gemma_norm(self) -> bool:
    """RMSNorm scales by (1 + weight), weights initialised at 0."""
    return self.family in GEMMA_FAMILIES

  @property
  def scale_embeddings(self) -> bool:
    """Embeddings are multiplied by sqrt(hidden_size)."""
    return self.family in GEMMA_FAMILIES

  @property
  def local_layers(self) -> tuple[bool, ...]:
    """Per layer: True where attention is limited to the sliding window (and uses the local
    RoPE). Without layer_types every layer is local when there is a window (Mistral)."""
    if self.sliding_window is None:
      return (False,) * self.num_layers
    if self.layer_types is None:
      return (True,) * self.num_layers
    return tuple(t == 'sliding_attention' for t in self.layer_types)

  @property
  def attention_scale(self) -> float:
    """What the scores q.k are multiplied by: query_pre_attn_scalar**-0.5 or head_dim**-0.5."""
    return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

  def replace(self, **overrides) -> 'ModelConfig':
    unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
    if unknown:
      raise TypeError(f'ModelConfig has no field(s) {sorted(unknown)}; fields: '
                      f'{[f.name for f in dataclasses.fields(self)]}.')
    return dataclasses.replace(self, **overrides)
