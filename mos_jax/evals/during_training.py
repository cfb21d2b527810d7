"""The hook the training loop calls at every dev evaluation: `train.eval_tasks` on the live state.

It receives what it needs (config, data, the model's structure, mesh, LoRA base) and, at each
call, the current parameters; it never sees the training loop's Run.
"""

from __future__ import annotations

from flax import nnx
from lm_eval.tasks import TaskManager

from mos_jax.data import bundle
from mos_jax.data import templates
from mos_jax.evals import lm_eval_model
from mos_jax.evals import skills
from mos_jax.evals.tasks import plan, run_lm_eval
from mos_jax.inference import loaded as loaded_lib
from mos_jax.steps.state import merge


class TrainingTasks:
  """Runs `train.eval_tasks` on the live train state at every dev evaluation.

  Built once per run (the jitted generation and scoring functions are reused; only the
  parameters change). Returns 'eval/<task>/<metric>' scalars for metrics.jsonl and TensorBoard.
  """

  def __init__(self, config, data, graphdef, params, mesh, frozen=None):
    self.tasks = [str(t) for t in config.train.eval_tasks]
    bad = [t for t in self.tasks if t.startswith('mtbench:')]
    if bad:
      raise ValueError(f'train.eval_tasks: {bad} cannot run during training (it needs long '
                       'generations and a judge); use python -m mos_jax.evaluate.')
    self.limit = int(config.train.get('eval_task_limit', 0))
    self.field = config.data.get('answer_field', 'answer')
    self.batch_size = int(config.data.eval_batch_size)
    self.include_path = config.train.get('eval_task_path') or None
    self.data, self.graphdef, self.frozen = data, graphdef, frozen
    self._task_manager = None
    try:
      template = templates.make_template(data.tokenizer, config.data.template)
    except templates.TemplateError:
      template = None
    model = merge(graphdef, params, frozen)  # LoRA: with the base.
    self.loaded = loaded_lib.Loaded(model=model, step=None, tokenizer=data.tokenizer,
                                    tokenizer_dir=bundle.tokenizer_path(config), mesh=mesh,
                                    template=template)
    self.items = plan(list(self.tasks), None, self._known)
    self.gen = loaded_lib.generator(self.loaded) if 'skills' in self.items else None
    self.lm = None

  def _known(self):
    if self._task_manager is None:
      self._task_manager = TaskManager(include_path=self.include_path)
    return self._task_manager.all_tasks

  def __call__(self, params) -> dict[str, float]:
    state = nnx.state(merge(self.graphdef, params, self.frozen))
    out = {}
    for item in self.items:
      if item == 'skills':
        self.gen.params = state
        hits = total = 0
        for name in self.data.names:
          em = skills.exact_match(self.gen, self.data, name, self.field, self.limit,
                                  self.batch_size)
          if em is not None:
            out[f'eval/skills/{name}/exact_match'] = em[0]
            hits, total = hits + em[0] * em[1], total + em[1]
        if total:
          out['eval/skills/exact_match'] = hits / total
      else:
        if self.lm is None:
          self.lm = lm_eval_model.MosJaxLM(loaded=self.loaded, batch_size=self.batch_size)
        self.lm.set_params(state)
        got = run_lm_eval(self.lm, item, self.limit, self._task_manager)
        for task, metrics in got.get('results', {}).items():
          for key, value in metrics.items():
            if isinstance(value, (int, float)) and 'stderr' not in key:
              out[f'eval/{task}/{key.removesuffix(",none")}'] = float(value)
    return out
