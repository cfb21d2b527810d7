"""Record formats -> conversations: lists of {'role', 'content'} with roles system/user/assistant."""

from collections.abc import Iterable, Sequence

Conversation = list[dict[str, str]]

FORMATS = ('alpaca', 'sharegpt', 'messages', 'inputs_targets', 'prompt_response')

# Role spellings seen in ShareGPT dumps and chat datasets.
_ROLES = {
    'system': 'system',
    'human': 'user', 'user': 'user',
    'gpt': 'assistant', 'assistant': 'assistant', 'chatgpt': 'assistant', 'bard': 'assistant',
    'bing': 'assistant', 'model': 'assistant',
}


class RecordError(ValueError):
  """A record that does not fit its format; the caller adds the file and line."""


def detect_format(fields: Iterable[str]) -> str:
  """The format implied by a table's column names, or '' when none fits."""
  fields = set(fields)
  if 'conversations' in fields:
    return 'sharegpt'
  if 'messages' in fields:
    return 'messages'
  if {'instruction', 'output'} <= fields:
    return 'alpaca'
  if {'inputs', 'targets'} <= fields:
    return 'inputs_targets'
  if {'prompt', 'response'} <= fields:
    return 'prompt_response'
  return ''


def _text(record: dict, key: str, required: bool = True) -> str:
  value = record.get(key)
  if value is None:
    if required:
      raise RecordError(f'missing field {key!r}')
    return ''
  if not isinstance(value, str):
    raise RecordError(f'field {key!r} should be a string, got {type(value).__name__}')
  return value


def _turns(record: dict, key: str, role_key: str, content_key: str) -> Conversation:
  turns = record.get(key)
  if not isinstance(turns, Sequence) or isinstance(turns, str) or not turns:
    raise RecordError(f'field {key!r} should be a non-empty list of turns')
  out = []
  for k, turn in enumerate(turns):
    if not isinstance(turn, dict):
      raise RecordError(f'{key}[{k}] should be an object with {role_key!r} and {content_key!r}')
    speaker = turn.get(role_key)
    role = _ROLES.get(speaker.lower() if isinstance(speaker, str) else speaker)
    if role is None:
      raise RecordError(f'{key}[{k}] has unknown {role_key} {speaker!r}')
    content = turn.get(content_key)
    if not isinstance(content, str):
      raise RecordError(f'{key}[{k}] is missing a string {content_key!r}')
    out.append({'role': role, 'content': content})
  return out


def _with_system(record: dict, conversation: Conversation) -> Conversation:
  system = record.get('system')
  if isinstance(system, str) and system:
    return [{'role': 'system', 'content': system}] + conversation
  return conversation


def to_conversation(record: dict, fmt: str) -> Conversation:
  """One record -> one conversation; raises RecordError naming what is wrong."""
  if fmt == 'alpaca':
    prompt = _text(record, 'instruction')
    extra = _text(record, 'input', required=False)
    if extra:
      prompt = f'{prompt}\n\n{extra}'
    return _with_system(record, [{'role': 'user', 'content': prompt},
                                 {'role': 'assistant', 'content': _text(record, 'output')}])
  if fmt == 'sharegpt':
    return _turns(record, 'conversations', 'from', 'value')
  if fmt == 'messages':
    return _turns(record, 'messages', 'role', 'content')
  if fmt == 'inputs_targets':
    return _with_system(record, [{'role': 'user', 'content': _text(record, 'inputs')},
                                 {'role': 'assistant', 'content': _text(record, 'targets')}])
  if fmt == 'prompt_response':
    return _with_system(record, [{'role': 'user', 'content': _text(record, 'prompt')},
                                 {'role': 'assistant', 'content': _text(record, 'response')}])
  raise ValueError(f'unknown format {fmt!r}; known: {", ".join(FORMATS)}')
