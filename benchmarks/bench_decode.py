"""Decode speed: the KV cache against recomputing the whole sequence, and MMLU-shaped scoring.

  python benchmarks/bench_decode.py                       # demo model (tiny preset), CPU
  python benchmarks/bench_decode.py --preset qwen1.5-0.5b --dtype bfloat16 --batches 1,32 \
      --skip_recompute --skip_mmlu                         # on an accelerator

Decode: greedy generation of --new_tokens tokens after a --prompt_len-token prompt, random
weights, timed after a warm-up call (compilation excluded). The cache path is
mos_jax.inference.sampler.Generator (jitted prefill + while_loop decode). The recompute baseline is one
jitted loop that runs the whole fixed-width buffer (prompt + new tokens) through the model at
every step and takes the argmax at the current position: the work of decoding without a cache.

MMLU: examples/s of lm-eval multiple-choice scoring (4 choices, MMLU's prompt format) through
the `mos_jax` lm-eval model, on synthetic questions of MMLU-like length (real MMLU needs the hub).
"""

import argparse
import json
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mos_jax.inference import sampler
from mos_jax import models


class _Tok:
  pad_token_id, eos_token_id = 0, None


def _recompute_fn(graphdef, width):
  def run(params, buf, start):
    def step(t, buf):
      logits = nnx.merge(graphdef, params)(buf).logits  # [B, W, V]: the whole sequence again
      nxt = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, t - 1, axis=1, keepdims=False), -1)
      return jax.lax.dynamic_update_slice_in_dim(buf, nxt[:, None].astype(buf.dtype), t, axis=1)
    return jax.lax.fori_loop(start, width, step, buf)
  return jax.jit(run)


def bench_decode(model, batch, prompt_len, new_tokens, recompute=True, repeats=2):
  rng = np.random.default_rng(0)
  prompts = rng.integers(1, model.config.vocab_size, (batch, prompt_len)).tolist()
  gen = sampler.Generator(model, _Tok(), stop_ids=[])
  out = {}
  gen.generate_ids(prompts, new_tokens)  # compile
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    ids = gen.generate_ids(prompts, new_tokens)
    times.append(time.perf_counter() - t)
  assert all(len(i) == new_tokens for i in ids)
  out['cache_tokens_per_s'] = batch * new_tokens / min(times)
  if recompute:
    graphdef, params = nnx.split(model)
    width = prompt_len + new_tokens
    fn = _recompute_fn(graphdef, width)
    buf = np.zeros((batch, width), np.int32)
    buf[:, :prompt_len] = prompts
    jax.block_until_ready(fn(params, jnp.asarray(buf), prompt_len))  # compile
    times = []
    for _ in range(repeats):
      t = time.perf_counter()
      res = jax.block_until_ready(fn(params, jnp.asarray(buf), prompt_len))
      times.append(time.perf_counter() - t)
    out['recompute_tokens_per_s'] = batch * new_tokens / min(times)
    out['speedup'] = out['cache_tokens_per_s'] / out['recompute_tokens_per_s']
    # Same greedy tokens either way (the tests check this property across families).
    out['same_tokens'] = bool(np.array_equal(np.asarray(res)[:, prompt_len:], np.asarray(ids)))
  return out


def bench_mmlu(model, questions=64, words=60, batch_size=16):
  import lm_eval  # pylint: disable=g-import-not-at-top
  from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top
  from mos_jax.inference import loaded as loaded_lib
  from mos_jax.evals import lm_eval_model
  from mos_jax.infra import sharding  # pylint: disable=g-import-not-at-top
  from mos_jax.data import demo_skills  # pylint: disable=g-import-not-at-top
  tmp = tempfile.mkdtemp()
  vocab = ['plant', 'river', 'stone', 'cloud', 'apple', 'tiger', 'window', 'garden', 'silver']
  r = random.Random(0)
  phrase = lambda n: ' '.join(r.choice(vocab) for _ in range(n))
  demo_skills.build_tokenizer({'x': [{'t': phrase(20)} for _ in range(200)]}, os.path.join(tmp, 'tok'))
  rows = [{'question': phrase(words), 'choices': [phrase(5) for _ in range(4)],
           'answer': r.randint(0, 3)} for _ in range(questions)]
  with open(os.path.join(tmp, 'q.jsonl'), 'w') as f:
    f.writelines(json.dumps(x) + '\n' for x in rows)
  with open(os.path.join(tmp, 'mmlu_like.yaml'), 'w') as f:
    f.write(f'task: mmlu_like\ndataset_path: json\ndataset_kwargs:\n  data_files:\n'
            f'    test: {tmp}/q.jsonl\ntest_split: test\noutput_type: multiple_choice\n'
            'doc_to_text: "{{question.strip()}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}\\n'
            'C. {{choices[2]}}\\nD. {{choices[3]}}\\nAnswer:"\n'
            'doc_to_choice: ["A", "B", "C", "D"]\ndoc_to_target: answer\n'
            'metric_list:\n  - metric: acc\n')
  from mos_jax.data import bundle  # pylint: disable=g-import-not-at-top
  tokenizer = bundle.load_tokenizer(os.path.join(tmp, 'tok'))
  mesh = sharding.make_mesh({'data': 1, 'fsdp': -1, 'tensor': 1})
  loaded = loaded_lib.Loaded(model=model, step=None, tokenizer=tokenizer,
                            tokenizer_dir=os.path.join(tmp, 'tok'), mesh=mesh, template=None)
  lm = lm_eval_model.MosJaxLM(loaded=loaded, batch_size=batch_size)
  manager = TaskManager(include_path=tmp)
  kwargs = dict(model=lm, tasks=['mmlu_like'], task_manager=manager, bootstrap_iters=0,
                verbosity='ERROR')
  lm_eval.simple_evaluate(limit=batch_size, **kwargs)  # compile
  t = time.perf_counter()
  lm_eval.simple_evaluate(**kwargs)
  return {'mmlu_examples_per_s': questions / (time.perf_counter() - t)}


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--preset', default='tiny')
  p.add_argument('--dtype', default='float32')
  p.add_argument('--batches', default='1,8')
  p.add_argument('--prompt_len', type=int, default=32)
  p.add_argument('--new_tokens', type=int, default=256)
  p.add_argument('--skip_recompute', action='store_true')
  p.add_argument('--skip_mmlu', action='store_true')
  a = p.parse_args()
  overrides = {'dtype': a.dtype, 'param_dtype': a.dtype}
  if a.preset == 'tiny':
    overrides['vocab_size'] = 512  # The demo tokenizer's size.
  model = models.init_model(models.get_preset(a.preset, **overrides), seed=0)
  result = {'device': str(jax.devices()[0].device_kind), 'jax': jax.__version__,
            'preset': a.preset, 'dtype': a.dtype, 'prompt_len': a.prompt_len,
            'new_tokens': a.new_tokens}
  for b in [int(x) for x in a.batches.split(',')]:
    result[f'batch_{b}'] = bench_decode(model, b, a.prompt_len, a.new_tokens,
                                        recompute=not a.skip_recompute)
  if not a.skip_mmlu:
    result.update(bench_mmlu(model))
  print(json.dumps(result, indent=2))


if __name__ == '__main__':
  main()
