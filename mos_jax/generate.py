"""Ask a run's model: answers from its latest checkpoint (or --step), rendered with its chat template.

  python -m mos_jax.generate --config configs/demo.py --workdir runs/demo --prompt "What is 7+5?"
  python -m mos_jax.generate --config configs/demo.py --workdir runs/demo --prompts questions.jsonl
  python -m mos_jax.generate --config configs/demo.py --workdir runs/demo          # interactive
  python -m mos_jax.generate --config C --config.model.hf_checkpoint=/models/qwen --prompt "Hi"

--prompts FILE.jsonl: one JSON object per line with "prompt" (a user message) or "messages" (a
conversation); the answers are printed as JSON lines {"prompt"/"messages", "answer"}. With no
--workdir the base model of the config is asked. --raw continues the text instead (no template).
"""

from absl import flags

from mos_jax.infra import cli

_WORKDIR = flags.DEFINE_string('workdir', None, 'Run folder; empty = the base model of the config.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
_PROMPT = flags.DEFINE_string('prompt', None, 'One user message.')
_PROMPTS = flags.DEFINE_string('prompts', None, 'JSONL file of {"prompt"} or {"messages"} lines.')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 256, 'Tokens to generate at most.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.0, '0 = greedy.')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Sample from the k most likely tokens (0 = all).')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling mass (1 = all).')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
_STOP = flags.DEFINE_multi_string('stop', [], 'Stop string (repeatable).')
_BATCH = flags.DEFINE_integer('batch_size', 16, 'Prompts per batch.')
_RAW = flags.DEFINE_bool('raw', False, 'Continue the prompt text as is (no chat template).')
_CONFIG = cli.define_config_flag()


def main(argv):
  del argv
  from mos_jax.inference import chat  # Imported after flag parsing: it pulls in jax.
  options = chat.Options(max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
                         top_k=_TOP_K.value, top_p=_TOP_P.value, seed=_SEED.value,
                         stop=tuple(_STOP.value), batch_size=_BATCH.value, raw=_RAW.value)
  chat.run(_CONFIG.value, _WORKDIR.value, _STEP.value, _PROMPT.value, _PROMPTS.value, options)


if __name__ == '__main__':
  cli.run(main, 'generate', required=('config',))
