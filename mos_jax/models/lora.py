"""LoRA / QLoRA adapters on the decoder, through Google's qwix.

qwix's `LoraProvider` intercepts the decoder's projection einsums (inside `Decoder.hidden_states`)
and adds `x @ A @ B * alpha / rank` to each one whose module path matches `model.lora.targets`;
with `model.quantize` set, the same provider first replaces the frozen base weights by quantized
ones (qwix PTQ: int8 / int4 / nf4) — QLoRA. Adapters are `nnx.LoRAParam`s named
`<weight>_lora_a` [*contracting dims, r] and `<weight>_lora_b` [r, *output dims] beside the weight
they adapt; B starts at zero, so a fresh adapter leaves the model's output exactly unchanged.

Training splits the model into the adapters (trainable: gradients, AdamW state, checkpoints) and
everything else (the frozen base, stored once and sharded by the same rule table).
"""

from __future__ import annotations

import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx

QUANTIZE = ('none', 'int8', 'int4', 'nf4')
# Projections qwix may adapt, our weight name -> the HF module name (PEFT's target_modules).
HF_MODULES = {'q_proj': 'self_attn.q_proj', 'k_proj': 'self_attn.k_proj',
              'v_proj': 'self_attn.v_proj', 'o_proj': 'self_attn.o_proj',
              'gate_proj': 'mlp.gate_proj', 'up_proj': 'mlp.up_proj',
              'down_proj': 'mlp.down_proj'}


def enabled(model_config) -> bool:
  """True when `model.lora.rank` > 0 (adapters on, base frozen)."""
  return int(model_config.lora.rank) > 0


def check_config(config) -> None:
  """Raises ValueError for LoRA / quantization settings that cannot work (named by key)."""
  m = config.model
  if m.quantize not in QUANTIZE:
    raise ValueError(f'model.quantize must be one of {QUANTIZE}, got {m.quantize!r}.')
  rank = int(m.lora.rank)
  if rank < 0:
    raise ValueError(f'model.lora.rank must be >= 0 (0 = off), got {rank}.')
  if m.quantize != 'none' and rank == 0:
    raise ValueError(f'model.quantize={m.quantize!r} freezes a quantized base: it needs adapters '
                     f'to train (set model.lora.rank > 0).')
  if rank and float(m.lora.dropout) != 0.0:
    raise ValueError('model.lora.dropout > 0 is not supported yet (qwix draws dropout masks from '
                     'module-level RNG streams that our pure train step does not carry); use 0.')
  if config.mixing.diff_reference == 'base' and not rank:
    raise ValueError("mixing.diff_reference='base' (theta_0 = the base with adapters off) needs "
                     'model.lora.rank > 0.')


def _rule(lora_config, **quantization) -> qwix.LoraRule:
  return qwix.LoraRule(module_path=lora_config.targets, rank=int(lora_config.rank),
                       alpha=float(lora_config.alpha), dropout=float(lora_config.dropout),
                       **quantization)


def provider(lora_config, quantize: str = 'none', model_config=None) -> qwix.LoraProvider:
  """The qwix LoRA provider of `model.lora` / `model.quantize`."""
  tile = None
  if quantize in ('int4', 'nf4'):
    # 4-bit types keep one scale per block of inputs: QLoRA's 64, or less where a contracted
    # dimension (head_dim for o_proj) is not a multiple of 64.
    c = model_config
    tile = math.gcd(64, c.head_dim, c.hidden_size, c.intermediate_size)
  return qwix.LoraProvider([_rule(
      lora_config, weight_qtype=None if quantize == 'none' else quantize,
      tile_size=tile)])  # int8: one scale per output channel.


