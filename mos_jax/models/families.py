"""What each family's Hugging Face checkpoint looks like: its config.json fields <-> ModelConfig,
and its tensor names. One `Family` per HF model_type in FAMILIES; hf_io.py reads and writes
through this table and knows no family by name.

The reference is transformers 5.24: models/<family>/configuration_<family>.py for the fields and
modeling_<family>.py for the tensors (qwen3, gemma2, gemma3 for Gemma3TextConfig /
Gemma3ForCausalLM, mistral; llama, qwen2, gemma for the paper's families).

A config.json field that is in none of COMMON_KEYS, METADATA_KEYS or the family's own `keys`
stops the load with one line naming it, unless its value is neutral (None / false, or the
NEUTRAL value): nothing the forward pass would need is silently ignored.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from mos_jax.models.config import ModelConfig


class CheckpointError(ValueError):
  """An HF checkpoint (or config) that cannot be loaded; the message names what is wrong."""


# Read for every family by hf_io.config_from_hf.
COMMON_KEYS = frozenset({
    'model_type', 'vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers',
    'num_attention_heads', 'num_key_value_heads', 'head_dim', 'rms_norm_eps',
    'tie_word_embeddings', 'max_position_embeddings', 'bos_token_id', 'eos_token_id',
    'pad_token_id', 'rope_theta', 'rope_scaling', 'rope_parameters', 'hidden_act',
    'hidden_activation'})
# Bookkeeping and training-time settings that change nothing in the forward pass.
METADATA_KEYS = frozenset({
    'architectures', 'transformers_version', 'torch_dtype', 'dtype', '_name_or_path',
    'initializer_range', 'use_cache', 'cache_implementation', 'output_attentions',
    'output_hidden_states', 'return_dict', 'id2label', 'label2id', 'problem_type',
    'tokenizer_class', 'attention_dropout'})
# Fields that are harmless at exactly this value (anything else is refused by name).
NEUTRAL = {'pretraining_tp': 1, 'partial_rotary_factor': 1.0, 'attention_dropout': 0.0}
# Refused outright, with what they mean.
MULTIMODAL_KEYS = ('vision_config', 'text_config', 'audio_config', 'image_token_id',
                   'image_token_index', 'vision_start_token_id')
MOE_KEYS = ('num_experts', 'num_local_experts', 'num_experts_per_tok', 'moe_intermediate_size')
REFUSED_TYPES = {
    'gemma3': 'Gemma 3 multimodal (Gemma3ForConditionalGeneration with a vision_config); only '
              'the text model is supported (model_type gemma3_text, Gemma3ForCausalLM)',
    'gemma3n': 'Gemma 3n (multimodal)', 'qwen3_vl': 'Qwen3-VL (multimodal)',
    'qwen2_vl': 'Qwen2-VL (multimodal)', 'qwen2_5_vl': 'Qwen2.5-VL (multimodal)',
    'mistral3': 'Mistral 3 (multimodal)', 'qwen3_moe': 'Qwen3-MoE (mixture of experts)',
    'qwen2_moe': 'Qwen2-MoE (mixture of experts)', 'mixtral': 'Mixtral (mixture of experts)',
}
ROPE_KEYS = {'default': set(), 'linear': {'factor'},
             'llama3': {'factor', 'low_freq_factor', 'high_freq_factor',
                        'original_max_position_embeddings'}}


def refuse(model_type: str, what: str):
  raise CheckpointError(f'config.json ({model_type}): {what} is not supported.')


def parse_rope(model_type: str, field: str, params: dict) -> tuple[float | None, dict | None]:
  """(rope_theta or None, ModelConfig.rope_scaling or None) of one HF rope dict (rope_parameters
  or rope_scaling; `field` names it in errors)."""
  params = dict(params or {})
  theta = params.pop('rope_theta', None)
  kind = params.pop('rope_type', None) or params.pop('type', None) or 'default'
  params.pop('type', None)
  if kind not in ROPE_KEYS:
    raise CheckpointError(f'config.json ({model_type}): rope type {kind!r} ({field}) is not '
                          f'supported; supported: {", ".join(ROPE_KEYS)}.')
  extra = sorted(set(params) - ROPE_KEYS[kind])
  if extra:
    refuse(model_type, f'{field}.{extra[0]} (rope type {kind})')
  return theta, (None if kind == 'default' else {'rope_type': kind, **params})


def _sliding(layer_types, n: int, default: Callable[[int], bool]) -> tuple[str, ...]:
  if layer_types is not None:
    return tuple(layer_types)
  return tuple('sliding_attention' if default(i) else 'full_attention' for i in range(n))


# ----------------------------------------------------------------------------------------------
# Per family: fields of config.json -> ModelConfig fields (beyond the common ones), and back.


def _none(hf, model_type):
  return {}


def _qwen2_from(hf, model_type):
  if hf.get('use_sliding_window'):
    refuse(model_type, 'use_sliding_window=true')
  return {'qkv_bias': True}


def _qwen3_from(hf, model_type):
  fields = {'qk_norm': True}
  if hf.get('use_sliding_window'):  # Qwen3Config: layers from max_window_layers on are local.
    n, first = hf['num_hidden_layers'], hf.get('max_window_layers', 28)
    fields.update(sliding_window=hf['sliding_window'],
                  layer_types=_sliding(hf.get('layer_types'), n, lambda i: i >= first))
  elif 'sliding_attention' in (hf.get('layer_types') or ()):
    refuse(model_type, 'layer_types with sliding_attention and use_sliding_window=false')
  return fields


def _mistral_from(hf, model_type):
  if hf.get('layer_types') is not None:  # MistralModel ignores them (it warns); so do we not.
    refuse(model_type, 'layer_types (use model_type ministral)')
  return {'sliding_window': hf.get('sliding_window')}


def _gemma_new_from(hf, model_type):
  """Gemma 2 (Gemma2Config) and Gemma 3 text (Gemma3TextConfig)."""
  n = hf['num_hidden_layers']
  window = hf.get('sliding_window', 4096)
  if hf.get('sliding_window_size') not in (None, window):
    refuse(model_type, f'sliding_window_size={hf["sliding_window_size"]} != sliding_window')
  if model_type == 'gemma2':  # Every other layer, starting with the first, is local.
    default, softcaps = (lambda i: (i + 1) % 2 == 1), (50.0, 30.0)
  else:
    pattern = hf.get('sliding_window_pattern', hf.get('_sliding_window_pattern', 6))
    default, softcaps = (lambda i: (i + 1) % pattern != 0), (None, None)
  layer_types = _sliding(hf.get('layer_types'), n, default)
  if model_type == 'gemma3_text' and hf.get('attn_logit_softcapping') is not None:
    # Gemma3Attention (modeling_gemma3.py) ignores it; a model that honoured it would differ.
    refuse(model_type, 'attn_logit_softcapping (transformers\' Gemma 3 ignores it)')
  return dict(
      post_norms=True, qk_norm=model_type == 'gemma3_text',
      query_pre_attn_scalar=float(hf.get('query_pre_attn_scalar', 256)),
      attn_logit_softcap=(hf.get('attn_logit_softcapping', softcaps[0])
                          if model_type == 'gemma2' else None),
      final_logit_softcap=hf.get('final_logit_softcapping', softcaps[1]),
      sliding_window=window if 'sliding_attention' in layer_types else None,
      layer_types=layer_types if 'sliding_attention' in layer_types else None)


def _layer_types_list(c: ModelConfig) -> list[str]:
  return ['sliding_attention' if local else 'full_attention' for local in c.local_layers]


def _qwen3_to(c: ModelConfig) -> dict:
  local = c.local_layers
  first = local.index(True) if any(local) else c.num_layers
  if any(local) and not all(local[first:]):
    raise ValueError('Qwen3 configs express local layers as the last ones (max_window_layers).')
  return dict(attention_bias=False, use_sliding_window=any(local), sliding_window=c.sliding_window,
              max_window_layers=first, layer_types=_layer_types_list(c))


def _mistral_to(c: ModelConfig) -> dict:
  if not all(c.local_layers) and any(c.local_layers):
    raise ValueError('Mistral configs have one window for all layers (no layer_types).')
  return dict(sliding_window=c.sliding_window)


def _gemma_new_to(c: ModelConfig) -> dict:
  scalar = float(c.query_pre_attn_scalar or c.head_dim)  # Gemma2Config wants an int.
  return dict(attention_bias=False,
              query_pre_attn_scalar=int(scalar) if scalar.is_integer() else scalar,
              attn_logit_softcapping=c.attn_logit_softcap,
              final_logit_softcapping=c.final_logit_softcap,
              sliding_window=c.sliding_window or 4096, layer_types=_layer_types_list(c))


@dataclasses.dataclass(frozen=True)
class Family:
  architecture: str                      # HF class name for config.json `architectures`
  keys: frozenset                        # family fields of config.json read by `from_hf`
  from_hf: Callable[[dict, str], dict]   # (config.json, model_type) -> ModelConfig fields
  to_hf: Callable[[ModelConfig], dict]   # ModelConfig -> family fields of config.json
  gemma_activation: bool = False         # `hidden_act: gelu` means the tanh approximation
  tied_by_default: bool = False          # tie_word_embeddings when config.json omits it
  default_theta: float = 10000.0         # rope_theta when config.json omits it
  local_rope: bool = False               # local layers have their own RoPE base (Gemma 3)


_GEMMA_NEW_KEYS = frozenset({'query_pre_attn_scalar', 'attn_logit_softcapping',
                             'final_logit_softcapping', 'sliding_window', 'layer_types',
                             'sliding_window_size'})
FAMILY_TABLE: dict[str, Family] = {
    'llama': Family('LlamaForCausalLM', frozenset(), _none,
                    lambda c: dict(attention_bias=False, mlp_bias=False, pretraining_tp=1)),
    'qwen2': Family('Qwen2ForCausalLM',
                    frozenset({'use_sliding_window', 'sliding_window', 'max_window_layers',
                               'layer_types'}), _qwen2_from,
                    lambda c: dict(use_sliding_window=False, sliding_window=None,
                                   max_window_layers=c.num_layers)),
    'gemma': Family('GemmaForCausalLM', frozenset(), _none,
                    lambda c: {}, gemma_activation=True, tied_by_default=True),
    'qwen3': Family('Qwen3ForCausalLM',
                    frozenset({'use_sliding_window', 'sliding_window',
                               'max_window_layers', 'layer_types'}), _qwen3_from, _qwen3_to),
    'mistral': Family('MistralForCausalLM', frozenset({'sliding_window'}), _mistral_from,
                      _mistral_to),
    'gemma2': Family('Gemma2ForCausalLM', _GEMMA_NEW_KEYS, _gemma_new_from, _gemma_new_to,
                     gemma_activation=True, tied_by_default=True),
    'gemma3_text': Family('Gemma3ForCausalLM',
                          _GEMMA_NEW_KEYS | {'rope_local_base_freq', 'sliding_window_pattern',
                                             '_sliding_window_pattern'},
                          _gemma_new_from, _gemma_new_to, gemma_activation=True,
                          tied_by_default=True, default_theta=1e6, local_rope=True),
}
SUPPORTED_MODEL_TYPES = tuple(sorted(FAMILY_TABLE))


def check_fields(hf: dict[str, Any], model_type: str) -> None:
  """Refuses (CheckpointError, one line) the first config.json field this family cannot honour."""
  known = COMMON_KEYS | METADATA_KEYS | FAMILY_TABLE[model_type].keys
  for key in sorted(hf):
    value = hf[key]
    if key in MULTIMODAL_KEYS:
      refuse(model_type, f'a multimodal checkpoint ({key})')
    if key in MOE_KEYS and value:
      refuse(model_type, f'mixture-of-experts ({key}={value})')
    if key in NEUTRAL and value != NEUTRAL[key]:
      refuse(model_type, f'{key}={value}')
    if key in known or key in NEUTRAL or value is None or value is False:
      continue
    refuse(model_type, f'field {key!r} (={value!r}) on this family')


# ----------------------------------------------------------------------------------------------
# Tensor names. Kinds say how an HF tensor becomes ours:
#   copy:       same layout (embeddings, norm weights; Gemma's norm stores w of (1 + w) in both).
#   linear_in:  HF [out, in] -> ours [in, *out_dims], e.g. q_proj [N*H, D] -> [D, N, H].
#   linear_out: HF [out, in] -> ours [*in_dims, out], e.g. o_proj [D, N*H] -> [N, H, D].
#   bias:       HF [N*H] -> ours [N, H].
# Entries whose parameter a config lacks (biases, QK-norms, lm_head when tied) are skipped.
GLOBAL_TENSORS = (
    ('model.embed_tokens.weight', ('embed',), 'copy'),
    ('model.norm.weight', ('final_norm', 'weight'), 'copy'),
    ('lm_head.weight', ('lm_head',), 'linear_in'),
)
_ATTENTION_TENSORS = (  # HF name after 'model.layers.{i}.', our path inside a Block.
    ('input_layernorm.weight', ('attn_norm', 'weight'), 'copy'),
    ('self_attn.q_proj.weight', ('attn', 'q_proj'), 'linear_in'),
    ('self_attn.k_proj.weight', ('attn', 'k_proj'), 'linear_in'),
    ('self_attn.v_proj.weight', ('attn', 'v_proj'), 'linear_in'),
    ('self_attn.q_proj.bias', ('attn', 'q_bias'), 'bias'),
    ('self_attn.k_proj.bias', ('attn', 'k_bias'), 'bias'),
    ('self_attn.v_proj.bias', ('attn', 'v_bias'), 'bias'),
    ('self_attn.q_norm.weight', ('attn', 'q_norm', 'weight'), 'copy'),
    ('self_attn.k_norm.weight', ('attn', 'k_norm', 'weight'), 'copy'),
    ('self_attn.o_proj.weight', ('attn', 'o_proj'), 'linear_out'),
)
_MLP_TENSORS = (
    ('mlp.gate_proj.weight', ('mlp', 'gate_proj'), 'linear_in'),
    ('mlp.up_proj.weight', ('mlp', 'up_proj'), 'linear_in'),
    ('mlp.down_proj.weight', ('mlp', 'down_proj'), 'linear_out'),
)
# Llama-style: `post_attention_layernorm` is the MLP's pre-norm. Gemma 2 / 3 (post_norms): it
# norms the attention output, and the MLP has pre_ and post_feedforward_layernorm.
_PRE_NORM_ONLY = (('post_attention_layernorm.weight', ('mlp_norm', 'weight'), 'copy'),)
_SANDWICH = (
    ('post_attention_layernorm.weight', ('attn_post_norm', 'weight'), 'copy'),
    ('pre_feedforward_layernorm.weight', ('mlp_norm', 'weight'), 'copy'),
    ('post_feedforward_layernorm.weight', ('mlp_post_norm', 'weight'), 'copy'),
)


def layer_tensors(config: ModelConfig) -> tuple:
  """(HF name after 'model.layers.{i}.', path inside a Block, kind) of one layer."""
  return _ATTENTION_TENSORS + (_SANDWICH if config.post_norms else _PRE_NORM_ONLY) + _MLP_TENSORS
