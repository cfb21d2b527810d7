"""LoRA / QLoRA adapters on the decoder, through Google's qwix.

qwix's `LoraProvider` intercepts the decoder's projection einsums (inside `Decoder.hidden_states`)
and adds `x @ A @ B * alpha / rank` to each one whose parameter path (`layers/3/attn/q_proj`)
matches `model.lora.targets`; with `model.quantize` set, the same provider first replaces every
frozen projection weight by a quantized one (qwix PTQ: int8 / int4 / nf4) — QLoRA. Adapters are
`nnx.LoRAParam`s named `<weight>_lora_a` [*contracting dims, r] and `<weight>_lora_b`
[r, *output dims] beside the weight they adapt; B starts at zero, so a fresh adapter leaves the
model's output exactly unchanged. LoRA dropout (`model.lora.dropout`) is on only in a forward
whose model carries a dropout key (`with_dropout`: the train step's, from (seed, step)); every
other forward (eval, rewards, theta_0, generation, export) is deterministic.

Training splits the model into the adapters (trainable: gradients, AdamW state, checkpoints) and
everything else (the frozen base, stored once and sharded by the same rule table).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx
# How qwix itself finds the weight of an intercepted einsum and its module (qwix==0.1.8).
from qwix._src.providers import ptq
from qwix._src.utils import flax_util

from mos_jax.infra import sharding
from mos_jax.models.decoder import Decoder, abstract_model

QUANTIZE = ('none', 'int8', 'int4', 'nf4')
# Projections qwix may adapt, our weight name -> the HF module name (PEFT's target_modules).
HF_MODULES = {'q_proj': 'self_attn.q_proj', 'k_proj': 'self_attn.k_proj',
              'v_proj': 'self_attn.v_proj', 'o_proj': 'self_attn.o_proj',
              'gate_proj': 'mlp.gate_proj', 'up_proj': 'mlp.up_proj',
              'down_proj': 'mlp.down_proj'}
# The same projections by our module: parameter paths are layers/<i>/<module>/<weight>.
PROJECTIONS = {name: hf.split('.')[0].replace('self_attn', 'attn') for name, hf in HF_MODULES.items()}
# qwix rule scope: every projection module (quantization covers them all; adapters are filtered
# per weight by `model.lora.targets`).
_MODULES = '.*/(attn|mlp)'


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
  if not 0.0 <= float(m.lora.dropout) < 1.0:
    raise ValueError(f'model.lora.dropout must be in [0, 1), got {m.lora.dropout}.')
  try:
    re.compile(m.lora.targets)
  except re.error as e:
    raise ValueError(f'model.lora.targets={m.lora.targets!r} is not a regex: {e}.') from None
  if config.mixing.diff_reference == 'base' and not rank:
    raise ValueError("mixing.diff_reference='base' (theta_0 = the base with adapters off) needs "
                     'model.lora.rank > 0.')


def target_paths(lora_config, model_config) -> list[str]:
  """The parameter paths `layers/<i>/<attn|mlp>/<weight>` that `model.lora.targets` selects
  (a full match, in layer order). Scanned layers share one stacked adapter per weight, so there a
  weight is selected in every layer or in none."""
  n = model_config.num_layers
  available = [f'layers/{i}/{module}/{name}' for i in range(n)
               for name, module in PROJECTIONS.items()]
  chosen = [p for p in available if re.fullmatch(lora_config.targets, p)]
  if not chosen:
    raise ValueError(
        f'model.lora.targets={lora_config.targets!r} matches no projection. It is a regex (full '
        f'match) over the paths layers/<i>/<module>/<weight> with i in 0..{n - 1}; layer 0 has '
        f'{", ".join(available[:len(PROJECTIONS)])}.')
  if model_config.scan_layers:
    for name in PROJECTIONS:
      layers = [int(p.split('/')[1]) for p in chosen if p.endswith('/' + name)]
      if layers and len(layers) != n:
        raise ValueError(
            f'model.lora.targets={lora_config.targets!r} selects {name} in layers {layers} only: '
            f'with model.scan_layers=True every layer shares one stacked adapter per weight; '
            f'select all layers or set model.scan_layers=False.')
  return chosen


def _targeted(paths, scanned: bool) -> frozenset:
  """{(qwix module path, weight name)} of the selected paths: `layers/<i>/attn` unscanned,
  `layers/attn` (one module for all layers) scanned."""
  out = set()
  for p in paths:
    layers, i, module, name = p.split('/')
    out.add(('/'.join((layers, module) if scanned else (layers, i, module)), name))
  return frozenset(out)


class _Provider(qwix.LoraProvider):
  """qwix's LoRA provider on the weights `model.lora.targets` selects, with LoRA dropout only
  where the module carries a dropout key (`with_dropout`).

  qwix matches rules by module path, and q, k, v and o share the attention module: a projection
  that is not targeted goes through qwix's PTQ einsum only (quantized with the rest of the base,
  no adapter). qwix draws dropout masks from its module's `qwix_rngs`; a forward without a
  'dropout' stream there is deterministic here instead of an error.
  """

  def __init__(self, rule: qwix.LoraRule, targeted: frozenset):
    super().__init__([rule])
    self._targeted = targeted

  def einsum(self, einsum_str, *operands, **kwargs):
    if len(operands) == 2:
      name = flax_util.find_param(operands[1], ptq.WithAux)
      module = flax_util.get_current_module()
      path = '/'.join(map(str, getattr(module, 'qwix_path', ())))
      if name is not None and (path, name) not in self._targeted:
        return qwix.PtqProvider.einsum(self, einsum_str, *operands, **kwargs)
    return super().einsum(einsum_str, *operands, **kwargs)

  def _get_current_rule_and_op_id(self, op_name, **kwargs):
    rule, op_id = super()._get_current_rule_and_op_id(op_name, **kwargs)
    if isinstance(rule, qwix.LoraRule) and rule.dropout:
      # Only a `with_dropout` stream turns it on: the Rngs qwix holds while creating adapters
      # must not be drawn from (the adapters' initial values would depend on the rate).
      rngs = getattr(flax_util.get_current_module(), 'qwix_rngs', None)
      if rngs is None or 'dropout' not in rngs:
        rule = dataclasses.replace(rule, dropout=0.0)
    return rule, op_id


def _rule(lora_config, **quantization) -> qwix.LoraRule:
  return qwix.LoraRule(module_path=_MODULES, rank=int(lora_config.rank),
                       alpha=float(lora_config.alpha), dropout=float(lora_config.dropout),
                       **quantization)


def provider(lora_config, quantize: str = 'none', model_config=None,
             targeted: frozenset | None = None) -> qwix.LoraProvider:
  """The qwix LoRA provider of `model.lora` / `model.quantize` for a model of `model_config`
  (`targeted`: its (module path, weight) pairs, by default those of `model.lora.targets`)."""
  if targeted is None:
    targeted = _targeted(target_paths(lora_config, model_config), model_config.scan_layers)
  tile = None
  if quantize in ('int4', 'nf4'):
    # 4-bit types keep one scale per block of inputs: QLoRA's 64, or less where a contracted
    # dimension (head_dim for o_proj) is not a multiple of 64.
    c = model_config
    tile = math.gcd(64, c.head_dim, c.hidden_size, c.intermediate_size)
  return _Provider(_rule(lora_config, weight_qtype=None if quantize == 'none' else quantize,
                         tile_size=tile), targeted)  # int8: one scale per output channel.


def add_adapters(model, lora_config, quantize: str = 'none', seed: int = 0,
                 targeted: frozenset | None = None):
  """`model` with qwix adapters on the projections `model.lora.targets` selects (and, with
  `quantize`, every frozen projection weight quantized).

  qwix creates the adapters during one call of `hidden_states` on a one-token input; the base
  parameters are shared with `model`, not copied.
  """
  c = model.config
  if targeted is None:
    targeted = _targeted(target_paths(lora_config, c), c.scan_layers)
  make = functools.partial(provider, lora_config, model_config=c, targeted=targeted)
  x = jnp.zeros((1, 1, c.hidden_size), c.dtype)  # [B, L, D]
  if c.scan_layers:
    model = nnx.clone(model)
    _stacked_adapters(model, lora_config, quantize, seed, {name for _, name in targeted})
    # Adapters (and quantized weights) exist already; RNG state on the stacked modules would be
    # scanned over. qwix only wraps `hidden_states` and checks what it finds.
    return qwix.apply_lora_to_model(model, make(quantize), x, methods=('hidden_states',),
                                    rngs=None)
  adapted = qwix.apply_lora_to_model(model, make(), x, methods=('hidden_states',),
                                     rngs=nnx.Rngs(seed))
  if quantize == 'none':
    return adapted
  # Quantizing in the same call would hide weights of equal shape (k_proj, v_proj) from qwix's
  # adapter lookup once their neighbours are replaced; with the adapters already there, this
  # second pass only swaps the frozen weights for quantized ones (later calls find them by id).
  return qwix.apply_lora_to_model(adapted, make(quantize), x, methods=('hidden_states',),
                                  rngs=nnx.Rngs(seed))


def _stacked_adapters(model, lora_config, quantize: str, seed: int, names):
  """Scanned layers: qwix cannot create variables inside the scan, so the adapters it would
  create for one layer (names, shapes, logical axes: read off qwix on an abstract one-layer
  model) are created here for all layers at once, stacked on the leading [Y] axis with the rule's
  own initialisers; with `quantize`, each layer's projection weights are quantized the way qwix
  quantizes the probe's (its HowToQuantize), stacked the same way. Inside the scan qwix then
  finds them and only computes with them. `names`: the adapted weights (in every layer)."""
  c = model.config
  one = c.replace(scan_layers=False, num_layers=1, layer_types=c.layer_types and c.layer_types[:1])
  probe_targets = frozenset((f'layers/0/{PROJECTIONS[n]}', n) for n in names)
  probe = nnx.eval_shape(lambda: add_adapters(Decoder(one, rngs=nnx.Rngs(0)), lora_config,
                                              quantize, targeted=probe_targets))
  rule = _rule(lora_config)
  key = jax.random.key(seed)
  for path, name, module in adapter_pairs(probe.layers[0]):  # path inside one Block
    target = _child(model.layers, path)
    for suffix, init in (('_lora_a', rule.lora_a_initializer), ('_lora_b', rule.lora_b_initializer)):
      var = getattr(module, name + suffix)
      shape, dtype = var.shape, var.dtype
      key, sub = jax.random.split(key)
      value = jax.vmap(lambda k: init(k, shape, dtype))(jax.random.split(sub, c.num_layers))
      logical = var.get_metadata().get('out_sharding') or (None,) * len(shape)
      setattr(target, name + suffix, nnx.LoRAParam(
          value, out_sharding=('layers',) + tuple(logical), eager_sharding=False))
    setattr(target, name + '_lora_einsum_str', getattr(module, name + '_lora_einsum_str'))
  for name, module_name in PROJECTIONS.items():  # Adapted or not, the base is quantized.
    probe_weight = getattr(getattr(probe.layers[0], module_name), name)
    if not isinstance(probe_weight, nnx.Variable):  # qwix WithAux: a quantized weight.
      target = getattr(model.layers, module_name)
      how = probe_weight.how
      quantize_one = lambda w: qwix.quantize(
          w, how.qtype, channelwise_axes=how.channelwise_axes, tiled_axes=how.tiled_axes,
          calibration_method=how.calibration_method)
      setattr(target, name, probe_weight.replace(
          array=jax.vmap(quantize_one)(getattr(target, name)[...])))


def _child(module, path):
  for k in path:
    module = module[k] if isinstance(k, int) else getattr(module, k)
  return module


def with_dropout(model, key):
  """`model` (a fresh merge, e.g. inside the train step) with LoRA dropout on: every adapted
  module gets its own dropout stream from `key` (scanned layers: one key per layer, so each layer
  draws its own masks); qwix draws one mask per adapted einsum from it. Without this, forwards
  are deterministic."""
  modules = {}
  for path, _, module in adapter_pairs(model):
    modules.setdefault(path, module)
  for i, module in enumerate(modules.values()):
    sub = jax.random.fold_in(key, i)
    if model.config.scan_layers:
      sub = jax.random.split(sub, model.config.num_layers)
    module.qwix_rngs = nnx.data(nnx.Rngs(dropout=sub))
  return model


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
  # target_modules: the adapted modules exactly. PEFT matches a name or a dotted suffix, so
  # weight names when every layer has the same adapters, else each module's full name.
  per_layer = {}
  for key in tensors:
    _, _, _, _, i, *module, _, _ = key.split('.')  # base_model.model.model.layers.<i>.<module>....
    per_layer.setdefault(int(i), set()).add('.'.join(module))
  kinds = {frozenset(v) for v in per_layer.values()}
  if len(per_layer) == model.config.num_layers and len(kinds) == 1:
    names = sorted(m.split('.')[-1] for m in kinds.pop())
  else:
    names = sorted(f'model.layers.{i}.{m}' for i, v in per_layer.items() for m in v)
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
  """NamedShardings of the frozen base (pure dict) by the rule table of mos_jax.infra.sharding.

  Plain weights keep their parameters' logical axes; a quantized weight's `qvalue` and `scale`
  (qwix: `<weight>/array/{qvalue,scale}`) take the weight's axes, a dimension that the mesh
  does not divide (a scale's reduced axis) staying whole.
  """
  names = {}
  for path, var in nnx.to_flat_state(nnx.state(abstract_model(model_config), nnx.Param)):
    names[tuple(path)] = var.get_metadata().get('out_sharding')

  def one(path, leaf):
    keys = tuple(getattr(k, 'key', getattr(k, 'idx', None)) for k in path)
    if keys[-2:] in (('array', 'qvalue'), ('array', 'scale')):
      keys = keys[:-2]
    logical = names[keys]
    spec = sharding.logical_to_mesh_spec(logical, leaf.shape, mesh)
    spec = sharding.fsdp_storage(spec, logical, leaf.shape, mesh)
    return jax.sharding.NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(one, frozen)
