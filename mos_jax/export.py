"""Write a run's fine-tuned model as a Hugging Face folder.

  python -m mos_jax.export --config configs/demo.py --workdir runs/demo --out runs/demo/hf

Restores the model of the workdir's latest checkpoint with the config the run was trained with
(the same --config and overrides; the model and mesh settings matter) and writes config.json,
safetensors and the tokenizer files into --out; `transformers.AutoModelForCausalLM
.from_pretrained(out)` loads it. The run folder is only read, so this works during a run too.

A LoRA run (model.lora.rank > 0) exports merged weights (W + alpha / r * A B) by default; with
--adapters-only it writes a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)
that `peft.PeftModel.from_pretrained(base, out)` loads on top of model.hf_checkpoint.
"""

from absl import flags

from mos_jax.infra import cli

_WORKDIR = flags.DEFINE_string('workdir', None, 'Run folder whose latest checkpoint to export.')
_OUT = flags.DEFINE_string('out', None, 'Folder to write the Hugging Face checkpoint into.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace --out if it already has files.')
_ADAPTERS_ONLY = flags.DEFINE_bool('adapters-only', False,
                                   'LoRA runs: write a PEFT adapter folder, not merged weights.')
_CONFIG = cli.define_config_flag()


def main(argv):
  del argv
  from mos_jax.inference import export  # Imported after flag parsing: it pulls in jax.
  step = export.export(_CONFIG.value, _WORKDIR.value, _OUT.value, _OVERWRITE.value,
                       _ADAPTERS_ONLY.value)
  print(f'Wrote the model of step {step} to {_OUT.value}.')


if __name__ == '__main__':
  cli.run(main, 'export', required=('config', 'workdir', 'out'))
