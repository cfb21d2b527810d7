"""What every command shares: the `--config` flag, readable flag errors, quiet logs, short errors.

    _CONFIG = cli.define_config_flag()
    if __name__ == '__main__':
      cli.run(main, 'train', required=('config', 'workdir'))

ml_collections raises a bare AttributeError/KeyError deep inside flag parsing when
`--config.KEY=...` names no field; `parse_flags` replaces it with one line naming the key.
`run` routes library logs to a file (`mos_jax.infra.console`), prints expected errors
(`mos_jax.infra.errors.EXPECTED`) as one paragraph and exits 1, and Ctrl-C outside training as one line
with exit 130, and a lost host of a multi-host run as one paragraph with exit 75
(`mos_jax.infra.lost_host`); `--alsologtostderr` shows all logs and tracebacks on the terminal.
"""

import difflib
import logging
import os
import re
import sys
import traceback

from absl import app
from absl import flags
from ml_collections import config_dict
from ml_collections import config_flags

from mos_jax.infra import console
from mos_jax.infra import errors
from mos_jax.infra import lost_host

log = logging.getLogger(__name__)

_OVERRIDE = re.compile(r'^--?(?:no)?config\.([^=]+)')


class UnknownConfigKeyError(ValueError):
  """An override names a key the config does not have."""


def define_config_flag(flag_values: flags.FlagValues = flags.FLAGS, sys_argv=None):
  """Defines `--config path/to/recipe.py[:arg]` plus its `--config.KEY=VALUE` overrides."""
  return config_flags.DEFINE_config_file(
      'config', None, 'Recipe file (ml_collections get_config), optionally with a :arg suffix.',
      flag_values=flag_values, sys_argv=sys_argv, lock_config=True)


def _key_paths(config: config_dict.ConfigDict, prefix: str = '') -> list[str]:
  """Every dotted key of the config, inner nodes included."""
  paths = []
  for key, value in config.items():
    paths.append(prefix + key)
    if isinstance(value, config_dict.ConfigDict):
      paths.extend(_key_paths(value, prefix + key + '.'))
  return paths


def _has_path(config: config_dict.ConfigDict, path: str) -> bool:
  node = config
  for part in path.split('.'):
    if not isinstance(node, config_dict.ConfigDict) or part not in node:
      return False
    node = node[part]
  return True


def unknown_override_message(config: config_dict.ConfigDict, argv: list[str]) -> str | None:
  """Names the first `--config.KEY` in argv that the config lacks (with a suggestion), else None."""
  known = _key_paths(config)
  for arg in argv:
    match = _OVERRIDE.match(arg)
    if match and not _has_path(config, match.group(1)):
      key = match.group(1)
      message = f"Unknown config key '{key}' (from {arg})"
      close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
      return message + (f"; did you mean '{close[0]}'?" if close else '.')
  return None


def _config_spec(argv: list[str]) -> str | None:
  """The value of --config in argv (either `--config=X` or `--config X`)."""
  for i, arg in enumerate(argv):
    if re.match(r'^--?config=', arg):
      return arg.split('=', 1)[1]
    if re.match(r'^--?config$', arg) and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _parse(flag_values: flags.FlagValues, argv: list[str]) -> list[str]:
  try:
    return flag_values(argv)
  except (AttributeError, KeyError) as e:
    spec = _config_spec(argv)
    if spec is None:
      raise
    config = config_flags.config_flags.ConfigFileFlagParser('config').parse(spec)
    message = unknown_override_message(config, argv)
    if message is None:
      raise
    raise UnknownConfigKeyError(message) from e


def parse_flags(argv: list[str]) -> list[str]:
  """absl `app.run(..., flags_parser=parse_flags)`: exits with one clear line on a bad flag."""
  try:
    return _parse(flags.FLAGS, argv)
  except UnknownConfigKeyError as e:
    _fail(str(e))
  except flags.Error as e:
    _fail(f'{e} (--helpshort lists the flags).')
  except errors.EXPECTED as e:  # A recipe file that is missing or does not load.
    _fail(f'--config: {e}')


def _fail(message: str, code: int = 1):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(code)


def _check_required(required, command: str):
  for name in required:
    if name in flags.FLAGS and flags.FLAGS[name].value in (None, ''):
      example = {'config': ' configs/demo.py', 'workdir': ' runs/NAME'}.get(name, '=...')
      _fail(f'--{name} is required, e.g. python -m mos_jax.{command} --{name}{example} '
            f'(--helpshort lists the flags).')
  spec = _config_spec(sys.argv)
  if 'config' in required and spec and not os.path.isfile(spec.split(':')[0]):
    _fail(f'--config {spec}: there is no file {spec.split(":")[0]} (from {os.getcwd()}).')


def run(main, command: str, required=('config',), log_in_workdir: bool = False) -> None:
  """absl's app.run for a mos_jax command: quiet logs, one-paragraph errors, exit codes.

  `main(argv)` may return an exit code. Exits 1 on an expected error, 130 on Ctrl-C.
  `log_in_workdir`: the log goes to the run's own folder once it is accepted (training).
  """

  def wrapped(argv):
    echo = flags.FLAGS['alsologtostderr'].value or flags.FLAGS['logtostderr'].value
    console.setup(command, echo=echo, debug=flags.FLAGS['verbosity'].value >= 1,
                  log_in_workdir=log_in_workdir)
    try:
      _check_required(required, command)  # Inside: its message is logged to the file too.
      return main(argv)
    except KeyboardInterrupt:
      log.info('Interrupted.', exc_info=True, extra={'terminal': False})
      print('Interrupted (Ctrl-C).', file=sys.stderr)
      sys.exit(130)
    except errors.EXPECTED as e:
      log.info('Stopped with an expected error.', exc_info=True, extra={'terminal': False})
      if echo:
        traceback.print_exc()
      message = str(e).strip() or type(e).__name__
      if isinstance(e, OSError) and e.filename and str(e.filename) not in message:
        message += f' ({e.filename})'
      _fail(f'{message}\n(Details in {console.log_path()}; --alsologtostderr shows them here.)')
    except Exception as e:
      lost_host.settle(e)  # A failed collective because a host was lost: exit 75, one paragraph.
      log.error('Unexpected error.', exc_info=True, extra={'terminal': False})
      raise
    finally:
      console.finish()

  app.run(wrapped, flags_parser=parse_flags)


def load_config(spec: str, overrides: list[str] = ()) -> config_dict.ConfigDict:
  """Loads `path.py[:arg]` with `--config.KEY=VALUE` overrides, as the command line would.

  Raises UnknownConfigKeyError naming a mistyped key.
  """
  argv = ['load_config', f'--config={spec}', *overrides]
  flag_values = flags.FlagValues()
  holder = define_config_flag(flag_values, sys_argv=argv)
  _parse(flag_values, argv)
  return holder.value
