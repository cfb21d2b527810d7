"""Hugging Face checkpoints <-> Decoder: config translation and the tensor name mapping.

This is the only file that knows HF names. All three families store the same tensor names; they
differ in which exist (q/k/v biases for Qwen2, lm_head.weight only when untied) and in config
fields (Gemma's activation, the two rope layouts).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mos_jax.infra import sharding as sharding_lib
from mos_jax.models.config import ModelConfig
from mos_jax.models.decoder import Decoder, abstract_model
from mos_jax.models.safetensors_file import SafetensorsReader, write_safetensors

ARCHITECTURES = {'llama': 'LlamaForCausalLM', 'qwen2': 'Qwen2ForCausalLM',
                 'gemma': 'GemmaForCausalLM'}
SUPPORTED_MODEL_TYPES = tuple(sorted(ARCHITECTURES))

# HF `hidden_act` / `hidden_activation` -> ModelConfig.activation.
_ACTIVATIONS = {'silu': 'silu', 'swish': 'silu', 'gelu_pytorch_tanh': 'gelu_tanh',
                'gelu_new': 'gelu_tanh'}
_HF_ACTIVATION = {'silu': 'silu', 'gelu_tanh': 'gelu_pytorch_tanh'}

# The name mapping. Kinds say how an HF tensor becomes ours:
#   copy:       same layout (embeddings, norm weights; Gemma's norm stores w of (1 + w) in both).
#   linear_in:  HF [out, in] -> ours [in, *out_dims], e.g. q_proj [N*H, D] -> [D, N, H].
#   linear_out: HF [out, in] -> ours [*in_dims, out], e.g. o_proj [D, N*H] -> [N, H, D].
#   bias:       HF [N*H] -> ours [N, H].
_GLOBAL_TENSORS = (
    ('model.embed_tokens.weight', ('embed',), 'copy'),
    ('model.norm.weight', ('final_norm', 'weight'), 'copy'),
    ('lm_head.weight', ('lm_head',), 'linear_in'),
)
_LAYER_TENSORS = (  # HF name after 'model.layers.{i}.', our path inside a Block.
    ('input_layernorm.weight', ('attn_norm', 'weight'), 'copy'),
    ('self_attn.q_proj.weight', ('attn', 'q_proj'), 'linear_in'),
    ('self_attn.k_proj.weight', ('attn', 'k_proj'), 'linear_in'),
    ('self_attn.v_proj.weight', ('attn', 'v_proj'), 'linear_in'),
    ('self_attn.q_proj.bias', ('attn', 'q_bias'), 'bias'),
    ('self_attn.k_proj.bias', ('attn', 'k_bias'), 'bias'),
    ('self_attn.v_proj.bias', ('attn', 'v_bias'), 'bias'),
    ('self_attn.o_proj.weight', ('attn', 'o_proj'), 'linear_out'),
    ('post_attention_layernorm.weight', ('mlp_norm', 'weight'), 'copy'),
    ('mlp.gate_proj.weight', ('mlp', 'gate_proj'), 'linear_in'),
    ('mlp.up_proj.weight', ('mlp', 'up_proj'), 'linear_in'),
    ('mlp.down_proj.weight', ('mlp', 'down_proj'), 'linear_out'),
)


def _ignorable(name: str, config: ModelConfig) -> bool:
  """Tensors that HF itself drops on load: old rotary buffers, a duplicate tied lm_head."""
  return name.endswith('.rotary_emb.inv_freq') or (config.tie_embeddings and name == 'lm_head.weight')


TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json',
                   'tokenizer.model', 'vocab.json', 'merges.txt', 'added_tokens.json',
                   'chat_template.jinja', 'chat_template.json', 'generation_config.json')


class CheckpointError(ValueError):
  """An HF checkpoint (or config) that cannot be loaded; the message names what is wrong."""


# ----------------------------------------------------------------------------------------------
# Config translation.


def config_from_hf(hf: dict[str, Any], **overrides) -> ModelConfig:
  """ModelConfig from an HF config.json dict (classic or transformers-5 `rope_parameters` layout).

  `overrides` set ModelConfig fields the checkpoint does not describe (dtype, param_dtype, remat,
  scan_layers, attention_impl) or replace ones it does.
  """
  model_type = hf.get('model_type')
  if model_type not in ARCHITECTURES:
    raise CheckpointError(f'Unsupported model_type {model_type!r}; supported: '
                          f'{", ".join(SUPPORTED_MODEL_TYPES)}.')

  def need(key):
    if hf.get(key) is None:
      raise CheckpointError(f'config.json ({model_type}) lacks the required field {key!r}.')
    return hf[key]

  def refuse(condition, what):
    if condition:
      raise CheckpointError(f'config.json ({model_type}): {what} is not supported.')

  refuse(hf.get('attention_bias') and model_type != 'qwen2', 'attention_bias=true')
  refuse(hf.get('mlp_bias'), 'mlp_bias=true')
  refuse(hf.get('use_sliding_window'), 'use_sliding_window=true')
  refuse(hf.get('use_bidirectional_attention'), 'use_bidirectional_attention=true')
  refuse((hf.get('pretraining_tp') or 1) != 1, f'pretraining_tp={hf.get("pretraining_tp")}')

  # Rope: transformers 5 writes rope_parameters {rope_type, rope_theta, ...}; published
  # checkpoints have rope_theta and rope_scaling {type or rope_type, ...}.
  rope = hf.get('rope_parameters')
  if isinstance(rope, dict) and 'rope_theta' in rope:
    rope = dict(rope)
    theta = rope.pop('rope_theta')
  else:
    theta = hf.get('rope_theta', 10000.0)
    rope = dict(hf.get('rope_scaling') or {})
  rope_type = rope.pop('rope_type', None) or rope.pop('type', None) or 'default'
  rope.pop('type', None)
  if rope_type == 'default':
    rope_scaling = None
  elif rope_type == 'llama3':
    rope_scaling = {'rope_type': 'llama3', **rope}
  else:
    raise CheckpointError(f'config.json ({model_type}): rope type {rope_type!r} is not supported; '
                          'supported: default, llama3.')

  if model_type == 'gemma':
    # Published Gemma configs say hidden_act "gelu" but mean the tanh approximation (HF agrees).
    act = hf.get('hidden_activation') or hf.get('hidden_act') or 'gelu_pytorch_tanh'
    act = 'gelu_pytorch_tanh' if act == 'gelu' else act
  else:
    act = hf.get('hidden_act', 'silu')
  if act not in _ACTIVATIONS:
    raise CheckpointError(f'config.json ({model_type}): activation {act!r} is not supported; '
                          f'supported: {", ".join(_ACTIVATIONS)}.')

  heads = need('num_attention_heads')
  eos = hf.get('eos_token_id')
  fields = dict(
      family=model_type,
      vocab_size=need('vocab_size'),
      hidden_size=need('hidden_size'),
      intermediate_size=need('intermediate_size'),
      num_layers=need('num_hidden_layers'),
      num_heads=heads,
      num_kv_heads=hf.get('num_key_value_heads') or heads,
      head_dim=hf.get('head_dim') or need('hidden_size') // heads,
      rope_theta=float(theta),
      rope_scaling=rope_scaling,
      rms_norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
      tie_embeddings=bool(hf.get('tie_word_embeddings', model_type == 'gemma')),
      qkv_bias=model_type == 'qwen2',
      activation=_ACTIVATIONS[act],
      max_position_embeddings=int(hf.get('max_position_embeddings', 8192)),
      bos_token_id=hf.get('bos_token_id'),
      eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
      pad_token_id=hf.get('pad_token_id'),
  )
  fields.update(overrides)
  try:
    return ModelConfig(**fields)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f'config.json ({model_type}): {e}') from None


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
  """The config.json dict for transformers (classic layout, which transformers 4 and 5 both read)."""
  c = config
  hf = {
      'architectures': [ARCHITECTURES[c.family]],
      'model_type': c.family,
      'vocab_size': c.vocab_size,
      'hidden_size': c.hidden_size,
      'intermediate_size': c.intermediate_size,
      'num_hidden_layers': c.num_layers,
      'num_attention_heads': c.num_heads,
      'num_key_value_heads': c.num_kv_heads,
      'head_dim': c.head_dim,
      'hidden_act': _HF_ACTIVATION[c.activation],
      'max_position_embeddings': c.max_position_embeddings,
      'rms_norm_eps': c.rms_norm_eps,
      'rope_theta': c.rope_theta,
      'rope_scaling': c.rope_scaling_dict or None,
      'tie_word_embeddings': c.tie_embeddings,
      'bos_token_id': c.bos_token_id,
      'eos_token_id': list(c.eos_token_id) if isinstance(c.eos_token_id, tuple) else c.eos_token_id,
      'pad_token_id': c.pad_token_id,
      'attention_dropout': 0.0,
      'initializer_range': 0.02,
      'use_cache': True,
      'torch_dtype': c.param_dtype,
  }
  if c.family == 'gemma':
    hf['hidden_activation'] = hf['hidden_act']
  if c.family == 'llama':
    hf.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
  if c.family == 'qwen2':
    hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=c.num_layers)
  return hf


# ----------------------------------------------------------------------------------------------
# Tensor plan: which HF tensor fills which part of which parameter.


@dataclasses.dataclass(frozen=True)
class _Tensor:
  hf_name: str
  path: tuple          # path of the nnx.Param in the Decoder's state
  layer: int | None    # index along the stacked [Y] axis when layers are scanned
  kind: str


def _plan(config: ModelConfig, param_paths) -> list[_Tensor]:
  """Every HF tensor of this config, in HF's order, checked to cover every parameter exactly."""
  present = set(param_paths)
  plan = [_Tensor(name, path, None, kind) for name, path, kind in _GLOBAL_TENSORS
          if path in present]
  for i in range(config.num_layers):
    for suffix, sub, kind in _LAYER_TENSORS:
      path = ('layers',) + sub if config.scan_layers else ('layers', i) + sub
      if path in present:
        plan.append(_Tensor(f'model.layers.{i}.{suffix}', path, i if config.scan_layers else None,
                            kind))
  uncovered = present - {t.path for t in plan}
  assert not uncovered, f'hf_io name mapping misses parameters {sorted(uncovered)}'
  return plan


