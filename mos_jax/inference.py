"""The model a command asks about: a run's checkpoint, or the config's base model, on the mesh.

Shared by `generate`, `evaluate` and the lm-eval model, so all of them read a run the same way.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax


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
  from mos_jax import distributed, models, sharding, trainer  # pylint: disable=g-import-not-at-top
  from mos_jax.data import bundle, templates  # pylint: disable=g-import-not-at-top
  if workdir:
    model, step, tokenizer_dir = trainer.restore_model(config, workdir, step)
    mesh = sharding.make_mesh(config.mesh)
  else:
    if step is not None:
      raise ValueError('--step needs --workdir (a run folder with checkpoints).')
    distributed.initialize()
    mesh = sharding.make_mesh(config.mesh)
    tokenizer_dir = bundle.tokenizer_path(config)
    m = config.model
    options = dict(dtype=m.dtype, param_dtype=m.param_dtype, scan_layers=m.scan_layers,
                   attention_impl=m.attention_impl or None)
    if m.hf_checkpoint:
      model = models.load_hf(m.hf_checkpoint, mesh=mesh, **options)
    else:
      rows = trainer.embedding_rows(m, len(bundle.load_tokenizer(tokenizer_dir)))
      model = models.init_model(models.get_preset(m.preset, vocab_size=rows, **options),
                                config.seed, mesh=mesh)
  tokenizer = bundle.load_tokenizer(tokenizer_dir)
  try:
    template = templates.make_template(tokenizer, config.data.template)
  except templates.TemplateError:
    template = None  # No chat template: raw prompts only.
  return Loaded(model=model, step=step, tokenizer=tokenizer, tokenizer_dir=tokenizer_dir,
                mesh=mesh, template=template)


def generator(loaded: Loaded, chat: bool = True):
  """A Generator for the loaded model (with the chat template and its end-of-turn stops)."""
  from mos_jax import generation  # pylint: disable=g-import-not-at-top
  template = loaded.template if chat else None
  if chat and template is None:
    raise ValueError(f'the tokenizer at {loaded.tokenizer_dir} has no chat template; set '
                     'data.template (chatml, vicuna, llama3, gemma) or use raw prompts.')
  return generation.Generator(loaded.model, loaded.tokenizer, mesh=loaded.mesh, template=template)
