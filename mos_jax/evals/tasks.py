"""The work behind `python -m mos_jax.evaluate`: tasks -> DIR/eval/<step>.json and a table.

A task is one of
  - any lm-eval task or group name (`mmlu`, `gsm8k`, `arc_easy`, ... or one of `--include_path`),
    run by lm-eval's `simple_evaluate` on our model (mos_jax.evals.lm_eval_model);
  - `paper_mmlu`: MMLU zero-shot, accuracy per category (mathematics, medicine, others) and over
    all subjects, averaged two ways (mmlu_subject_macro: every subject counts once;
    mmlu_question_weighted: every question does); mu_MU, the paper's Table 2/3 column, is the
    subject-macro one, which rebuilds Table 2 from its own group columns far better;
  - `paper_math`: GSM8K 5-shot, MATH 5-shot (lm-eval's hendrycks_math), MMLU math subjects 0-shot,
    and their mean mu_all (Table 5);
  - `skills`: per-dataset dev loss and exact match of greedy answers (mos_jax.evals.skills);
  - `mtbench:PATH`: MT-bench answers (FastChat format) and, with a judge, scores (mos_jax.evals.mtbench).
Accuracies in the summary are percentages; mu_BOTH = (mu_MU + 10 * mu_MB) / 2 when both ran (this
or an earlier call for the same step: results of one step are merged into one file).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import time

import jax
import numpy as np

from mos_jax.data import build_data
from mos_jax.evals import lm_eval_model
from mos_jax.evals import mtbench
from mos_jax.evals import skills
from mos_jax.inference import loaded as loaded_lib

log = logging.getLogger(__name__)

# MMLU subjects by the paper's categories. The paper's Appendix B table is not in its text; these
# are the subjects whose names say mathematics / medicine (see README "Evaluation").
MMLU_MATH = ('abstract_algebra', 'college_mathematics', 'elementary_mathematics',
             'high_school_mathematics', 'high_school_statistics')
MMLU_MEDICINE = ('anatomy', 'clinical_knowledge', 'college_medicine', 'medical_genetics',
                 'nutrition', 'professional_medicine', 'virology')
MMLU_SUBJECTS = (
    'abstract_algebra', 'anatomy', 'astronomy', 'business_ethics', 'clinical_knowledge',
    'college_biology', 'college_chemistry', 'college_computer_science', 'college_mathematics',
    'college_medicine', 'college_physics', 'computer_security', 'conceptual_physics',
    'econometrics', 'electrical_engineering', 'elementary_mathematics', 'formal_logic',
    'global_facts', 'high_school_biology', 'high_school_chemistry',
    'high_school_computer_science', 'high_school_european_history', 'high_school_geography',
    'high_school_government_and_politics', 'high_school_macroeconomics',
    'high_school_mathematics', 'high_school_microeconomics', 'high_school_physics',
    'high_school_psychology', 'high_school_statistics', 'high_school_us_history',
    'high_school_world_history', 'human_aging', 'human_sexuality', 'international_law',
    'jurisprudence', 'logical_fallacies', 'machine_learning', 'management', 'marketing',
    'medical_genetics', 'miscellaneous', 'moral_disputes', 'moral_scenarios', 'nutrition',
    'philosophy', 'prehistory', 'professional_accounting', 'professional_law',
    'professional_medicine', 'professional_psychology', 'public_relations', 'security_studies',
    'sociology', 'us_foreign_policy', 'virology', 'world_religions')


@dataclasses.dataclass(frozen=True)
class LmEvalRun:
  """One simple_evaluate call: tasks sharing a shot count (None = each task's default)."""
  tasks: tuple[str, ...]
  num_fewshot: int | None


PRESETS = {
    'paper_mmlu': (LmEvalRun(('mmlu',), 0),),
    'paper_math': (LmEvalRun(('gsm8k',), 5), LmEvalRun(('hendrycks_math',), 5),
                   LmEvalRun(tuple(f'mmlu_{s}' for s in MMLU_MATH), 0)),
}


@dataclasses.dataclass(frozen=True)
class Judge:
  url: str = ''  # OpenAI-compatible base URL (…/v1); empty = answers only
  model: str = ''
  prompts: str = ''  # FastChat judge_prompts.jsonl
  references: str = ''  # FastChat reference answers (math / reasoning / coding), optional
  api_key_env: str = 'OPENAI_API_KEY'
  max_new_tokens: int = 1024  # Per MT-bench answer turn


# --- Aggregation (pure functions, tested on hand-made results) -----------------------------------

def _metric(result: dict, name: str) -> float | None:
  """lm-eval result value of `name` ('acc' -> 'acc,none'; or a full 'metric,filter' key)."""
  key = name if ',' in name else f'{name},none'
  value = result.get(key)
  return float(value) if isinstance(value, (int, float)) else None


def _weighted(results: dict, n_samples: dict, tasks, metric: str) -> float | None:
  total = count = 0.0
  for task in tasks:
    value = _metric(results.get(task, {}), metric)
    n = n_samples.get(task, {}).get('effective', 0)
    if value is not None and n:
      total, count = total + value * n, count + n
  return total / count if count else None


def _macro(results: dict, tasks, metric: str) -> float | None:
  values = [v for v in (_metric(results.get(t, {}), metric) for t in tasks) if v is not None]
  return float(np.mean(values)) if values else None


def mmlu_summary(results: dict, n_samples: dict) -> dict[str, float]:
  """Accuracy (%) per category and over every subject present, two ways:
  mmlu_subject_macro[/<category>] (mean over subjects) and mmlu_question_weighted[/<category>]
  (subjects weighted by their questions). mu_MU = the subject-macro one over all 57 subjects."""
  present = [s for s in MMLU_SUBJECTS if f'mmlu_{s}' in results]
  if not present:
    return {}
  others = [s for s in present if s not in MMLU_MATH and s not in MMLU_MEDICINE]
  out = {}
  for key, subjects in (('mathematics', MMLU_MATH), ('medicine', MMLU_MEDICINE),
                        ('others', others), ('all', present)):
    tasks = [f'mmlu_{s}' for s in subjects if s in present]
    suffix = '' if key == 'all' else f'/{key}'
    for average, acc in (('mmlu_subject_macro', _macro(results, tasks, 'acc')),
                         ('mmlu_question_weighted', _weighted(results, n_samples, tasks, 'acc'))):
      if acc is not None:
        out[average + suffix] = 100 * acc
  if len(present) == len(MMLU_SUBJECTS) and 'mmlu_subject_macro' in out:
    out['mu_MU'] = out['mmlu_subject_macro']
  return out


def math_summary(results: dict, n_samples: dict) -> dict[str, float]:
  """GSM8K, MATH and MMLU-math accuracy (%) and their mean mu_all (Table 5) when all three ran."""
  out = {}
  gsm = _metric(results.get('gsm8k', {}), 'exact_match,strict-match')
  if gsm is not None:
    out['gsm8k'] = 100 * gsm
  math = _metric(results.get('hendrycks_math', {}), 'exact_match')
  if math is not None:
    out['math'] = 100 * math
  mmlu_math = _weighted(results, n_samples, [f'mmlu_{s}' for s in MMLU_MATH], 'acc')
  if mmlu_math is not None and all(f'mmlu_{s}' in results for s in MMLU_MATH):
    out['mmlu_math'] = 100 * mmlu_math
  if all(k in out for k in ('gsm8k', 'math', 'mmlu_math')):
    out['mu_all'] = float(np.mean([out['gsm8k'], out['math'], out['mmlu_math']]))
  return out


def mu_both(summary: dict) -> dict[str, float]:
  """The paper's mu_BOTH: mean of mu_MU (%) and 10 * mu_MB (MT-bench, 1-10)."""
  if 'mu_MU' in summary and 'mu_MB' in summary:
    return {'mu_BOTH': (summary['mu_MU'] + 10 * summary['mu_MB']) / 2}
  return {}


# --- Planning ----------------------------------------------------------------------------------

def plan(tasks, num_fewshot, known) -> list:
  """Task names -> [LmEvalRun | 'skills' | ('mtbench', path)]; unknown names fail with suggestions.

  `known` is a callable returning lm-eval's task/group/tag names (only called when needed).
  """
  items, plain = [], []
  for name in tasks:
    if name in PRESETS:
      items.extend(PRESETS[name])
    elif name == 'skills':
      items.append('skills')
    elif name.startswith('mtbench:'):
      path = name.split(':', 1)[1]
      if not os.path.isfile(path):
        raise FileNotFoundError(f'task {name}: no MT-bench question file at {path}.')
      items.append(('mtbench', path))
    else:
      plain.append(name)
  if plain:
    names = set(known())
    for name in plain:
      if name not in names:
        ours = list(PRESETS) + ['skills', 'mtbench:PATH']
        close = difflib.get_close_matches(name, list(names) + ours, n=5, cutoff=0.6)
        hint = f' Close matches: {", ".join(close)}.' if close else ''
        raise ValueError(f'unknown task {name!r}: not an lm-eval task (see `python -m '
                         f'mos_jax.lm_eval_cli ls tasks`) nor one of {", ".join(ours)}.{hint}')
    items.insert(0, LmEvalRun(tuple(plain), num_fewshot))
  return items


# --- Running -----------------------------------------------------------------------------------

def _json_safe(value):
  return json.loads(json.dumps(value, default=str))


def run_lm_eval(lm, run: LmEvalRun, limit, task_manager) -> dict:
  import lm_eval  # pylint: disable=g-import-not-at-top
  out = lm_eval.simple_evaluate(model=lm, tasks=list(run.tasks), num_fewshot=run.num_fewshot,
                                limit=limit or None, task_manager=task_manager,
                                bootstrap_iters=0)
  keep = ('results', 'groups', 'group_subtasks', 'n-shot', 'n-samples', 'versions',
          'higher_is_better')
  return {k: _json_safe(out[k]) for k in keep if k in out}


def evaluate(config, workdir: str | None, tasks, num_fewshot=None, limit: int = 0,
             step: int | None = None, include_path: str | None = None, judge: Judge = Judge(),
             out_path: str | None = None, batch_size: int = 16) -> dict:
  """Runs the tasks on the checkpoint; writes and returns {'step', 'summary', 'lm_eval', ...}."""
  task_manager = None

  def known():
    nonlocal task_manager
    if task_manager is None:
      from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top
      task_manager = TaskManager(include_path=include_path)
    return task_manager.all_tasks

  items = plan(list(tasks), num_fewshot, known)
  if any(isinstance(i, LmEvalRun) for i in items):
    known()
  loaded = loaded_lib.load(config, workdir, step)
  path = out_path or (os.path.join(workdir, 'eval', f'{loaded.step}.json') if workdir else None)
  record = _read(path) if path else {}
  record.update({'step': loaded.step, 'workdir': workdir, 'time': time.time()})
  record.setdefault('summary', {})
  record.setdefault('lm_eval', {})
  record.setdefault('errors', {})
  lm = None
  for item in items:
    if isinstance(item, LmEvalRun):
      if lm is None:
        lm = lm_eval_model.MosJaxLM(loaded=loaded, batch_size=batch_size)
      got = run_lm_eval(lm, item, limit, task_manager)
      for key in ('results', 'n-shot', 'n-samples', 'versions', 'higher_is_better'):
        record['lm_eval'].setdefault(key, {}).update(got.get(key, {}))
      record['lm_eval'].setdefault('group_subtasks', {}).update(got.get('group_subtasks', {}))
    elif item == 'skills':
      record['summary'].update({f'skills/{k}': v for k, v in _skills(config, loaded, limit,
                                                                      batch_size).items()})
    else:
      tag = loaded.step if loaded.step is not None else 'base'
      answers_dir = os.path.join(os.path.dirname(os.path.abspath(path)) if path else '.',
                                 f'mt_bench_{tag}')
      try:
        record['summary'].update(mtbench.run(loaded, item[1], answers_dir, judge, limit,
                                             batch_size, judge.max_new_tokens))
        record['errors'].pop('mtbench', None)
      except mtbench.JudgeError as e:  # The answers are written; only the judging failed.
        record['errors']['mtbench'] = str(e)
        log.error('MT-bench judging failed: %s', e)
  lm_results = record['lm_eval'].get('results', {})
  n_samples = record['lm_eval'].get('n-samples', {})
  record['summary'].update(mmlu_summary(lm_results, n_samples))
  record['summary'].update(math_summary(lm_results, n_samples))
  record['summary'].update(mu_both(record['summary']))
  if path:
    _write(path, record)
  return record


def _skills(config, loaded, limit, batch_size):
  data = build_data(config)
  try:
    gen = loaded_lib.generator(loaded)
    return skills.evaluate(loaded.model, data, gen, loaded.mesh,
                           field=config.data.get('answer_field', 'answer'), limit=limit,
                           batch_size=batch_size)
  finally:
    data.close()


def _read(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _write(path: str, record: dict) -> None:
  if jax.process_index() != 0:  # Every process computed the same record; one writes it.
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(record, f, indent=2, default=str)
  os.replace(tmp, path)


def format_table(record: dict) -> str:
  """lm-eval's own table of its results, then ours (summary and errors)."""
  lines = []
  lm = record.get('lm_eval', {})
  if lm.get('results'):
    from lm_eval.utils import make_table  # pylint: disable=g-import-not-at-top
    lines.append(make_table({'results': lm['results'], 'versions': lm.get('versions', {}),
                             'n-shot': lm.get('n-shot', {}),
                             'higher_is_better': lm.get('higher_is_better', {})}))
  if record.get('summary'):
    width = max(map(len, record['summary']))
    lines.append(f'step {record.get("step")}:')
    lines += [f'  {k:<{width}}  {v:.4f}' for k, v in sorted(record['summary'].items())]
  for task, error in record.get('errors', {}).items():
    lines.append(f'  {task}: FAILED: {error}')
  return '\n'.join(lines)
