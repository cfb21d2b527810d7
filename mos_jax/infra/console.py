"""Where output goes: the program's own lines on the terminal, every library's log in a file.

The terminal gets what the user must read: progress bar, dev-loss lines, the summary, one-paragraph
errors, and WARNING-or-worse records of `mos_jax.*` loggers. Every log record (absl, Orbax, jax,
Grain, transformers, datasets, Python warnings) goes, with a timestamp, to a log file: `train.log`
in the run folder for training, `~/.cache/mos_jax/logs/<command>.log` for other commands (the
folder is `$MOS_LOG_DIR` when set). Records made before the file is known (before the config and
the workdir have been checked) are kept in memory and written once it is, so a refused run writes
nothing into its workdir. `--alsologtostderr` (absl's flag) sends every record to the terminal too.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time

_FORMAT = '%(asctime)s %(levelname).1s %(process)d %(name)s] %(message)s'
_OWN = 'mos_jax'  # Loggers under this name may speak on the terminal (warnings and worse).


class _Deferred(logging.Handler):
  """Writes records to a file once `open` is called; keeps them in memory until then."""

  def __init__(self):
    super().__init__(logging.DEBUG)
    self.setFormatter(logging.Formatter(_FORMAT))
    self.path: str | None = None
    self._buffer: list[logging.LogRecord] = []
    self._file = None

  def open(self, path: str) -> None:
    if self.path == path:
      return
    self.close_file()
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    self._file = open(path, 'a', encoding='utf-8', buffering=1)
    self.path = path
    self._file.write(f'--- {time.strftime("%Y-%m-%d %H:%M:%S")} pid {os.getpid()}: '
                     f'{" ".join(sys.argv)}\n')
    for record in self._buffer:
      self._write(record)
    self._buffer = []

  def _write(self, record):
    try:
      self._file.write(self.format(record) + '\n')
    except Exception:  # pylint: disable=broad-except
      self.handleError(record)

  def emit(self, record):
    if self._file is None:
      self._buffer.append(record)
    else:
      self._write(record)

  def close_file(self):
    if self._file is not None:
      self._file.close()
      self._file = None

  def close(self):
    self.close_file()
    super().close()


class _Terminal(logging.Filter):
  """What the terminal shows: everything when echoing, else warnings and errors of mos_jax itself.

  Records logged with `extra={'terminal': False}` (a traceback the command prints its own way)
  go to the file only.
  """

  def __init__(self, echo: bool):
    super().__init__()
    self.echo = echo

  def filter(self, record):
    if not getattr(record, 'terminal', True):
      return False
    return self.echo or (record.name.split('.')[0] == _OWN and record.levelno >= logging.WARNING)


_file_handler: _Deferred | None = None
_terminal_handler: logging.StreamHandler | None = None
_terminal_fd = 2  # Where the terminal is once native stderr goes to the log file (native_to_log).
_command = 'mos_jax'
_follow_workdir = False  # Whether `log_to` (a training run's own log file) is honoured.


def default_log_path(command: str) -> str:
  folder = os.environ.get('MOS_LOG_DIR') or os.path.join(
      os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'mos_jax', 'logs')
  return os.path.join(folder, f'{command}.log')


def _quiet_library_handlers():
  """Removes the terminal handlers libraries attach to their own loggers; records propagate to
  the root logger (and so to the log file) instead."""
  for name, logger in list(logging.Logger.manager.loggerDict.items()):
    if not isinstance(logger, logging.Logger) or name.split('.')[0] == _OWN:
      continue
    for handler in list(logger.handlers):
      if type(handler) is logging.StreamHandler:  # pylint: disable=unidiomatic-typecheck
        logger.removeHandler(handler)
    logger.propagate = True


def setup(command: str, echo: bool = False, debug: bool = False,
          log_in_workdir: bool = False) -> None:
  """Routes logging for `command`; `echo` also shows every record on the terminal.

  `log_in_workdir`: the command's run writes its log into its workdir (`log_to`); otherwise
  (commands that start training runs of their own, like bench) the default file keeps it.
  """
  global _file_handler, _command, _follow_workdir
  _command, _follow_workdir = command, log_in_workdir
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')  # XLA's C++ INFO lines; warnings stay.
  root = logging.getLogger()
  for handler in list(root.handlers):
    root.removeHandler(handler)
  if _file_handler is not None:
    _file_handler.close()
  _file_handler = _Deferred()
  root.addHandler(_file_handler)
  global _terminal_handler
  terminal = _terminal_handler = logging.StreamHandler(sys.stderr)
  terminal.setFormatter(logging.Formatter(_FORMAT if echo else '%(levelname)s: %(message)s'))
  terminal.addFilter(_Terminal(echo))
  root.addHandler(terminal)
  level = logging.DEBUG if debug else logging.INFO
  root.setLevel(level)
  for name in ('absl', 'transformers', 'datasets', 'huggingface_hub'):
    logging.getLogger(name).setLevel(level)
  logging.captureWarnings(True)
  _import_libraries_quietly(echo)
  _quiet_library_handlers()


def _import_libraries_quietly(echo: bool) -> None:
  """Imports the libraries' logging set-up now, so that its handlers can be taken off.

  transformers logs at import (without torch: 'PyTorch was not found...') through a stderr
  handler it makes in that same import: what they print meanwhile goes to the log file instead.
  """
  printed = io.StringIO()
  try:
    with contextlib.redirect_stderr(printed):
      import transformers.utils.logging  # pylint: disable=g-import-not-at-top,unused-import
      import datasets  # pylint: disable=g-import-not-at-top
      import huggingface_hub.utils.logging  # pylint: disable=g-import-not-at-top,unused-import
    if not echo:
      datasets.disable_progress_bars()
  except ImportError:
    pass
  # Their handlers hold the buffer as their stream; they are removed next (_quiet_library_handlers).
  for line in printed.getvalue().splitlines():
    if line.strip():
      logging.getLogger('mos_jax.infra.console').info('(library import) %s', line,
                                                      extra={'terminal': echo})


def say(text: str) -> None:
  """A line for the user: on the terminal (stdout), and in the log file."""
  print(text, flush=True)
  logging.getLogger('mos_jax.infra.console').info(text, extra={'terminal': False})


def log_to(path: str) -> None:
  """Starts writing the log file at `path` (with what was logged so far)."""
  if _file_handler is not None:
    _quiet_library_handlers()  # Libraries imported since set-up.
    if _follow_workdir:
      _file_handler.open(path)


def log_path() -> str:
  """The log file: the one opened by `log_to`, else the command's default (opened now)."""
  if _file_handler is None:
    return default_log_path(_command)
  if _file_handler.path is None:
    _file_handler.open(default_log_path(_command))
  return _file_handler.path


