"""The `--config` flag shared by every main(), with readable errors for mistyped override keys.

    _CONFIG = cli.define_config_flag()
    app.run(main, flags_parser=cli.parse_flags)

ml_collections raises a bare AttributeError/KeyError deep inside flag parsing when
`--config.KEY=...` names no field; `parse_flags` replaces it with one line naming the key.
"""

import difflib
import re
import sys

from absl import flags
from ml_collections import config_dict
from ml_collections import config_flags

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
  """absl `app.run(..., flags_parser=parse_flags)`: exits with one clear line on a bad key."""
  try:
    return _parse(flags.FLAGS, argv)
  except UnknownConfigKeyError as e:
    print(f'FATAL Flags parsing error: {e}', file=sys.stderr)
    sys.exit(1)


def load_config(spec: str, overrides: list[str] = ()) -> config_dict.ConfigDict:
  """Loads `path.py[:arg]` with `--config.KEY=VALUE` overrides, as the command line would.

  Raises UnknownConfigKeyError naming a mistyped key.
  """
  argv = ['load_config', f'--config={spec}', *overrides]
  flag_values = flags.FlagValues()
  holder = define_config_flag(flag_values, sys_argv=argv)
  _parse(flag_values, argv)
  return holder.value
