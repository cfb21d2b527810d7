"""The `mos_jax` lm-eval model against lm-eval's own `hf` model (PyTorch transformers).

One tiny random Llama checkpoint with the demo tokenizer, three local tasks written here (task
YAMLs with local data files: multiple choice, generation, rolling perplexity), run through
lm_eval.simple_evaluate with both models.
"""

import json
import os
import random
import shutil

import pytest
import torch
import transformers

lm_eval = pytest.importorskip('lm_eval')
from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top

from mos_jax import config as config_lib
from mos_jax.inference import loaded as loaded_lib
from mos_jax.evals import lm_eval_model
from mos_jax.data import demo_skills

WORDS = ['plant', 'river', 'stone', 'cloud', 'apple', 'tiger', 'window', 'garden', 'silver',
         'candle', 'rocket', 'forest', 'red', 'blue', 'green', 'gold']
MAX_LENGTH = 48  # Small, so rolling windows and left truncation happen.

MC_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""
GEN_YAML = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "stone"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
"""
ROLLING_YAML = """task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: "{{{{text}}}}"
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
"""


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp('lm_eval')
  rng = random.Random(0)
  phrase = lambda n: ' '.join(rng.choice(WORDS) for _ in range(n))
  mc = [{'question': phrase(rng.randint(2, 9)), 'choices': [phrase(rng.randint(1, 3)) for _ in range(4)],
         'label': rng.randint(0, 3)} for _ in range(12)]
  gen = [{'question': phrase(rng.randint(2, 30)), 'answer': phrase(1)} for _ in range(6)]
  ppl = [{'text': phrase(rng.randint(5, 40))} for _ in range(5)]
  tasks = root / 'tasks'
  tasks.mkdir()
  for name, rows, yaml in (('mc', mc, MC_YAML), ('gen', gen, GEN_YAML), ('ppl', ppl, ROLLING_YAML)):
    data = root / f'{name}.jsonl'
    data.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    (tasks / f'{name}.yaml').write_text(yaml.format(path=data))

  # Tiny random Llama + the demo tokenizer in one HF folder.
  demo_skills.build_tokenizer({'x': [{'text': phrase(8)} for _ in range(300)]}, str(root / 'tok'))
  tokenizer = transformers.AutoTokenizer.from_pretrained(root / 'tok')
  torch.manual_seed(0)
  hf_config = transformers.LlamaConfig(
      vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_LENGTH,
      eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
      pad_token_id=tokenizer.pad_token_id)
  model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
  with torch.no_grad():  # Larger weights than the init, so likelihoods differ across choices.
    for p in model.parameters():
      p.mul_(4.0)
  folder = root / 'model'
  model.save_pretrained(folder)
  tokenizer.save_pretrained(folder)
  return folder, TaskManager(include_path=str(tasks))


def _run(lm, task_manager):
  return lm_eval.simple_evaluate(model=lm, tasks=['tiny_mc', 'tiny_gen', 'tiny_ppl'],
                                 task_manager=task_manager, log_samples=True,
                                 bootstrap_iters=0, random_seed=0, numpy_random_seed=0,
                                 torch_random_seed=0, fewshot_random_seed=0)


def test_same_results_as_lm_eval_hf_model(setup):
  folder, task_manager = setup
  from lm_eval.models.huggingface import HFLM  # pylint: disable=g-import-not-at-top
  hf = _run(HFLM(pretrained=str(folder), device='cpu', batch_size=4, dtype='float32',
                 max_length=MAX_LENGTH), task_manager)

  config = config_lib.base_config()
  config.model.hf_checkpoint = str(folder)
  config.mesh.fsdp = 1
  ours_lm = lm_eval_model.MosJaxLM(loaded=loaded_lib.load(config), batch_size=4,
                                   max_length=MAX_LENGTH)
  ours = _run(ours_lm, task_manager)

  for task in ('tiny_mc', 'tiny_gen', 'tiny_ppl'):
    a, b = ours['samples'][task], hf['samples'][task]
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
      if task == 'tiny_gen':
        assert x['resps'] == y['resps']  # Identical generations.
      else:
        for rx, ry in zip(x['resps'], y['resps']):
          lx = rx[0][0] if isinstance(rx[0], (list, tuple)) else rx[0]
          ly = ry[0][0] if isinstance(ry[0], (list, tuple)) else ry[0]
          assert abs(float(lx) - float(ly)) < 1e-4, (task, lx, ly)
    for metric, value in hf['results'][task].items():
      if isinstance(value, float) and 'stderr' not in metric:
        assert ours['results'][task][metric] == pytest.approx(value, rel=1e-5, abs=1e-6), metric
  # The task is not degenerate: the choices' likelihoods differ, and generations are not empty.
  scores = [float(r[0][0]) for r in ours['samples']['tiny_mc'][0]['resps']]
  assert len(set(scores)) == 4
  assert any(r[0][0].strip() for r in (s['resps'] for s in ours['samples']['tiny_gen']))


def test_model_args_from_the_command_line_form(setup):
  folder, _ = setup
  recipe = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), 'configs',
                        'demo.py')
  lm = lm_eval.api.registry.get_model('mos_jax').create_from_arg_string(
      f'config={recipe},config.model.hf_checkpoint={folder},config.data.tokenizer={folder},'
      f'config.mesh.fsdp=1', {'batch_size': 2, 'max_batch_size': None, 'device': 'cpu'})
  assert lm.batch_size == 2 and lm.loaded.model.config.vocab_size > 0
  with pytest.raises(ValueError, match='unknown mos_jax model_args'):
    lm_eval.api.registry.get_model('mos_jax').create_from_arg_string(
        f'config={recipe},config.model.hf_checkpoint={folder},batchsize=2')


def test_chat_template_matches_the_tokenizer(setup):
  folder, _ = setup
  config = config_lib.base_config()
  config.model.hf_checkpoint = str(folder)
  config.mesh.fsdp = 1
  lm = lm_eval_model.MosJaxLM(loaded=loaded_lib.load(config))
  chat = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'red or blue?'}]
  tok = transformers.AutoTokenizer.from_pretrained(folder)
  assert lm.apply_chat_template(chat) == tok.apply_chat_template(
      chat, tokenize=False, add_generation_prompt=True)
  partial = chat + [{'role': 'assistant', 'content': 'The answer is'}]
  assert lm.apply_chat_template(partial, add_generation_prompt=False) == tok.apply_chat_template(
      partial, tokenize=False, continue_final_message=True)
