"""Write a run's fine-tuned model as a Hugging Face folder.

  python -m mos_jax.export --config configs/demo.py --workdir runs/demo --out runs/demo/hf

Restores the model of the workdir's latest checkpoint with the config the run was trained with
(the same --config and overrides; the model and mesh settings matter) and writes config.json,
safetensors and the tokenizer files into --out; `transformers.AutoModelForCausalLM
.from_pretrained(out)` loads it. The run folder is only read, so this works during a run too.
"""

from absl import flags

from mos_jax import cli

_WORKDIR = flags.DEFINE_string('workdir', None, 'Run folder whose latest checkpoint to export.')
_OUT = flags.DEFINE_string('out', None, 'Folder to write the Hugging Face checkpoint into.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace --out if it already has files.')
_CONFIG = cli.define_config_flag()


def export(config, workdir: str, out: str, overwrite: bool = False) -> int:
  """Writes the latest checkpoint's model to `out`; returns its step. The run folder is only read."""
  from mos_jax import models, trainer  # Imported late: they pull in jax and the data stack.
  model, step, tokenizer_dir = trainer.restore_model(config, workdir)
  models.save_hf(model, out, tokenizer_dir=tokenizer_dir, overwrite=overwrite)
  return step


def main(argv):
  del argv
  step = export(_CONFIG.value, _WORKDIR.value, _OUT.value, _OVERWRITE.value)
  print(f'Wrote the model of step {step} to {_OUT.value}.')


if __name__ == '__main__':
  cli.run(main, 'export', required=('config', 'workdir', 'out'))