def add_adapters(model, lora_config, quantize: str = 'none', seed: int = 0):
  """`model` with qwix adapters (and, with `quantize`, its frozen weights quantized).

  qwix creates the adapters during one call of `hidden_states` on a one-token input; the base
  parameters are shared with `model`, not copied.
  """
  x = jnp.zeros((1, 1, model.config.hidden_size), model.config.dtype)  # [B, L, D]
  if model.config.scan_layers:
    model = nnx.clone(model)
    _stacked_adapters(model, lora_config, quantize, seed)
    # Adapters (and quantized weights) exist already; RNG state on the stacked modules would be
    # scanned over. qwix only wraps `hidden_states` and checks what it finds.
    return qwix.apply_lora_to_model(model, provider(lora_config, quantize, model.config), x,
                                    methods=('hidden_states',), rngs=None)
  adapted = qwix.apply_lora_to_model(model, provider(lora_config), x,
                                     methods=('hidden_states',), rngs=nnx.Rngs(seed))
  if quantize == 'none':
    return adapted
  # Quantizing in the same call would hide weights of equal shape (k_proj, v_proj) from qwix's
  # adapter lookup once their neighbours are replaced; with the adapters already there, this
  # second pass only swaps the frozen weights for quantized ones (later calls find them by id).
  return qwix.apply_lora_to_model(adapted, provider(lora_config, quantize, model.config), x,
                                  methods=('hidden_states',), rngs=nnx.Rngs(seed))


def _stacked_adapters(model, lora_config, quantize: str, seed: int):
  """Scanned layers: qwix cannot create variables inside the scan, so the adapters it would
  create for one layer (names, shapes, logical axes: read off qwix on an abstract one-layer
  model) are created here for all layers at once, stacked on the leading [Y] axis with the rule's
  own initialisers; with `quantize`, each layer's weight is quantized the way qwix quantizes the
  probe's (its HowToQuantize), stacked the same way. Inside the scan qwix then finds them and
  only computes with them."""
  from mos_jax.models.decoder import Decoder
  c = model.config
  one = c.replace(scan_layers=False, num_layers=1)
  probe = nnx.eval_shape(lambda: add_adapters(Decoder(one, rngs=nnx.Rngs(0)), lora_config,
                                              quantize))
  rule = _rule(lora_config)
  key = jax.random.key(seed)
  for path, name, module in adapter_pairs(probe.layers[0]):  # path inside one Block
    target = model.layers
    for k in path:
      target = getattr(target, k)
    for suffix, init in (('_lora_a', rule.lora_a_initializer), ('_lora_b', rule.lora_b_initializer)):
      var = getattr(module, name + suffix)
      shape, dtype = var.shape, var.dtype
      key, sub = jax.random.split(key)
      value = jax.vmap(lambda k: init(k, shape, dtype))(jax.random.split(sub, c.num_layers))
      logical = var.get_metadata().get('out_sharding') or (None,) * len(shape)
      setattr(target, name + suffix, nnx.LoRAParam(
          value, out_sharding=('layers',) + tuple(logical), eager_sharding=False))
    setattr(target, name + '_lora_einsum_str', getattr(module, name + '_lora_einsum_str'))
    probe_weight = getattr(module, name)
    if not isinstance(probe_weight, nnx.Variable):  # qwix WithAux: a quantized weight.
      how = probe_weight.how
      quantize_one = lambda w: qwix.quantize(
          w, how.qtype, channelwise_axes=how.channelwise_axes, tiled_axes=how.tiled_axes,
          calibration_method=how.calibration_method)
      setattr(target, name, probe_weight.replace(
          array=jax.vmap(quantize_one)(getattr(target, name)[...])))


def adapter_pairs(model):
  """[(module path, weight name, module)] of every adapted weight, in parameter order."""
  out = []
  for path, module in nnx.iter_modules(model):
    for name in HF_MODULES:
      if hasattr(module, name + '_lora_a'):
        out.append((path, name, module))
  return out


def _delta(a, b, scale):
  # A [*in, r], B [r, *out] -> [*in, *out]: the weight's own (input-first) layout.
  return scale * jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1)


def merged_model(model, lora_config):
  """A plain Decoder whose weights are W + alpha / r * A @ B (what merged export writes).

  A quantized base is dequantized first, so QLoRA runs export in the parameter dtype.
  """
  from mos_jax.models.decoder import Decoder
  scale = float(lora_config.alpha) / int(lora_config.rank)
  plain = nnx.eval_shape(lambda: Decoder(model.config, rngs=nnx.Rngs(0)))
  flat = {}
  for path, var in nnx.to_flat_state(nnx.state(plain, nnx.Param)):
    owner = model
    for key in path[:-1]:
      owner = owner[key] if isinstance(key, int) else getattr(owner, key)
    value = getattr(owner, path[-1])
    value = _dequantized(value, var.get_value().dtype)
    if hasattr(owner, path[-1] + '_lora_a'):
      a = getattr(owner, path[-1] + '_lora_a')[...]
      b = getattr(owner, path[-1] + '_lora_b')[...]
      delta = (jax.vmap(functools.partial(_delta, scale=scale)) if model.config.scan_layers
               else functools.partial(_delta, scale=scale))(a, b)
      value = (value.astype(jnp.float32) + delta).astype(var.get_value().dtype)
    flat[path] = value
  nnx.update(plain, nnx.from_flat_state(flat))
  return plain


