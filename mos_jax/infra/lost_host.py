"""A host lost from a multi-host run: one paragraph and exit code 75 (EX_TEMPFAIL), not a crash.

When a process of a multi-host run dies (a lost TPU VM, a rebooted node, the OOM killer), jax's
coordination service notices within `distributed.heartbeat_timeout_s` and ends every other
process with a native fatal error (SIGABRT, exit 134, a C++ stack trace); when the coordinator
(process 0) dies, the others end that way at once. A peer that never joins ends start-up the same
way after `distributed.initialization_timeout_s`. jax 0.10.2 has no hook for it:
`jax.distributed.initialize` takes no callback, and its runtime client's
`missed_heartbeat_callback` cannot call Python (std::bad_cast). So a C-level SIGABRT handler
(`_on_abort`, installed by `joining` and `watch`) decides whether the abort is a lost host:

- a peer whose beat stopped: every process bumps a counter in the coordination service's
  key-value store (`_beat`, a daemon thread) and notes when each peer's counter last moved;
- the coordinator not answering a TCP connection any more (or never, at start-up).

Then it writes one paragraph (terminal and log file) and leaves through `os._exit(EXIT_CODE)`:
jax's atexit shutdown would wait for the dead host and abort. Any other abort is left alone.
A main-thread error caused by the same loss (a collective whose peer closed its connection)
comes first: `settle(exc)` waits for the verdict instead of printing a traceback.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import threading
import time
from typing import Callable

from mos_jax.infra import console

EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): a temporary failure; restart the job to resume.
_KEY = 'mos_jax/alive/'
_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_int)


class _Watch:
  """What the abort handler knows: who we are, the peers' beats, the step, the checkpoints."""

  def __init__(self, process_id: int, num_processes: int, coordinator: str):
    self.process_id, self.num_processes, self.coordinator = process_id, num_processes, coordinator
    self.phase = 'joining'  # Then 'running'.
    self.timeout_s, self.joined_dir = 0.0, None  # Init timeout; folder of the join notes.
    self.heartbeat_s, self.interval_s = 0.0, 1.0
    self.seen: dict[int, tuple[str, float]] = {}  # Peer -> (its counter, when it last moved).
    self.step: int | None = None  # The step running now (None before the loop).
    self.checkpoints: Callable[[], str] | None = None  # 'the last checkpoint is step M in DIR'.
    self.verdict = threading.Event()


_watch: _Watch | None = None
_installed = None  # The ctypes handler (kept alive while installed).


def joining(process_id: int, num_processes: int, coordinator: str, timeout_s: float,
            joined_dir: str | None = None) -> None:
  """Call before `jax.distributed.initialize`: a start-up that times out ends with a paragraph.

  `joined_dir` (a folder every host sees) gets a note per process that started, so that the
  paragraph can name the processes that never did.
  """
  global _watch
  _watch = _Watch(process_id, num_processes, coordinator)
  _watch.timeout_s, _watch.joined_dir = timeout_s, joined_dir
  if joined_dir:
    os.makedirs(joined_dir, exist_ok=True)
    with open(os.path.join(joined_dir, f'process_{process_id}'), 'w') as f:
      f.write(f'{socket.gethostname()} pid {os.getpid()}\n')
  _install()


def watch(client, heartbeat_s: float) -> None:
  """Call after `jax.distributed.initialize` succeeded: starts the beat, keeps the handler."""
  if _watch is None:
    return
  _watch.phase, _watch.heartbeat_s = 'running', heartbeat_s
  _watch.interval_s = min(10.0, max(0.2, heartbeat_s / 5))
  if _watch.joined_dir:  # Everyone joined: the notes have served.
    try:
      os.remove(os.path.join(_watch.joined_dir, f'process_{_watch.process_id}'))
      os.rmdir(_watch.joined_dir)
    except OSError:
      pass  # Another process's note is still there, or it was removed already.
  threading.Thread(target=_beat, args=(client, _watch), daemon=True, name='lost_host').start()


def at_step(step: int | None) -> None:
  """The training loop says which step runs now."""
  if _watch is not None:
    _watch.step = step


def describe_checkpoints(describe: Callable[[], str] | None) -> None:
  """`describe()` says where a restart resumes from, e.g. 'the last checkpoint is step 20 in D'."""
  if _watch is not None:
    _watch.checkpoints = describe


def _beat(client, w: _Watch) -> None:
  count = 0
  while True:
    count += 1
    try:
      client.key_value_set(f'{_KEY}{w.process_id}', str(count), allow_overwrite=True)
      now = time.monotonic()
      for key, value in client.key_value_dir_get(_KEY):
        peer = int(key.rsplit('/', 1)[1])
        if w.seen.get(peer, ('',))[0] != value:
          w.seen[peer] = (value, now)
    except Exception:  # pylint: disable=broad-except
      pass  # The coordinator is gone or busy; the beats stop moving, which is what counts.
    time.sleep(w.interval_s)