def _hf_shape(ours: tuple, kind: str) -> tuple:
  if kind == 'linear_in':
    return (math.prod(ours[1:]), ours[0])
  if kind == 'linear_out':
    return (ours[-1], math.prod(ours[:-1]))
  if kind == 'bias':
    return (math.prod(ours),)
  return tuple(ours)


def _to_ours(array: np.ndarray, ours: tuple, kind: str) -> np.ndarray:
  return array.T.reshape(ours) if kind in ('linear_in', 'linear_out') else array.reshape(ours)


def _to_hf(array: np.ndarray, kind: str) -> np.ndarray:
  if kind == 'linear_in':
    return array.reshape(array.shape[0], -1).T
  if kind == 'linear_out':
    return array.reshape(-1, array.shape[-1]).T
  return array.reshape(_hf_shape(array.shape, kind))


def _layer_shape(shape: tuple, t: _Tensor) -> tuple:
  return tuple(shape[1:]) if t.layer is not None else tuple(shape)


# ----------------------------------------------------------------------------------------------
# Loading.


def _read_json(path: Path) -> dict:
  if not path.is_file():
    raise FileNotFoundError(f'Checkpoint file not found: {path}')
  try:
    return json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f'Corrupt JSON file {path}: {e}') from None


def _open_tensor_files(folder: Path) -> dict[str, SafetensorsReader]:
  """HF tensor name -> the reader of the file holding it (single file or sharded with an index)."""
  index_path = folder / 'model.safetensors.index.json'
  single_path = folder / 'model.safetensors'
  if index_path.is_file():
    weight_map = _read_json(index_path).get('weight_map')
    if not isinstance(weight_map, dict):
      raise CheckpointError(f'Corrupt index file {index_path}: no "weight_map" object.')
    readers = {f: SafetensorsReader(folder / f) for f in sorted(set(weight_map.values()))}
    by_name = {}
    for file, reader in readers.items():
      for name in reader.keys():
        by_name[name] = reader
    not_in_file = sorted(n for n, f in weight_map.items() if n not in readers[f].keys())
    if not_in_file:
      raise CheckpointError(f'{index_path} lists tensors that are not in their files: {not_in_file}')
    return by_name
  if single_path.is_file():
    reader = SafetensorsReader(single_path)
    return {name: reader for name in reader.keys()}
  others = sorted(p.name for p in folder.glob('*')) if folder.is_dir() else []
  raise FileNotFoundError(f'No safetensors weights in {folder}: expected model.safetensors or '
                          f'model.safetensors.index.json (found: {others}).')


