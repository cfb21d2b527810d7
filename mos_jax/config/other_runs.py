"""Another run a config points at, checked before anything is built: DoReMi's reference run.

`mixing.doremi.reference=DIR` must be a run folder (DIR/config.json) over the same dataset names,
of the same model (the model.* settings that decide the parameters), and finished: a checkpoint of
its last step, DIR/checkpoints/<its train.steps> (Orbax's folder of a saved step). Its training data
is compared with this run's (the data fingerprints its checkpoint records) once the data is read
(training/reference_run.py). Replay's source runs (mixing.replay.run, mixing.static.from_run) are
read and checked by the strategy itself (mixing/replay.py), which `check` builds.
"""

from __future__ import annotations

import json
import os

from mos_jax.config import schema

# The model.* settings that decide the parameters' names, shapes and dtypes: a reference run must
# match them to be restored beside theta (compute settings such as remat may differ).
MODEL_KEYS = ('preset', 'hf_checkpoint', 'param_dtype', 'vocab_size', 'quantize', 'lora.rank',
              'lora.targets', 'lora.alpha')


def read_config(folder: str) -> dict | None:
  """DIR/config.json as a dict (None without one)."""
  path = os.path.join(folder, 'config.json')
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def final_checkpoint(folder: str, steps: int) -> str:
  """Where run `folder`'s checkpoint of its last step lives."""
  return os.path.join(folder, 'checkpoints', str(steps))


def _model_value(model: dict, key: str):
  for part in key.split('.'):
    model = model.get(part, '') if isinstance(model, dict) else ''
  return model


def reference_problems(config) -> list[str]:
  """What is wrong with mixing.doremi.reference (nothing when unset or not DoReMi), one line each."""
  mixing = config.mixing
  node = mixing.get('doremi')
  folder = str(node.get('reference', '') or '') if node is not None else ''
  if not folder or mixing.strategy != 'doremi':
    return []
  what = f'mixing.doremi.reference={folder!r}'
  folder = os.path.abspath(os.path.expanduser(folder))
  ref = read_config(folder)
  if ref is None:
    return [f'{what} is not a run folder (no config.json)']
  names, ref_names = list(config.data.datasets.keys()), list(ref.get('data', {}).get('datasets', {}))
  if sorted(names) != sorted(ref_names):
    return [f'{what} trained on datasets {ref_names}, this run on {names}: the reference must be '
            f'a run of the same data']
  mine = json.loads(schema.config_to_json(config))['model']
  differ = [f'model.{k}={_model_value(ref.get("model", {}), k)!r} there, '
            f'{_model_value(mine, k)!r} here' for k in MODEL_KEYS
            if _model_value(ref.get('model', {}), k) != _model_value(mine, k)]
  if differ:
    return [f'{what} trained another model ({"; ".join(differ)}): the reference must be a run '
            f'of the same model']
  steps = int(ref.get('train', {}).get('steps', 0))
  if not os.path.isdir(final_checkpoint(folder, steps)):
    folder_ckpt = os.path.join(folder, 'checkpoints')
    saved = sorted(int(d) for d in os.listdir(folder_ckpt) if d.isdigit()) if os.path.isdir(
        folder_ckpt) else []
    return [f'{what} has not finished: no checkpoint of its last step {steps} (saved steps: '
            f'{saved or "none"}); finish it first (run its train command again)']
  return []
