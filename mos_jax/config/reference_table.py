"""The config reference table, generated from the comments in mos_jax/config/schema.py.

`python -m mos_jax.config_doc --write` refreshes it in docs/config-reference.md (between the
markers); a test checks that the docs hold exactly this table, so it cannot drift from the schema.
"""

import inspect
import os
import re

from mos_jax.config import schema

BEGIN = '<!-- config-reference:begin (python -m mos_jax.config_doc --write) -->'
END = '<!-- config-reference:end -->'
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOC_PATH = os.path.join(_ROOT, 'docs', 'config-reference.md')
_ASSIGN = re.compile(r'^\s*(c|d)\.([\w.]+) = .*?  # (.*)$')


def _comments(function) -> dict[str, str]:
  """{'train.lr': 'Peak AdamW learning rate.', ...} from `c.x.y = v  # comment` source lines."""
  return {m.group(2): m.group(3) for line in inspect.getsource(function).splitlines()
          if (m := _ASSIGN.match(line))}


def _default(value) -> str:
  if hasattr(value, 'to_dict'):  # An empty ConfigDict: its repr spans lines.
    value = value.to_dict()
  return f'`{value!r}`'.replace('|', '\\|')


def _leaves(tree, prefix=''):
  """(dotted path, value) of a config's leaves; an empty ConfigDict counts as a leaf."""
  for key, value in tree.items():
    if hasattr(value, 'items') and len(value):
      yield from _leaves(value, prefix + key + '.')
    else:
      yield prefix + key, value


def reference_rows() -> list[tuple[str, str, str]]:
  """(key, default, meaning) for every key of base_config() and of one dataset() entry."""
  values = dict(_leaves(schema.base_config()))
  values.update(_leaves(schema.dataset(path=''), 'data.datasets.<name>.'))
  notes = _comments(schema.base_config)
  notes['data.datasets'] = 'One entry per dataset name, made by `dataset(...)`: the keys below.'
  notes.update({f'data.datasets.<name>.{k}': v for k, v in _comments(schema.dataset).items()})
  # Source order (as schema.py reads), then any key that has no comment.
  order = [k for k in notes if k in values] + [k for k in values if k not in notes]
  return [(k, _default(values[k]), notes.get(k, '')) for k in order]


def reference_table() -> str:
  lines = ['| key | default | meaning |', '|---|---|---|']
  lines += [f'| `{k}` | {d} | {m} |' for k, d, m in reference_rows()]
  return '\n'.join(lines)


def write(doc_path: str = DOC_PATH) -> None:
  """Replaces the text between BEGIN and END in doc_path with the current table."""
  with open(doc_path) as f:
    text = f.read()
  start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
  with open(doc_path, 'w') as f:
    f.write(text[:start] + '\n' + reference_table() + '\n' + text[end:])
