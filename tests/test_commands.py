"""Every command in the README's table exists and prints its usage with --help."""

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP_COMMANDS = ('train', 'evaluate', 'generate', 'compare', 'bench', 'export', 'lm_eval_cli',
                'config_doc')


def _readme_commands():
  with open(os.path.join(REPO, 'README.md'), encoding='utf-8') as f:
    return re.findall(r'^\| `python -m (mos_jax[\w.]+)` \|', f.read(), flags=re.M)


def test_readme_lists_every_top_level_command():
  listed = _readme_commands()
  assert {f'mos_jax.{c}' for c in TOP_COMMANDS} <= set(listed)
  on_disk = {f'mos_jax.{f[:-3]}' for f in os.listdir(os.path.join(REPO, 'mos_jax'))
             if f.endswith('.py') and f != '__init__.py'}
  assert on_disk == {f'mos_jax.{c}' for c in TOP_COMMANDS}  # Only commands at the top.


@pytest.mark.parametrize('module', _readme_commands())
def test_command_prints_its_usage(module):
  out = subprocess.run([sys.executable, '-m', module, '--help'], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
  text = out.stdout + out.stderr
  # absl exits 1 after --help; lm-eval's and config_doc's own parsers exit 0.
  assert out.returncode in (0, 1), text
  assert 'Traceback' not in text and 'Warning' not in text, text
  assert re.search(r'usage|flags:|python -m', text, flags=re.I), text
