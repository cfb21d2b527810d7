"""Exact loss-mask positions per chat template, counted by hand with a character tokenizer.

Token k of the rendered text is trained when it is assistant content or the token closing an
assistant turn; loss_mask[t] = trained[t + 1] (targets are the next tokens).
"""

import numpy as np
import pytest
from transformers import AutoTokenizer

from mos_jax.data import build_data
from mos_jax.data import templates
from mos_jax.data import tokenize as tokenize_lib
from mos_jax import config as config_lib
from test_data_common import CHATML_JINJA, char_tokenizer, small_config, write_jsonl

CONV = [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'yo'},
        {'role': 'user', 'content': 'ok'}, {'role': 'assistant', 'content': 'go'}]

VICUNA_JINJA = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ 'USER: ' + m['content'] + ' ' }}"
    "{% else %}{{ 'ASSISTANT: ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT: ' }}{% endif %}")


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  return AutoTokenizer.from_pretrained(char_tokenizer(str(tmp_path_factory.mktemp('tok'))))


def _mask_positions(tokenizer, template, conv, max_len=200):
  table, kept, _ = tokenize_lib.tokenize([template.render(conv)], tokenizer, max_len, 'truncate',
                                         False)
  assert list(kept) == [0]
  trained = np.asarray(table.column('trained')[0].as_py())
  return list(np.nonzero(trained[1:])[0]), len(trained)


# Hand counts (see each comment): trained tokens are the two reply characters and the closer.
def test_chatml_positions(tok):
  # <|im_start|>=0 user=1-4 \n=5 h,i=6,7 <|im_end|>=8 \n=9 <|im_start|>=10 assistant=11-19 \n=20
  # y,o=21,22 <|im_end|>=23 \n=24 ... second assistant: header ends at 45, g,o=46,47, close=48.
  positions, n = _mask_positions(tok, templates.BuiltinTemplate('chatml', tok), CONV)
  assert n == 50
  assert positions == [20, 21, 22, 45, 46, 47]


def test_vicuna_positions(tok):
  # <s>=0 'sys'=1-3 ' '=4 'USER: hi '=5-13 'ASSISTANT: '=14-24 y,o=25,26 </s>=27
  # 'USER: ok '=28-36 'ASSISTANT: '=37-47 g,o=48,49 </s>=50
  conv = [{'role': 'system', 'content': 'sys'}] + CONV
  positions, n = _mask_positions(tok, templates.BuiltinTemplate('vicuna', tok), conv)
  assert n == 51
  assert positions == [24, 25, 26, 47, 48, 49]
  text, _ = templates.BuiltinTemplate('vicuna', tok).render(CONV)
  assert text.startswith('<s>' + templates.VICUNA_SYSTEM + ' USER: hi ASSISTANT: yo</s>')


def test_llama3_positions(tok):
  # <s>=0 <|start_header_id|>=1 user=2-5 <|end_header_id|>=6 \n\n=7,8 h,i=9,10 <|eot_id|>=11
  # 12 assistant=13-21 22 \n\n=23,24 y,o=25,26 eot=27 | user turn 28-38 | 39 40-48 49 50,51
  # g,o=52,53 eot=54
  positions, n = _mask_positions(tok, templates.BuiltinTemplate('llama3', tok), CONV)
  assert n == 55
  assert positions == [24, 25, 26, 51, 52, 53]


def test_gemma_positions_and_system_folding(tok):
  # <s>=0 <start_of_turn>=1 user=2-5 \n=6 h,i=7,8 <end_of_turn>=9 \n=10 <start_of_turn>=11
  # model=12-16 \n=17 y,o=18,19 <end_of_turn>=20 \n=21 | 22-31 | 32 model=33-37 \n=38
  # g,o=39,40 <end_of_turn>=41 \n=42
  gemma = templates.BuiltinTemplate('gemma', tok)
  positions, n = _mask_positions(tok, gemma, CONV)
  assert n == 43
  assert positions == [17, 18, 19, 38, 39, 40]
  text, _ = gemma.render([{'role': 'system', 'content': 'S'}] + CONV[:2])
  assert text == ('<s><start_of_turn>user\nS\n\nhi<end_of_turn>\n'
                  '<start_of_turn>model\nyo<end_of_turn>\n')


def test_tokenizer_chatml_template_matches_builtin_and_hf(tok):
  tok.chat_template = CHATML_JINJA
  hf = templates.HFTemplate(tok)
  text, _ = hf.render(CONV)
  assert text == tok.apply_chat_template(CONV, tokenize=False)
  positions, n = _mask_positions(tok, hf, CONV)
  assert (positions, n) == ([20, 21, 22, 45, 46, 47], 50)


def test_tokenizer_template_with_eos_closer(tok):
  # 'USER: hi '=0-8 'ASSISTANT: '=9-19 y,o=20,21 </s>=22 'USER: ok '=23-31 'ASSISTANT: '=32-42
  # g,o=43,44 </s>=45
  tok.chat_template = VICUNA_JINJA
  positions, n = _mask_positions(tok, templates.HFTemplate(tok), CONV)
  assert (positions, n) == ([19, 20, 21, 42, 43, 44], 46)


def test_template_that_rewrites_history_is_refused(tok):
  tok.chat_template = "{{ messages[-1]['content'] }}"
  with pytest.raises(templates.TemplateError, match='earlier turns'):
    templates.HFTemplate(tok).render(CONV)


def test_train_on_prompt_trains_every_target(tok):
  table, _, counts = tokenize_lib.tokenize(
      [templates.BuiltinTemplate('chatml', tok).render(CONV)], tok, 200, 'truncate', True)
  assert table.column('trained')[0].as_py()[1:] == [1] * 49
  assert counts.response_tokens == 49 and counts.prompt_tokens == 0


def test_batch_rows_through_build_data(tmp_path):
  """End to end: rows are shifted, positioned and masked exactly as hand-counted."""
  tok_dir = char_tokenizer(str(tmp_path / 'tok'))
  path = write_jsonl(str(tmp_path / 'a.jsonl'), [{'messages': CONV}])
  c = small_config(tok_dir, {'a': config_lib.dataset(path, dev_examples=0)}, max_len=60,
                   batch_size=1, eval_batch_size=1)
  data = build_data(c)
  batch = next(data.train)
  ids = data.example('a', 0)['ids']
  assert batch['tokens'].shape == (1, 60)
  np.testing.assert_array_equal(batch['tokens'][0, :49], ids[:-1])
  np.testing.assert_array_equal(batch['targets'][0, :49], ids[1:])
  assert list(np.nonzero(batch['loss_mask'][0])[0]) == [20, 21, 22, 45, 46, 47]
  np.testing.assert_array_equal(batch['positions'][0, :49], np.arange(49))
  assert batch['segment_ids'][0].tolist() == [1] * 49 + [0] * 11
  assert (batch['tokens'][0, 49:] == data.tokenizer.pad_token_id).all()
  data.close()
