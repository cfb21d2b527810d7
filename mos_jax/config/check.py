"""Checks a run config before anything is built or written: every bad value, named, at once.

`validate(config)` raises one ValueError listing each key whose value cannot work
(`train.lr=-1.0 must be > 0; mixing.update_every=0 must be >= 1`), so a run is refused in
milliseconds instead of after loading data and compiling, and its workdir stays untouched.
Checks that need the data (dataset sizes, formats) stay where the data is read.
"""

from __future__ import annotations

import math
import os

from mos_jax import mixing
from mos_jax.config import other_runs
from mos_jax.models import lora
from mos_jax.models import presets

DTYPES = ('float32', 'bfloat16', 'float16')
ATTENTION_IMPLS = ('', 'xla', 'cudnn', 'triton', 'splash')
REMAT = ('none', 'full', 'save_dots', 'save_dots_no_batch', True, False)


def _get(config, key: str):
  for part in key.split('.'):
    config = config[part]
  return config


def _problems(config) -> list[str]:
  out = []

  def need(ok: bool, key: str, rule: str):
    if not ok:
      out.append(f'{key}={_get(config, key)!r} {rule}')

  def number(key, low=None, high=None, low_open=False, high_open=False, integer=False):
    node = _get(config, key)
    kind = int if integer else (int, float)
    if isinstance(node, bool) or not isinstance(node, kind) or (
        isinstance(node, float) and math.isnan(node)):
      out.append(f'{key}={node!r} must be {"an integer" if integer else "a number"}')
      return
    if low is not None and (node <= low if low_open else node < low):
      out.append(f'{key}={node!r} must be {">" if low_open else ">="} {low}')
    elif high is not None and (node >= high if high_open else node > high):
      out.append(f'{key}={node!r} must be {"<" if high_open else "<="} {high}')

  m, d, t, x = config.model, config.data, config.train, config.mixing
  if not m.hf_checkpoint:
    need(m.preset in presets.PRESETS, 'model.preset',
         f'is not a preset; choose one of {sorted(presets.PRESETS)} or set model.hf_checkpoint')
  else:
    need(os.path.isdir(os.path.expanduser(m.hf_checkpoint)), 'model.hf_checkpoint',
         'is not a folder (a local Hugging Face checkpoint: config.json + safetensors)')
    need(not m.get('vocab_size', 0), 'model.vocab_size',
         'sizes a preset only; a checkpoint brings its own embedding table (set it to 0)')
  number('model.vocab_size', 0, integer=True)
  need(m.dtype in DTYPES, 'model.dtype', f'must be one of {DTYPES}')
  need(m.param_dtype in DTYPES, 'model.param_dtype', f'must be one of {DTYPES}')
  need(m.attention_impl in ATTENTION_IMPLS, 'model.attention_impl',
       f'must be one of {ATTENTION_IMPLS}')
  need(m.remat in REMAT, 'model.remat', f'must be one of {REMAT[:4]}')
  number('model.loss_chunk', 0, integer=True)
  try:  # LoRA rank, dropout, quantization and the DIFF reference they allow.
    lora.check_config(config)
  except ValueError as e:
    out.append(str(e).rstrip('.'))

  number('data.max_len', 2, integer=True)
  need(d.truncation in ('truncate', 'drop'), 'data.truncation', "must be 'truncate' or 'drop'")
  need(d.on_error in ('raise', 'skip'), 'data.on_error', "must be 'raise' or 'skip'")
  need(d.mix_per in ('batch', 'example'), 'data.mix_per', "must be 'batch' or 'example'")
  need(d.get('draws', 'random') in ('random', 'balanced'), 'data.draws',
       "must be 'random' or 'balanced'")
  need(x.get('unit', 'example') in ('example', 'token', 'row'), 'mixing.unit',
       "must be 'example', 'token' or 'row'")
  number('data.num_workers', 0, integer=True)
  number('data.reward_batch_size', 1, integer=True)
  number('data.eval_batch_size', 1, integer=True)
  number('data.reward_micro_batch', 0, integer=True)
  number('data.prefetch', 0, integer=True)
  buckets = list(d.buckets)
  need(all(isinstance(b, int) and 0 < b <= d.max_len for b in buckets)
       and buckets == sorted(set(buckets)), 'data.buckets',
       'must be increasing positive lengths <= data.max_len')
  if not len(d.datasets):
    out.append('data.datasets is empty: add at least one dataset(...)')
  for name, entry in d.datasets.items():
    need(bool(entry.path), f'data.datasets.{name}.path', 'is empty')
    number(f'data.datasets.{name}.max_examples', 0, integer=True)
    number(f'data.datasets.{name}.dev_examples', 0, integer=True)
    if 'test_examples' in entry:
      number(f'data.datasets.{name}.test_examples', 0, integer=True)
    if 'sample' in entry:
      need(entry.sample in ('first', 'random'), f'data.datasets.{name}.sample',
           "must be 'first' or 'random'")

  for key in ('steps', 'batch_size', 'micro_batches', 'max_bad_steps', 'log_every',
              'keep_checkpoints'):
    number(f'train.{key}', 1, integer=True)
  for key in ('eval_every', 'eval_batches', 'checkpoint_every'):
    number(f'train.{key}', 0, integer=True)
  if isinstance(t.micro_batches, int) and t.micro_batches >= 1 and isinstance(
      t.batch_size, int) and t.batch_size % t.micro_batches:
    out.append(f'train.batch_size={t.batch_size} is not divisible by '
               f'train.micro_batches={t.micro_batches}')
  number('train.epochs', 0)
  number('train.lr', 0, low_open=True)
  if isinstance(t.lr, (int, float)) and math.isinf(t.lr):
    out.append(f'train.lr={t.lr!r} must be finite')
  number('train.warmup_fraction', 0, 1, high_open=True)
  number('train.weight_decay', 0)
  number('train.b1', 0, 1, high_open=True)
  number('train.b2', 0, 1, high_open=True)
  number('train.grad_clip', 0)

  number('mixing.ema_alpha', 0, 1, low_open=True)
  number('mixing.update_every', 1, integer=True)
  number('mixing.prior_temperature', 0, low_open=True)
  number('mixing.target_factor', 0, low_open=True)
  number('mixing.scorer_hidden', 0, integer=True)
  number('mixing.scorer_lr', 0, low_open=True)
  number('mixing.inner_steps', 1, integer=True)
  if 'doremi_smoothing' in x:
    number('mixing.doremi_smoothing', 0, 1)
  n = len(d.datasets)
  if n:
    number('mixing.min_prob', 0, 1 / n)
  need(x.diff_reference in ('cache', 'device', 'base'), 'mixing.diff_reference',
       "must be 'cache', 'device' or 'base' (LoRA)")
  need(x.reference_dtype in DTYPES, 'mixing.reference_dtype', f'must be one of {DTYPES}')
  if n:
    try:  # Strategy, reward and target against the dataset names; replay's source run.
      steps = t.steps if isinstance(t.steps, int) and t.steps >= 1 else 1
      mixing.make_strategy(x, list(d.datasets.keys()), [1] * n, train_steps=steps)
    except ValueError as e:
      out.append(str(e).rstrip('.'))
    out.extend(other_runs.reference_problems(config))  # DoReMi's reference run.
  for section, field, owner in (('doremi', 'reference', 'doremi'), ('replay', 'run', 'replay'),
                                ('static', 'from_run', 'static')):
    node = x.get(section)
    if node is not None and node.get(field) and x.strategy != owner:
      out.append(f'mixing.{section}.{field}={node.get(field)!r} is only read by '
                 f'mixing.strategy={owner}, but the strategy is {x.strategy!r}')

  for key in ('initialization_timeout_s', 'heartbeat_timeout_s', 'shutdown_timeout_s'):
    number(f'distributed.{key}', 1, integer=True)  # Whole seconds, as jax takes them.
  for axis in ('data', 'fsdp', 'tensor'):
    value = config.mesh[axis]
    need(isinstance(value, int) and (value >= 1 or value == -1), f'mesh.{axis}',
         'must be a positive size or -1 (the rest of the devices)')
  return out


def validate(config) -> None:
  """Raises ValueError naming every config value that cannot work."""
  problems = _problems(config)
  if problems:
    raise ValueError('the config has bad values: ' + '; '.join(problems) + '. Fix them in the '
                     'recipe or with --config.KEY=VALUE.')