def load_hf(path: str | os.PathLike, dtype: Any = jnp.float32, mesh: jax.sharding.Mesh | None = None,
            param_dtype: Any = None, **overrides) -> Decoder:
  """Loads an HF Llama / Qwen2 / Gemma folder (config.json + safetensors) into a Decoder.

  dtype: compute dtype; param_dtype: storage dtype (default: dtype). Other ModelConfig fields
  (remat, scan_layers, attention_impl, ...) can be given as keywords. With a mesh, every tensor
  is put straight onto its sharding as it is read; host memory holds one tensor (one stacked
  parameter when scanning) at a time. Every check runs before any weight is read.
  """
  folder = Path(path)
  hf_config = _read_json(folder / 'config.json')
  dtype = jnp.dtype(dtype).name
  param_dtype = jnp.dtype(param_dtype).name if param_dtype is not None else dtype
  config = config_from_hf(hf_config, dtype=dtype, param_dtype=param_dtype, **overrides)

  graphdef, abstract_state = nnx.split(abstract_model(config))
  variables = dict(nnx.to_flat_state(abstract_state))
  shardings = (None if mesh is None else
               dict(nnx.to_flat_state(sharding_lib.state_shardings(abstract_state, mesh))))
  plan = _plan(config, variables)
  files = _open_tensor_files(folder)

  expected = {t.hf_name for t in plan}
  missing = sorted(expected - set(files))
  unexpected = sorted(n for n in set(files) - expected if not _ignorable(n, config))
  if missing or unexpected:
    raise CheckpointError(
        f'Checkpoint {folder} does not match its config ({config.family}, {config.num_layers} '
        f'layers, tie_embeddings={config.tie_embeddings}): missing tensors {missing}; '
        f'unexpected tensors {unexpected}.')
  mismatched = []
  for t in plan:
    want = _hf_shape(_layer_shape(variables[t.path].shape, t), t.kind)
    got = files[t.hf_name].shape(t.hf_name)
    if tuple(got) != want:
      mismatched.append(f'{t.hf_name}: expected {list(want)}, found {list(got)}')
  if mismatched:
    raise CheckpointError(f'Checkpoint {folder} has tensors of the wrong shape: '
                          + '; '.join(mismatched))

  np_dtype = np.dtype(jnp.dtype(param_dtype))
  by_path: dict[tuple, list[_Tensor]] = {}
  for t in plan:
    by_path.setdefault(t.path, []).append(t)
  loaded = []
  for path_, tensors in by_path.items():
    var = variables[path_]
    if tensors[0].layer is None:
      (t,) = tensors
      host = _to_ours(files[t.hf_name].read(t.hf_name), var.shape, t.kind).astype(np_dtype)
    else:  # Stack the layers into one buffer: the only extra host memory is this one parameter.
      host = np.empty(var.shape, np_dtype)
      for t in tensors:
        host[t.layer] = _to_ours(files[t.hf_name].read(t.hf_name), var.shape[1:], t.kind)
    value = jax.device_put(host, None if shardings is None else shardings[path_].get_value())
    del host
    loaded.append((path_, var.replace(value)))
  return nnx.merge(graphdef, nnx.from_flat_state(loaded))


