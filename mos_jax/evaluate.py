"""Score a run's checkpoint: lm-eval tasks, the paper's presets, the training skills, MT-bench.

  python -m mos_jax.evaluate --config configs/demo.py --workdir runs/demo --tasks skills
  python -m mos_jax.evaluate --config C --workdir DIR --tasks paper_mmlu,paper_math
  python -m mos_jax.evaluate --config C --workdir DIR --tasks mtbench:question.jsonl \
      --judge-url http://localhost:8000/v1 --judge-model gpt-4 --judge-prompts judge_prompts.jsonl

Writes DIR/eval/<step>.json (lm-eval's results plus the summary: the paper's mu columns) and prints
a table. Tasks: any lm-eval task or group, paper_mmlu, paper_math, skills, mtbench:PATH (see
mos_jax/tasks_lib.py). lm-eval tasks read their data from the Hugging Face hub or its cache; see
the README ("Evaluation") for offline use.
"""

from absl import flags

from mos_jax.infra import cli

_WORKDIR = flags.DEFINE_string('workdir', None, 'Run folder; empty = the base model of the config.')
_TASKS = flags.DEFINE_list('tasks', None, 'Comma-separated task names.')
_FEWSHOT = flags.DEFINE_integer('num_fewshot', None, 'Shots for plain lm-eval tasks (default: '
                                'each task\'s own).')
_LIMIT = flags.DEFINE_integer('limit', 0, 'Examples per task at most (0 = all).')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
_BATCH = flags.DEFINE_integer('batch_size', 16, 'Sequences per forward / generation batch.')
_INCLUDE = flags.DEFINE_string('include_path', None, 'Folder of extra lm-eval task YAMLs.')
_OUT = flags.DEFINE_string('out', None, 'Results file (default DIR/eval/<step>.json).')
_JUDGE_URL = flags.DEFINE_string('judge-url', '', 'OpenAI-compatible base URL for MT-bench judging.')
_JUDGE_MODEL = flags.DEFINE_string('judge-model', 'gpt-4', 'Judge model name.')
_JUDGE_PROMPTS = flags.DEFINE_string('judge-prompts', '', "FastChat's judge_prompts.jsonl.")
_JUDGE_REFS = flags.DEFINE_string('judge-references', '', 'FastChat reference answers (optional).')
_JUDGE_KEY = flags.DEFINE_string('judge-key-env', 'OPENAI_API_KEY', 'Env variable with the key.')
_CONFIG = cli.define_config_flag()


def main(argv):
  del argv
  from mos_jax.evals import tasks as tasks_lib  # Imported after flag parsing: it pulls in jax.
  judge = tasks_lib.Judge(url=_JUDGE_URL.value, model=_JUDGE_MODEL.value,
                           prompts=_JUDGE_PROMPTS.value, references=_JUDGE_REFS.value,
                           api_key_env=_JUDGE_KEY.value)
  record = tasks_lib.evaluate(_CONFIG.value, _WORKDIR.value, _TASKS.value, _FEWSHOT.value,
                               _LIMIT.value, _STEP.value, _INCLUDE.value, judge, _OUT.value,
                               _BATCH.value)
  print(tasks_lib.format_table(record))


if __name__ == '__main__':
  cli.run(main, 'evaluate', required=('config', 'tasks'))