def _answers(address: str, timeout_s: float = 2.0) -> bool:
  host, port = address.rsplit(':', 1)
  try:
    with socket.create_connection((host.strip('[]'), int(port)), timeout=timeout_s):
      return True
  except OSError:
    return False


def _lost(w: _Watch, by_jax: bool) -> tuple[list[int], str]:
  """(the processes lost, why) from what this process saw; ([], '') when none is. `by_jax`: jax's
  heartbeat timed out (else a collective failed, and silent peers are the lost ones)."""
  now = time.monotonic()
  stale_after = min(w.heartbeat_s / 2, max(2 * w.interval_s, 1.0))
  silent = {p: now - moved for p, (_, moved) in w.seen.items()
            if p != w.process_id and now - moved > stale_after}
  if silent:
    return sorted(silent), (f'heartbeat timeout after {w.heartbeat_s:g} s' if by_jax else
                            f'no heartbeat for {max(silent.values()):.0f} s, and a collective '
                            f'with it failed')
  if w.process_id != 0 and not _answers(w.coordinator):
    return [0], f'the coordinator at {w.coordinator} closed its connection'
  return [], ''


def paragraph(by_jax: bool = True) -> str | None:
  """The paragraph for what this process sees now, or None when no host is lost."""
  w = _watch
  if w is None:
    return None
  if w.phase == 'joining':
    return _join_paragraph(w)
  lost, why = _lost(w, by_jax)
  if not lost:
    return None
  hosts = 'host' + ('s ' if len(lost) > 1 else ' ') + ', '.join(map(str, lost))
  where = f'at step {w.step}' if w.step is not None else 'before training started'
  try:
    saved = w.checkpoints() if w.checkpoints else 'no checkpoint was written yet'
  except Exception:  # pylint: disable=broad-except
    saved = 'the checkpoints folder could not be read'
  return (f'{hosts} of {w.num_processes} stopped answering ({why}) {where}; {saved}. '
          f'Restart the job (any host count) to resume.')


def _join_paragraph(w: _Watch) -> str:
  head = (f'process {w.process_id} of {w.num_processes} could not join the coordinator at '
          f'{w.coordinator} within {w.timeout_s:g} s (distributed.initialization_timeout_s)')
  if w.process_id != 0 and not _answers(w.coordinator):
    return (f'{head}: nothing answers there, so process 0 did not start or the address is '
            f'wrong. Check the coordinator address every process uses and restart the job.')
  started = set()
  if w.joined_dir and os.path.isdir(w.joined_dir):
    started = {int(n.split('_')[1]) for n in os.listdir(w.joined_dir) if n.startswith('process_')}
  missing = [p for p in range(w.num_processes) if p not in started]
  who = (f'process ids {missing} did not start' if w.joined_dir and missing else
         'some process could not reach it (check the address every process uses)')
  return f'{head}: {who}. Start every host (or fix the address) and restart the job.'


def _stop(text: str) -> None:
  console.emergency(text)
  os._exit(EXIT_CODE)  # Not sys.exit: jax's atexit shutdown barrier would wait for the lost host.


def _on_abort(signum: int) -> None:
  """SIGABRT (jax's fatal error): a paragraph and EXIT_CODE when a host is lost; else the abort."""
  del signum
  text = paragraph()
  if text is not None:
    _stop(text)
  # Not a lost host: returning lets abort() go on (it restores the default action and re-raises).


def _install() -> None:
  global _installed
  if _installed is None and threading.current_thread() is threading.main_thread():
    libc = ctypes.CDLL(None)
    libc.signal.restype, libc.signal.argtypes = ctypes.c_void_p, [ctypes.c_int, _HANDLER]
    _installed = _HANDLER(_on_abort)
    libc.signal(signal.SIGABRT, _installed)


def explains(exc: BaseException) -> bool:
  """Whether a main-thread error may come from a lost host (a failed collective or barrier)."""
  if _watch is None or _watch.phase != 'running':
    return False
  text = f'{type(exc).__name__} {exc}'
  return 'RuntimeError' in type(exc).__name__ and any(
      s in text for s in ('UNAVAILABLE', 'DEADLINE_EXCEEDED', 'Connection reset', 'closed by peer',
                          'Socket closed', 'heartbeat', 'arrier', 'gloo', 'NCCL', 'task'))


def settle(exc: BaseException) -> None:
  """For a main-thread error that `explains`: waits (up to the heartbeat timeout and a margin)
  until the lost host is known, then stops with the paragraph; returns when none is lost."""
  if not explains(exc):
    return
  console.log_exception('A collective or barrier failed; waiting for the lost host.', exc)
  deadline = time.monotonic() + _watch.heartbeat_s + 10
  while time.monotonic() < deadline:
    text = paragraph(by_jax=False)
    if text is not None:
      _stop(text)
    time.sleep(_watch.interval_s)