def _dequantized(value, dtype):
  """A parameter's array: the Param's value, or a qwix quantized weight turned back to `dtype`."""
  if isinstance(value, nnx.Variable):
    value = value.get_value()
  if hasattr(value, 'array') and isinstance(value.array, qwix.QArray):  # qwix ptq.WithAux
    return qwix.dequantize(value.array).astype(dtype)
  if isinstance(value, qwix.QArray):
    return qwix.dequantize(value).astype(dtype)
  return value


def peft_tensors(model) -> dict[str, np.ndarray]:
  """PEFT's tensor names and [out, in] layouts of every adapter: lora_A [r, in], lora_B [out, r]."""
  out = {}
  scanned = model.config.scan_layers
  for path, name, module in adapter_pairs(model):
    a = np.asarray(jax.device_get(getattr(module, name + '_lora_a')[...]))
    b = np.asarray(jax.device_get(getattr(module, name + '_lora_b')[...]))
    # Scanned layers: [Y, ...] stacks under layers/attn; else one module per layers/<i>/attn.
    layers = enumerate(zip(a, b)) if scanned else [(path[1], (a, b))]
    for i, (a_i, b_i) in layers:
      prefix = f'base_model.model.model.layers.{i}.{HF_MODULES[name]}'
      r = a_i.shape[-1]
      out[f'{prefix}.lora_A.weight'] = np.ascontiguousarray(a_i.reshape(-1, r).T)
      out[f'{prefix}.lora_B.weight'] = np.ascontiguousarray(b_i.reshape(r, -1).T)
  return out


def save_peft(model, lora_config, path: str, base_model: str = '', overwrite: bool = False):
  """Writes adapter_config.json + adapter_model.safetensors that `peft.PeftModel` loads."""
  from safetensors.numpy import save_file
  if os.path.isdir(path) and os.listdir(path) and not overwrite:
    raise FileExistsError(f'{path} exists and is not an empty folder; pass overwrite=True.')
  tensors = peft_tensors(model)
  if not tensors:
    raise ValueError('The model has no adapters (model.lora.rank = 0): nothing to export.')
  names = sorted({name for _, name, _ in adapter_pairs(model)})
  config = {
      'peft_type': 'LORA', 'task_type': 'CAUSAL_LM', 'r': int(lora_config.rank),
      'lora_alpha': float(lora_config.alpha), 'lora_dropout': float(lora_config.dropout),
      'target_modules': names, 'bias': 'none', 'fan_in_fan_out': False, 'use_rslora': False,
      'inference_mode': True, 'base_model_name_or_path': base_model or None,
  }
  if jax.process_index() != 0:
    return
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, 'adapter_config.json'), 'w') as f:
    json.dump(config, f, indent=2)
  save_file(tensors, os.path.join(path, 'adapter_model.safetensors'), metadata={'format': 'pt'})


def frozen_shardings(model_config, frozen, mesh):
  """NamedShardings of the frozen base (pure dict) by the rule table of mos_jax.sharding.

  Plain weights keep their parameters' logical axes; a quantized weight's `qvalue` and `scale`
  (qwix: `<weight>/array/{qvalue,scale}`) take the weight's axes, a dimension that the mesh
  does not divide (a scale's reduced axis) staying whole.
  """
  from mos_jax import sharding
  from mos_jax.models.decoder import abstract_model
  names = {}
  for path, var in nnx.to_flat_state(nnx.state(abstract_model(model_config), nnx.Param)):
    names[tuple(path)] = var.get_metadata().get('out_sharding')

  def one(path, leaf):
    keys = tuple(getattr(k, 'key', getattr(k, 'idx', None)) for k in path)
    if keys[-2:] in (('array', 'qvalue'), ('array', 'scale')):
      keys = keys[:-2]
    logical = names[keys]
    spec = sharding.logical_to_mesh_spec(logical, leaf.shape, mesh)
    spec = sharding._fsdp_storage(spec, logical, leaf.shape, mesh)  # pylint: disable=protected-access
    return jax.sharding.NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(one, frozen)
