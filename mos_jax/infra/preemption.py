"""SIGTERM (preemption, SLURM's time limit) and SIGINT (Ctrl-C): finish the step, save, stop.

The training loop asks `stop.at(step)` after every step. With one process the answer is whether
a signal has arrived. With several, every host must save the same step: SIGTERM goes to jax's
preemption service (installed by `jax.distributed.initialize`), which agrees on the step through
the coordinator (`multihost_utils.reached_preemption_sync_point`, called every step by every
host); a Ctrl-C on one host is passed to that service as a SIGTERM to itself. A second Ctrl-C
aborts at once (KeyboardInterrupt). Exit codes: 0 after SIGTERM (what SLURM requeue and Cloud TPU
expect), 130 after SIGINT.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import jax
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


class StopSignals:
  """Installs the handlers on `install()` (main thread only); `restore()` puts the old ones back."""

  def __init__(self):
    self.signal: int | None = None  # The first signal received.
    self._previous: dict[int, object] = {}
    self._multi = False

  @property
  def exit_code(self) -> int:
    return 130 if self.signal == signal.SIGINT else 0

  @property
  def name(self) -> str:
    return 'Ctrl-C (SIGINT)' if self.signal == signal.SIGINT else 'SIGTERM'

  def install(self) -> 'StopSignals':
    if threading.current_thread() is not threading.main_thread():
      return self  # Signals reach the main thread only; a run in a thread is stopped otherwise.
    # Several processes agree on the stop step through jax's preemption service (on by default).
    self._multi = jax.process_count() > 1 and bool(
        getattr(jax.config, 'jax_enable_preemption_service', True))
    wanted = [signal.SIGINT] if self._multi else [signal.SIGINT, signal.SIGTERM]
    for sig in wanted:  # Multi-process SIGTERM stays with jax's preemption notifier.
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if self.signal == signal.SIGINT and signum == signal.SIGINT:
      raise KeyboardInterrupt  # The second Ctrl-C: abort now.
    if self.signal is None:
      self.signal = signum
      log.info('Received signal %d; stopping after the current step.', signum)
      if self._multi and signum == signal.SIGINT:
        os.kill(os.getpid(), signal.SIGTERM)  # Let the coordinator agree on the stop step.

  def at(self, step: int) -> bool:
    """True when the run should save `step` and stop (the same answer on every host)."""
    if self._multi:
      if multihost_utils.reached_preemption_sync_point(step):
        if self.signal is None:
          self.signal = signal.SIGTERM
        return True
      return False
    return self.signal is not None
