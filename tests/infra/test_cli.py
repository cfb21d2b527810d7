"""Config command lines: an unknown key is named with a suggestion, in one line."""

import os
import subprocess
import sys

import pytest

from mos_jax.infra import cli

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_unknown_override_names_the_key():
  recipe = os.path.join(REPO, 'configs', 'paper.py')
  with pytest.raises(cli.UnknownConfigKeyError, match=r"'train\.lrr'.*did you mean 'train\.lr'"):
    cli.load_config(recipe, ['--config.train.lrr=1e-3'])
  inf = cli.load_config(recipe, ['--config.mixing.strategy=static',
                                 '--config.mixing.prior_temperature=10'])
  assert inf.mixing.prior_temperature == 10.0


def test_command_line_error_is_one_clear_line():
  main = ('from absl import app; from mos_jax.infra import cli; c = cli.define_config_flag(); '
          'app.run(lambda argv: print(c.value.train.lr), flags_parser=cli.parse_flags)')
  recipe = os.path.join(REPO, 'configs', 'paper.py') + ':qwen-diff'
  run = subprocess.run([sys.executable, '-c', main, f'--config={recipe}',
                        '--config.mixing.rewrd=cossim'], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, 'PYTHONPATH': REPO})
  assert run.returncode == 1
  assert run.stderr.strip() == (
      "error: Unknown config key 'mixing.rewrd' "
      "(from --config.mixing.rewrd=cossim); did you mean 'mixing.reward'?")
