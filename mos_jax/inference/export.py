"""A run's fine-tuned model as a Hugging Face folder (merged LoRA weights or a PEFT adapter folder).

The work behind `python -m mos_jax.export`. The run folder is only read, so this works during a
run too.
"""

from __future__ import annotations

from mos_jax.data import bundle
from mos_jax.models import hf_io
from mos_jax.models import lora
from mos_jax.workdir.restore import checkpoints_folder, restore_model


def export(config, workdir: str, out: str, overwrite: bool = False,
           adapters_only: bool = False) -> int:
  """Writes the latest checkpoint's model to `out`; returns its step."""
  if adapters_only and not lora.enabled(config.model):
    raise ValueError('--adapters-only needs a LoRA run (model.lora.rank > 0).')
  checkpoints_folder(workdir)  # A run folder without checkpoints says so before anything loads.
  tokenizer_dir = bundle.tokenizer_path(config)
  model, step = restore_model(config, workdir, len(bundle.load_tokenizer(tokenizer_dir)))
  if adapters_only:
    lora.save_peft(model, config.model.lora, out, base_model=config.model.hf_checkpoint,
                   overwrite=overwrite)
    return step
  if lora.enabled(config.model):
    model = lora.merged_model(model, config.model.lora)
  hf_io.save_hf(model, out, tokenizer_dir=tokenizer_dir, overwrite=overwrite)
  return step
