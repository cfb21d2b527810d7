"""lm-evaluation-harness model `mos_jax`: every lm-eval task on a run's checkpoint.

  python -m mos_jax.lm_eval --model mos_jax --model_args config=configs/demo.py,workdir=runs/demo \
      --tasks hellaswag
  lm_eval.simple_evaluate(model=MosJaxLM(loaded=loaded_lib.load(config, workdir)), tasks=[...])

Tokenization of (context, continuation) pairs, rolling windows, stop sequences, few-shot prompts
and metrics are lm-eval's own (TemplateLM and lm_eval.models.utils); this file only runs our
decoder: log-likelihoods in one jitted forward per batch (length-sorted, left-padded, batch
sharded on the mesh) and generation with mos_jax.inference.loaded.sampler's KV-cache loop.

model_args: config (recipe path), workdir (run folder; empty = the config's base model), step,
batch_size (default 16), max_length (default: the model's max_position_embeddings), add_bos_token,
and any `config.KEY=VALUE` override.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models import utils as model_utils

from mos_jax.data import templates as templates_lib
from mos_jax.inference import loaded as loaded_lib
from mos_jax.inference import sampler
from mos_jax.infra import cli


def score_step(params, inputs, targets, cont_mask, attention_mask, *, graphdef):
  """Sum of log p(target) over continuation positions and whether each was the argmax.

  inputs, targets, cont_mask, attention_mask: [B, L] (left-padded). Returns ([B] float32, [B] bool).
  """
  logits = nnx.merge(graphdef, params)(inputs, attention_mask=attention_mask).logits  # [B, L, V]
  logp = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B, L]
  greedy = jnp.argmax(logits, axis=-1) == targets
  cont = cont_mask.astype(bool)
  return jnp.sum(jnp.where(cont, picked, 0.0), axis=1), jnp.all(greedy | ~cont, axis=1)


@register_model('mos_jax')
class MosJaxLM(TemplateLM):
  """lm-eval's LM interface on a mos_jax decoder (see the module docstring)."""

  def __init__(self, config: str | None = None, workdir: str | None = None, step=None,
               batch_size: int | str = 16, max_length: int | None = None, add_bos_token=None,
               loaded: loaded_lib.Loaded | None = None, **overrides):
    super().__init__()
    if loaded is None:
      if not config:
        raise ValueError('mos_jax model_args need config=<recipe.py> (and workdir=<run folder>).')
      for key in ('device', 'max_batch_size'):  # lm-eval passes these to every model; the mesh
        overrides.pop(key, None)                # places the work and batch_size is fixed.
      flags = [f'--{k}={v}' for k, v in overrides.items() if k.startswith('config.')]
      unknown = [k for k in overrides if not k.startswith('config.')]
      if unknown:
        raise ValueError(f'unknown mos_jax model_args {unknown}; known: config, workdir, step, '
                         'batch_size, max_length, add_bos_token, config.KEY=VALUE.')
      loaded = loaded_lib.load(cli.load_config(config, flags), workdir or None,
                              int(step) if step not in (None, '') else None)
    self.loaded = loaded
    self.tokenizer = loaded.tokenizer
    self._batch_size = int(batch_size) if str(batch_size).isdigit() else 16
    self._max_length = int(max_length) if max_length else None
    self.add_bos_token = None if add_bos_token in (None, '') else (
        str(add_bos_token).lower() in ('1', 'true'))
    self.generator = sampler.Generator(loaded.model, loaded.tokenizer, mesh=loaded.mesh,
                                          template=None)
    graphdef, self._params = nnx.split(loaded.model)
    self._score = jax.jit(functools.partial(score_step, graphdef=graphdef))
    self._seed = 0

  def set_params(self, params) -> None:
    """New parameters of the same model (evaluation during training)."""
    self._params = params
    self.generator.params = params

  # --- What lm-eval asks of a model ---------------------------------------------------------

  @property
  def eot_token_id(self) -> int:
    return self.tokenizer.eos_token_id

  @property
  def prefix_token_id(self) -> int:
    bos = self.tokenizer.bos_token_id
    return bos if bos is not None else self.tokenizer.eos_token_id

  @property
  def max_length(self) -> int:
    return self._max_length or int(self.loaded.model.config.max_position_embeddings)

  @property
  def max_gen_toks(self) -> int:
    return 256

  @property
  def batch_size(self) -> int:
    return self._batch_size

  @property
  def tokenizer_name(self) -> str:
    return self.loaded.tokenizer_dir.replace('/', '__')

  def tok_encode(self, string: str, add_special_tokens=None, left_truncate_len=None, **kwargs):
    # lm-eval's own rule for special tokens (as its hf model encodes).
    special = model_utils._add_special_kwargs(  # pylint: disable=protected-access
        add_special_tokens, self.add_bos_token)
    if add_special_tokens is None and model_utils.has_bos_prefix(
        string, self.tokenizer.decode(self.prefix_token_id)):
      special['add_special_tokens'] = False
    ids = self.tokenizer.encode(string, **special)
    return ids[-left_truncate_len:] if left_truncate_len else ids

  def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
    return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

  def chat_template(self, chat_template=False):
    if chat_template is False or chat_template is None:
      return None
    return self.tokenizer.chat_template or getattr(self.loaded.template, 'name', '')

  def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
    """The run's chat template (data.template, else the tokenizer's)."""
    if self.loaded.template is None:
      raise ValueError(f'the tokenizer at {self.loaded.tokenizer_dir} has no chat template; '
                       'set data.template or run without --apply_chat_template.')
    if add_generation_prompt:
      return templates_lib.generation_prompt(self.loaded.template, chat_history)
    if chat_history and chat_history[-1]['role'] == 'assistant':  # Continue the final message.
      return (templates_lib.generation_prompt(self.loaded.template, chat_history[:-1])
              + chat_history[-1]['content'])
    return self.loaded.template.render(chat_history)[0]

  # --- Scoring ------------------------------------------------------------------------------

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    """requests: ((context, continuation), context ids, continuation ids) -> (logprob, greedy)."""
    def whole(req):
      return (req[1] + req[2])[-(self.max_length + 1):]

    order = model_utils.Collator(requests, sort_fn=lambda r: (-len(whole(r)), tuple(whole(r))))
    results = []
    for chunk in order.get_batched(n=self.batch_size):
      seqs = [whole(r) for r in chunk]
      conts = [len(r[2]) for r in chunk]
      for (request, _, _), out in zip(chunk, self._score_batch(seqs, conts)):
        results.append(out)
        self.cache_hook.add_partial('loglikelihood', request, out)
    return order.get_original(results)

  def _score_batch(self, seqs, cont_lens):
    """Left-pads [ids] (inputs = ids[:-1], targets = ids[1:]) into one fixed-shape batch."""
    rows = sampler.round_up(self.batch_size, self.generator.batch_multiple)
    width = sampler.round_up(max(len(s) - 1 for s in seqs), sampler.PAD_MULTIPLE)
    arrays = {k: np.zeros((rows, width), np.int32)
              for k in ('inputs', 'targets', 'cont_mask', 'attention_mask')}
    for i, (seq, n_cont) in enumerate(zip(seqs, cont_lens)):
      n = len(seq) - 1
      arrays['inputs'][i, width - n:] = seq[:-1]
      arrays['targets'][i, width - n:] = seq[1:]
      arrays['attention_mask'][i, width - n:] = 1
      arrays['cont_mask'][i, width - n_cont:] = 1
    mesh = self.loaded.mesh
    with jax.set_mesh(mesh):
      put = {k: self.generator.put_batch(v) for k, v in arrays.items()}
      logp, greedy = self._score(self._params, put['inputs'], put['targets'], put['cont_mask'],
                                 put['attention_mask'])
    logp, greedy = sampler.host_value(logp), sampler.host_value(greedy)
    return [(float(logp[i]), bool(greedy[i])) for i in range(len(seqs))]

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
    """Log-likelihood of whole texts in disjoint windows of max_length (lm-eval's windows)."""
    windows, owners = [], []
    for k, (text,) in enumerate(req.args for req in requests):
      for context, continuation in map(lm_utils.make_disjoint_window,
                                       lm_utils.get_rolling_token_windows(
                                           token_list=self.tok_encode(text),
                                           prefix_token=self.prefix_token_id,
                                           max_seq_len=self.max_length, context_len=1)):
        windows.append(((None, None), context, continuation))
        owners.append(k)
    scores = self._loglikelihood_tokens(windows, disable_tqdm=True)
    totals = [0.0] * len(requests)
    for k, (logp, _) in zip(owners, scores):
      totals[k] += logp
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial('loglikelihood_rolling', req.args, total)
    return totals

  # --- Generation ---------------------------------------------------------------------------

  def generate_until(self, requests, disable_tqdm: bool = False):
    """Greedy or sampled continuations cut at the request's stop sequences (and EOS)."""
    order = model_utils.Collator(
        [req.args for req in requests],
        sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
        group_by='gen_kwargs', group_fn=lambda r: r[1])
    eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
    results = []
    for chunk in order.get_batched(n=self.batch_size):
      contexts, all_kwargs = zip(*chunk)
      kwargs = model_utils.normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)
      until = model_utils.handle_stop_sequences(kwargs.pop('until', None), eos=eos)
      max_gen = int(kwargs.pop('max_gen_toks'))
      sampling = sampler.Sampling()
      if kwargs.get('do_sample') and float(kwargs.get('temperature') or 0.0) > 0:
        sampling = sampler.Sampling(temperature=float(kwargs['temperature']),
                                       top_k=int(kwargs.get('top_k') or 0),
                                       top_p=float(kwargs.get('top_p') or 1.0))
      ids = [self.tok_encode(c, left_truncate_len=self.max_length - max_gen) for c in contexts]
      outs = self.generator.generate_ids(ids, max_gen, sampling, seed=self._seed, stop=until)
      self._seed += 1
      for context, out in zip(contexts, outs):
        text = model_utils.postprocess_generated_text(self.tok_decode(out), until, None)
        results.append(text)
        self.cache_hook.add_partial('generate_until', (context, all_kwargs[0]), text)
    return order.get_original(results)
