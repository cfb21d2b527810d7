"""Helpers shared by the data tests: a character-level tokenizer, JSONL writers, small configs.

With the character tokenizer every character is one token and every special token is one token,
so expected token positions can be counted by hand.
"""

import json
import os

from mos_jax import config as config_lib

SPECIALS = ['<pad>', '<s>', '</s>', '<unk>', '<|im_start|>', '<|im_end|>', '<|begin_of_text|>',
            '<|start_header_id|>', '<|end_header_id|>', '<|eot_id|>', '<start_of_turn>',
            '<end_of_turn>']

CHATML_JINJA = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def char_tokenizer(out_dir: str, chat_template: str | None = None) -> str:
  """Saves a character-level fast tokenizer (bos <s>, eos </s>, pad <pad>) and returns its dir."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from transformers import PreTrainedTokenizerFast  # pylint: disable=g-import-not-at-top
  chars = [chr(i) for i in range(32, 127)] + ['\n']
  vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[], unk_token='<unk>'))
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token='<pad>', bos_token='<s>',
                                 eos_token='</s>', unk_token='<unk>',
                                 additional_special_tokens=SPECIALS[4:])
  if chat_template:
    fast.chat_template = chat_template
  fast.save_pretrained(out_dir)
  return out_dir


def write_jsonl(path: str, rows) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    for row in rows:
      f.write((row if isinstance(row, str) else json.dumps(row)) + '\n')
  return path


def pr(prompt: str, response: str) -> dict:
  return {'prompt': prompt, 'response': response}


def small_config(tokenizer_dir: str, datasets: dict, **data):
  """A config with `datasets` = {name: path or dataset(...)}; data.* overrides in `data`."""
  c = config_lib.base_config()
  c.data.tokenizer = tokenizer_dir
  c.data.template = data.pop('template', 'chatml')
  c.data.max_len = data.pop('max_len', 64)
  c.train.batch_size = data.pop('batch_size', 4)
  c.data.reward_batch_size = data.pop('reward_batch_size', 2)
  c.data.eval_batch_size = data.pop('eval_batch_size', 4)
  for key, value in data.items():
    c.data[key] = value
  for name, entry in datasets.items():
    c.data.datasets[name] = (config_lib.dataset(entry, dev_examples=0)
                             if isinstance(entry, str) else entry)
  return c
