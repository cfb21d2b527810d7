"""Chat templates: a conversation -> (text, character spans that are trained on).

A span covers an assistant turn's content and the token that closes the turn (the EOS of that
turn, e.g. <|im_end|>), never the role header before it or the newline after it.

Two kinds of renderer give the same output shape:
  - `HFTemplate` renders with the tokenizer's own Jinja chat template, so the text is exactly what
    `tokenizer.apply_chat_template` produces; assistant spans come from rendering prefixes.
  - `BuiltinTemplate` renders chatml, vicuna (FastChat v1.1, the MoS authors' code), llama3 or
    gemma piece by piece, for tokenizers that ship no template.
"""

from collections.abc import Sequence

BUILTIN_TEMPLATES = ('chatml', 'vicuna', 'llama3', 'gemma')

VICUNA_SYSTEM = ('A chat between a curious user and an artificial intelligence assistant. '
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")

# Tokens that close a turn in common templates; the tokenizer's eos_token is always a candidate.
_TURN_CLOSERS = ('<|im_end|>', '<|eot_id|>', '<end_of_turn>', '<|end|>', '<|endoftext|>', '</s>',
                 '<eos>')

Span = tuple[int, int]


class TemplateError(ValueError):
  pass


class BuiltinTemplate:
  """One of BUILTIN_TEMPLATES, rendered piece by piece so spans are exact by construction."""

  def __init__(self, name: str, tokenizer):
    if name not in BUILTIN_TEMPLATES:
      raise TemplateError(f'unknown template {name!r}; built-in: {", ".join(BUILTIN_TEMPLATES)}')
    self.name = name
    self._bos = tokenizer.bos_token or ''
    self._eos = tokenizer.eos_token or '</s>'

  def render(self, conversation: Sequence[dict]) -> tuple[str, list[Span]]:
    pieces: list[tuple[str, bool]] = []  # (text, trained)
    getattr(self, f'_{self.name}')(list(conversation), pieces)
    text, spans, pos = [], [], 0
    for piece, trained in pieces:
      if trained and piece:
        if spans and spans[-1][1] == pos:
          spans[-1] = (spans[-1][0], pos + len(piece))
        else:
          spans.append((pos, pos + len(piece)))
      text.append(piece)
      pos += len(piece)
    return ''.join(text), spans

  @staticmethod
  def _chatml(conv, out):
    for m in conv:
      out.append((f'<|im_start|>{m["role"]}\n', False))
      assistant = m['role'] == 'assistant'
      out += [(m['content'], assistant), ('<|im_end|>', assistant), ('\n', False)]

  def _vicuna(self, conv, out):
    system = VICUNA_SYSTEM
    if conv and conv[0]['role'] == 'system':
      system, conv = conv[0]['content'], conv[1:]
    out.append((f'{self._bos}{system} ', False))
    for m in conv:
      if m['role'] == 'assistant':
        out += [('ASSISTANT: ', False), (m['content'], True), (self._eos, True)]
      else:
        out.append((f'USER: {m["content"]} ', False))

  def _llama3(self, conv, out):
    out.append((self._bos or '<|begin_of_text|>', False))
    for m in conv:
      assistant = m['role'] == 'assistant'
      out += [(f'<|start_header_id|>{m["role"]}<|end_header_id|>\n\n', False),
              (m['content'].strip(), assistant), ('<|eot_id|>', assistant)]

  def _gemma(self, conv, out):
    out.append((self._bos or '<bos>', False))
    system = ''
    if conv and conv[0]['role'] == 'system':  # Gemma has no system role: prepend to the user turn.
      system, conv = conv[0]['content'].strip() + '\n\n', conv[1:]
    for k, m in enumerate(conv):
      assistant = m['role'] == 'assistant'
      content = m['content'].strip()
      if k == 0 and system and not assistant:
        content = system + content
      role = 'model' if assistant else 'user'
      out += [(f'<start_of_turn>{role}\n', False), (content, assistant),
              ('<end_of_turn>', assistant), ('\n', False)]


class HFTemplate:
  """The tokenizer's own Jinja chat template."""

  name = 'tokenizer'

  def __init__(self, tokenizer):
    from transformers.utils import chat_template_utils  # pylint: disable=g-import-not-at-top
    template = tokenizer.chat_template
    if isinstance(template, dict):
      template = template.get('default')
    if not template:
      raise TemplateError('the tokenizer has no chat template; set data.template to one of '
                          + ', '.join(BUILTIN_TEMPLATES))
    # The compiled template with the tokenizer's special tokens is what apply_chat_template runs;
    # calling it directly avoids per-call overhead (checked against apply_chat_template in
    # `check_against`).
    self._compiled = chat_template_utils._compile_jinja_template(template)  # pylint: disable=protected-access
    self._kwargs = dict(tokenizer.special_tokens_map)
    vocab = tokenizer.get_vocab()
    closers = {tokenizer.eos_token, *_TURN_CLOSERS}
    self._closers = sorted((c for c in closers if c and c in vocab), key=len, reverse=True)
    self._tokenizer = tokenizer

  def _render(self, messages, add_generation_prompt: bool) -> str:
    return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                 **self._kwargs)

  def check_against(self, conversation: Sequence[dict]) -> None:
    expected = self._tokenizer.apply_chat_template(list(conversation), tokenize=False)
    if self._render(list(conversation), False) != expected:
      raise TemplateError('rendering the chat template directly differs from '
                          'tokenizer.apply_chat_template; please report this')

  def render(self, conversation: Sequence[dict]) -> tuple[str, list[Span]]:
    conversation = list(conversation)
    text = self._render(conversation, False)
    spans = []
    for k, m in enumerate(conversation):
      if m['role'] != 'assistant':
        continue
      prefix = self._render(conversation[:k], True)
      if not text.startswith(prefix):
        raise TemplateError(
            'the chat template renders earlier turns differently once later turns follow, so '
            'assistant turns cannot be located; set data.template to a built-in template')
      content = m['content'].strip()  # Templates may trim content.
      start = text.find(content, len(prefix)) if content else len(prefix)
      if start < 0:
        raise TemplateError(f'assistant turn {k} is not rendered verbatim by the chat template')
      end = start + len(content)
      rest = text[end:]
      gap = len(rest) - len(rest.lstrip(' \n'))
      for closer in self._closers:
        if rest[gap:].startswith(closer):
          end += gap + len(closer)
          break
      spans.append((start, end))
    return text, spans


def make_template(tokenizer, name: str = ''):
  """`name` '' = the tokenizer's template; otherwise a built-in one."""
  if name:
    return BuiltinTemplate(name, tokenizer)
  return HFTemplate(tokenizer)


def generation_prompt(template, conversation: Sequence[dict]) -> str:
  """The text that asks for the next assistant turn (HF `add_generation_prompt=True`)."""
  conversation = list(conversation)
  if isinstance(template, HFTemplate):
    return template._render(conversation, True)  # pylint: disable=protected-access
  # Built-in: render an empty assistant turn; its (trained) span starts where the answer goes.
  text, spans = template.render(conversation + [{'role': 'assistant', 'content': ''}])
  return text[:spans[-1][0]]


def turn_closers(tokenizer) -> list[str]:
  """Tokens of the tokenizer's vocabulary that close a chat turn (generation stops there)."""
  vocab = tokenizer.get_vocab()
  return [c for c in (tokenizer.eos_token, *_TURN_CLOSERS) if c and c in vocab]