# ----------------------------------------------------------------------------------------------
# Saving.


def _host_value(array: jax.Array) -> np.ndarray:
  if isinstance(array, jax.Array) and not array.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
  return np.asarray(jax.device_get(array))


def _shards(specs: list[tuple[str, np.dtype, tuple]], max_bytes: int) -> Iterator[list]:
  group, size = [], 0
  for spec in specs:
    nbytes = math.prod(spec[2]) * spec[1].itemsize
    if group and size + nbytes > max_bytes:
      yield group
      group, size = [], 0
    group.append(spec)
    size += nbytes
  if group:
    yield group


def save_hf(model: Decoder, path: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
            *, max_shard_bytes: int = 5 * 2**30, overwrite: bool = False) -> None:
  """Writes config.json + safetensors (+ tokenizer files from tokenizer_dir) in HF layout.

  Everything is written into a temporary folder beside `path` and renamed into place at the end,
  so a failure leaves nothing half-written. Tensors keep the parameter dtype. An existing non-empty
  `path` is replaced only with overwrite=True. With several processes, all must call this (the
  tensors are gathered collectively); only process 0 writes.
  """
  config: ModelConfig = model.config
  dest = Path(path)
  if dest.exists() and not (dest.is_dir() and not any(dest.iterdir())) and not overwrite:
    raise FileExistsError(f'{dest} exists and is not an empty folder; pass overwrite=True.')
  tok_files = []
  if tokenizer_dir is not None:
    tok_dir = Path(tokenizer_dir)
    tok_files = [tok_dir / f for f in TOKENIZER_FILES if (tok_dir / f).is_file()]
    if not tok_files:
      raise FileNotFoundError(f'No tokenizer files in {tok_dir} (looked for {TOKENIZER_FILES}).')

  variables = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  plan = _plan(config, variables)
  tensors = {t.hf_name: t for t in plan}
  np_dtype = np.dtype(jnp.dtype(config.param_dtype))
  specs = [(t.hf_name, np_dtype, _hf_shape(_layer_shape(variables[t.path].shape, t), t.kind))
           for t in plan]

  def produce(name: str) -> np.ndarray:
    t = tensors[name]
    value = variables[t.path].get_value()
    if t.layer is not None:
      value = value[t.layer]
    return _to_hf(_host_value(value), t.kind).astype(np_dtype)

  writer = jax.process_index() == 0
  if writer:
    dest.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f'.{dest.name}.tmp-', dir=dest.parent)) if writer else None
  try:
    groups = list(_shards(specs, max_shard_bytes))
    weight_map = {}
    for k, group in enumerate(groups):
      fname = ('model.safetensors' if len(groups) == 1 else
               f'model-{k + 1:05d}-of-{len(groups):05d}.safetensors')
      if writer:
        write_safetensors(tmp / fname, group, produce, metadata={'format': 'pt'})
      else:
        for name, _, _ in group:
          produce(name)  # Take part in the collective gathers.
      weight_map.update({name: fname for name, _, _ in group})
    if not writer:
      return
    if len(groups) > 1:
      total = sum(math.prod(s[2]) * s[1].itemsize for s in specs)
      (tmp / 'model.safetensors.index.json').write_text(json.dumps(
          {'metadata': {'total_size': total}, 'weight_map': weight_map}, indent=2))
    for f in tok_files:
      shutil.copy2(f, tmp / f.name)
    (tmp / 'config.json').write_text(json.dumps(config_to_hf(config), indent=2) + '\n')
    if dest.exists():
      old = Path(tempfile.mkdtemp(prefix=f'.{dest.name}.old-', dir=dest.parent))
      dest.rename(old / dest.name)
      tmp.rename(dest)
      shutil.rmtree(old)
    else:
      tmp.rename(dest)
    tmp = None
  finally:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)
