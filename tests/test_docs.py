"""The README and docs/: every relative link resolves, the README stays short, and the config
reference in docs/config-reference.md is the table the schema produces."""

import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, 'README.md')
DOCS = os.path.join(REPO, 'docs')
MAX_README_LINES = 300
MAX_README_WIDTH = 100

# [text](target) and ![alt](target); the target ends at whitespace or ')' (an optional "title"
# after a space is ignored). Nested brackets in the text are not used in these files.
_LINK = re.compile(r'!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)')
_FENCE = re.compile(r'^(```|~~~)')


def _doc_files() -> list[str]:
  docs = sorted(os.path.join(DOCS, f) for f in os.listdir(DOCS) if f.endswith('.md'))
  return [README] + docs


def _prose(path: str) -> str:
  """The file without fenced code blocks and code spans, where brackets are not links."""
  lines, fenced = [], False
  with open(path, encoding='utf-8') as f:
    for line in f:
      if _FENCE.match(line.lstrip()):
        fenced = not fenced
      elif not fenced:
        lines.append(line)
  return re.sub(r'`[^`]*`', '', ''.join(lines))  # A code span may wrap onto the next line.


def _links(path: str) -> list[str]:
  return _LINK.findall(_prose(path))


def _relative(target: str) -> bool:
  return not (re.match(r'^[a-zA-Z][a-zA-Z0-9+.-]*:', target) or target.startswith('#'))


def _slug(heading: str) -> str:
  """GitHub's anchor for a heading: lower case, code marks and punctuation dropped, spaces -> '-'."""
  text = re.sub(r'\[([^\]]*)\]\([^)]*\)', r'\1', heading.strip()).lower()
  text = re.sub(r'[^\w\- ]', '', text)
  return text.replace(' ', '-')


def _anchors(path: str) -> set[str]:
  anchors, seen, fenced = set(), {}, False
  with open(path, encoding='utf-8') as f:
    for line in f:
      if _FENCE.match(line.lstrip()):
        fenced = not fenced
      elif not fenced and (m := re.match(r'^#{1,6}\s+(.*?)\s*#*\s*$', line)):
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f'{slug}-{n}')
  return anchors


def _name(path: str) -> str:
  return os.path.relpath(path, REPO)


def test_relative_links_resolve():
  missing = []
  for path in _doc_files():
    base = os.path.dirname(path)
    missing += [f'{_name(path)}: {t}' for t in _links(path) if _relative(t) and not os.path.exists(
        os.path.normpath(os.path.join(base, t.split('#')[0])))]
  assert not missing, f'links to files that do not exist: {missing}'


def test_anchors_into_markdown_resolve():
  """path.md#heading (and #heading within a file) names a heading of that file."""
  bad = []
  for path in _doc_files():
    for target in _links(path):
      file, _, anchor = target.partition('#')
      if not anchor or (file and not _relative(file)):
        continue
      dest = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
      if dest.endswith('.md') and os.path.exists(dest) and anchor not in _anchors(dest):
        bad.append(f'{_name(path)}: {target}')
  assert not bad, f'links to headings that do not exist: {bad}'


def test_readme_is_short():
  with open(README, encoding='utf-8') as f:
    lines = f.read().splitlines()
  assert len(lines) <= MAX_README_LINES, (
      f'README.md has {len(lines)} lines (at most {MAX_README_LINES}): move a topic to docs/')
  wide = [i for i, line in enumerate(lines, 1) if len(line) > MAX_README_WIDTH]
  assert not wide, f'README.md lines wider than {MAX_README_WIDTH} characters: {wide}'


def test_config_reference_is_current():
  from mos_jax.config import reference_table  # pylint: disable=import-outside-toplevel
  with open(os.path.join(DOCS, 'config-reference.md'), encoding='utf-8') as f:
    text = f.read()
  begin, end = reference_table.BEGIN, reference_table.END
  assert text.count(begin) == 1 and text.count(end) == 1, f'markers {begin!r} ... {end!r} missing'
  between = text[text.index(begin) + len(begin):text.index(end)]
  assert between.strip() == reference_table.reference_table().strip(), (
      'docs/config-reference.md is stale: run python -m mos_jax.config_doc --write')
