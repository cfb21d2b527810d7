"""The model a command asks about: a run's checkpoint, or the config's base model, on the mesh.

Shared by `generate`, `evaluate` and the lm-eval model, so all of them read a run the same way.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from mos_jax.data import bundle
from mos_jax.data import templates
from mos_jax.inference import sampler
from mos_jax.infra import distributed
from mos_jax.infra import sharding
from mos_jax.models.build import build_model
from mos_jax.workdir.restore import checkpoints_folder, restore_model


@dataclasses.dataclass
class Loaded:
  model: Any  # mos_jax.models.Decoder, parameters on `mesh`
  step: int | None  # Checkpoint step (None = the base model)
  tokenizer: Any
  tokenizer_dir: str
  mesh: jax.sharding.Mesh
  template: Any  # mos_jax.data.templates renderer, or None when the tokenizer has none


def load(config, workdir: str | None = None, step: int | None = None) -> Loaded:
  """A run's checkpoint (the latest, or `step`), or with no workdir the base model of
  `config.model` (`hf_checkpoint`, or a freshly initialised preset)."""
  if workdir:
    checkpoints_folder(workdir)  # A run folder without checkpoints says so before anything loads.
  tokenizer_dir = bundle.tokenizer_path(config)
  tokenizer = bundle.load_tokenizer(tokenizer_dir)
  if workdir:
    model, step = restore_model(config, workdir, len(tokenizer), step)
    mesh = sharding.make_mesh(config.mesh)
  else:
    if step is not None:
      raise ValueError('--step needs --workdir (a run folder with checkpoints).')
    distributed.initialize()
    mesh = sharding.make_mesh(config.mesh)
    model = build_model(config, mesh, len(tokenizer), adapters=False)  # The base: no adapters.
  try:
    template = templates.make_template(tokenizer, config.data.template)
  except templates.TemplateError:
    template = None  # No chat template: raw prompts only.
  return Loaded(model=model, step=step, tokenizer=tokenizer, tokenizer_dir=tokenizer_dir,
                mesh=mesh, template=template)


def generator(loaded: Loaded, chat: bool = True):
  """A Generator for the loaded model (with the chat template and its end-of-turn stops)."""
  template = loaded.template if chat else None
  if chat and template is None:
    raise ValueError(f'the tokenizer at {loaded.tokenizer_dir} has no chat template; set '
                     'data.template (chatml, vicuna, llama3, gemma) or use raw prompts.')
  return sampler.Generator(loaded.model, loaded.tokenizer, mesh=loaded.mesh, template=template)