def finish() -> None:
  """Writes what is still in memory (to the default log file if none was opened) and closes."""
  if _file_handler is not None and (_file_handler.path is not None or _file_handler._buffer):  # pylint: disable=protected-access
    log_path()
    _file_handler.close_file()


def native_to_log() -> None:
  """Sends what native code writes to stderr (XLA's C++ logs, fatal errors, Gloo) to the log file;
  the program's own stderr stays on the terminal. For multi-host runs, whose survivors of a lost
  host would otherwise show jax's fatal error and stack trace before their one paragraph."""
  global _terminal_fd
  if _file_handler is None or _file_handler.path is None or _terminal_fd != 2 or (
      _terminal_handler is not None and _terminal_handler.filters[0].echo):
    return
  sys.stderr.flush()
  _terminal_fd = os.dup(2)
  terminal = os.fdopen(_terminal_fd, 'w', buffering=1, closefd=False)
  if _terminal_handler is not None:
    _terminal_handler.setStream(terminal)
  sys.stderr = terminal
  log_fd = os.open(_file_handler.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
  os.dup2(log_fd, 2)
  os.close(log_fd)


@contextlib.contextmanager
def native_quiet():
  """Within: native stderr goes to the log file (the command's, the run's is not known yet), so
  that a multi-host start-up that fails shows its one paragraph (`emergency`), not jax's fatal
  error and stack trace before it. Does nothing when native stderr already goes there or logs
  are echoed (--alsologtostderr)."""
  global _terminal_fd
  if _file_handler is None or _terminal_fd != 2 or (
      _terminal_handler is not None and _terminal_handler.filters[0].echo):
    yield
    return
  sys.stderr.flush()
  _terminal_fd = os.dup(2)
  log_fd = os.open(log_path(), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
  os.dup2(log_fd, 2)
  os.close(log_fd)
  try:
    yield
  finally:
    os.dup2(_terminal_fd, 2)
    os.close(_terminal_fd)
    _terminal_fd = 2


def emergency(text: str) -> None:
  """The paragraph of a process about to `os._exit`: on the terminal as `error: ...` and in the
  log file, written without the locks of logging and sys.stderr (a stuck thread may hold them)."""
  os.write(_terminal_fd, f'error: {text}\n'.encode())
  if _file_handler is not None:
    path = log_path()  # Before the run's own log is known: the command's, with what was kept.
    with open(path, 'a', encoding='utf-8') as f:
      f.write(f'{time.strftime("%Y-%m-%d %H:%M:%S")} E {os.getpid()} mos_jax] {text}\n')


def log_exception(message: str, exc: BaseException) -> None:
  """`message` and the traceback of `exc`, in the log file only."""
  logging.getLogger('mos_jax.infra.console').info(
      message, exc_info=(type(exc), exc, exc.__traceback__), extra={'terminal': False})
