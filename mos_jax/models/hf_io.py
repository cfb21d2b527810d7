"""Hugging Face checkpoints <-> Decoder: config translation and the tensor plan.

Every family's config.json fields and tensor names live in mos_jax.models.families (one table);
this file applies them: the common config fields, the rope layouts (classic rope_theta /
rope_scaling, transformers-5 rope_parameters, Gemma 3's per-layer-type rope_parameters), and the
tensor reading and writing.
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
from mos_jax.models import families
from mos_jax.models.config import ModelConfig
from mos_jax.models.decoder import Decoder, abstract_model
from mos_jax.models.families import CheckpointError, SUPPORTED_MODEL_TYPES
from mos_jax.models.safetensors_file import SafetensorsReader, write_safetensors

__all__ = ['CheckpointError', 'SUPPORTED_MODEL_TYPES', 'config_from_hf', 'config_to_hf',
           'load_hf', 'save_hf']

# HF `hidden_act` / `hidden_activation` -> ModelConfig.activation.
_ACTIVATIONS = {'silu': 'silu', 'swish': 'silu', 'gelu_pytorch_tanh': 'gelu_tanh',
                'gelu_new': 'gelu_tanh'}
_HF_ACTIVATION = {'silu': 'silu', 'gelu_tanh': 'gelu_pytorch_tanh'}


def _ignorable(name: str, config: ModelConfig) -> bool:
  """Tensors that HF itself drops on load: old rotary buffers, a duplicate tied lm_head."""
  return name.endswith('.rotary_emb.inv_freq') or (config.tie_embeddings and name == 'lm_head.weight')


TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json',
                   'tokenizer.model', 'vocab.json', 'merges.txt', 'added_tokens.json',
                   'chat_template.jinja', 'chat_template.json', 'generation_config.json')


# ----------------------------------------------------------------------------------------------
# Config translation.


def _rope_fields(hf: dict, model_type: str, family: families.Family) -> dict:
  """rope_theta, rope_scaling (and Gemma 3's rope_local_theta) from any of the three layouts."""
  rope = hf.get('rope_parameters')
  local_theta = hf.get('rope_local_base_freq')
  if isinstance(rope, dict) and ('full_attention' in rope or 'sliding_attention' in rope):
    if not family.local_rope:
      families.refuse(model_type, 'rope_parameters per layer type')
    theta, scaling = families.parse_rope(model_type, 'rope_parameters.full_attention',
                                         rope.get('full_attention'))
    local_theta, local_scaling = families.parse_rope(
        model_type, 'rope_parameters.sliding_attention', rope.get('sliding_attention'))
    if local_scaling is not None:
      families.refuse(model_type, 'rope scaling on sliding_attention layers')
  elif isinstance(rope, dict) and 'rope_theta' in rope:  # transformers 5
    theta, scaling = families.parse_rope(model_type, 'rope_parameters', rope)
  else:  # Published checkpoints: rope_theta and rope_scaling {type or rope_type, ...}.
    theta = hf.get('rope_theta')
    _, scaling = families.parse_rope(model_type, 'rope_scaling', hf.get('rope_scaling'))
  fields = {'rope_theta': float(family.default_theta if theta is None else theta),
            'rope_scaling': scaling}
  if family.local_rope:
    fields['rope_local_theta'] = float(10000.0 if local_theta is None else local_theta)
  return fields


def config_from_hf(hf: dict[str, Any], **overrides) -> ModelConfig:
  """ModelConfig from an HF config.json dict (classic or transformers-5 `rope_parameters` layout).

  `overrides` set ModelConfig fields the checkpoint does not describe (dtype, param_dtype, remat,
  scan_layers, attention_impl) or replace ones it does.
  """
  model_type = hf.get('model_type')
  if model_type in families.REFUSED_TYPES:
    raise CheckpointError(f'Unsupported model_type {model_type!r}: '
                          f'{families.REFUSED_TYPES[model_type]}.')
  if model_type not in families.FAMILY_TABLE:
    raise CheckpointError(f'Unsupported model_type {model_type!r}; supported: '
                          f'{", ".join(SUPPORTED_MODEL_TYPES)}.')
  family = families.FAMILY_TABLE[model_type]
  families.check_fields(hf, model_type)

  def need(key):
    if hf.get(key) is None:
      raise CheckpointError(f'config.json ({model_type}) lacks the required field {key!r}.')
    return hf[key]

  if family.gemma_activation:
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
  for key in ('hidden_size', 'num_hidden_layers', 'vocab_size', 'intermediate_size'):
    need(key)
  fields = dict(
      family=model_type,
      vocab_size=hf['vocab_size'],
      hidden_size=hf['hidden_size'],
      intermediate_size=hf['intermediate_size'],
      num_layers=hf['num_hidden_layers'],
      num_heads=heads,
      num_kv_heads=hf.get('num_key_value_heads') or heads,
      head_dim=hf.get('head_dim') or hf['hidden_size'] // heads,
      rms_norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
      tie_embeddings=bool(hf.get('tie_word_embeddings', family.tied_by_default)),
      activation=_ACTIVATIONS[act],
      max_position_embeddings=int(hf.get('max_position_embeddings', 8192)),
      bos_token_id=hf.get('bos_token_id'),
      eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
      pad_token_id=hf.get('pad_token_id'),
      **_rope_fields(hf, model_type, family),
      **family.from_hf(hf, model_type),
  )
  fields.update(overrides)
  try:
    return ModelConfig(**fields)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f'config.json ({model_type}): {e}') from None


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
  """The config.json dict for transformers (classic layout, which transformers 4 and 5 both read)."""
  c = config
  family = families.FAMILY_TABLE[c.family]
  hf = {
      'architectures': [family.architecture],
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
  if family.gemma_activation:
    hf['hidden_activation'] = hf['hidden_act']
  if family.local_rope:
    hf['rope_local_base_freq'] = c.rope_local_theta
  hf.update(family.to_hf(c))
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
  plan = [_Tensor(name, path, None, kind) for name, path, kind in families.GLOBAL_TENSORS
          if path in present]
  for i in range(config.num_layers):
    for suffix, sub, kind in families.layer_tensors(config):
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
  """Loads an HF folder (config.json + safetensors) of a family in SUPPORTED_MODEL_TYPES.

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
  for t in plan:  # The first tensor whose shape disagrees with config.json, both shapes.
    want = _hf_shape(_layer_shape(variables[t.path].shape, t), t.kind)
    got = files[t.hf_name].shape(t.hf_name)
    if tuple(got) != want:
      raise CheckpointError(f'Checkpoint {folder} does not match its config.json: tensor '
                            f'{t.hf_name}: expected {list(want)} (from config.json), found '
                            f'{list(got)}.')

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
