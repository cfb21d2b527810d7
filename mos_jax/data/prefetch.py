"""Training batches prepared and sent to the devices in a background thread, ahead of the step.

The loop asks for step s's batch; a worker thread has already drawn it from the mixture loader,
turned it into global device arrays and queued up to `depth` of them. Two things keep prefetching
from changing any batch:
  - the mixture probabilities change only between steps the loop names (`hold_after(step)`, the
    steps after which the scorer moves): the worker stops after producing such a step's batch and
    goes on only when the loop calls `resume()`, so every batch is drawn with the probabilities an
    inline loader would have used;
  - the loader position saved in a checkpoint is the one after the last batch the loop took, not
    after the last one drawn (`get_state()` here; pass this object to the checkpointer), with the
    loop's own changes at hold steps (reward batches read, new probabilities) included.
With depth 0 the same code runs inline, in the loop's thread.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from typing import Any, Callable

_POLL_S = 0.1  # How often a blocked worker checks whether it should stop.


class Prefetcher:
  """next(step) -> the device batch of `step`; `wait_s` adds up the time the loop waited."""

  def __init__(self, loader, to_device: Callable[[dict], Any], first_step: int, last_step: int,
               depth: int = 2, hold_after: Callable[[int], bool] = lambda step: False):
    self._loader, self._to_device = loader, to_device
    self._hold_after, self._last_step = hold_after, last_step
    self._next_step = first_step  # The step whose batch the producer makes next.
    self._state = loader.get_state()  # Loader position after the last batch taken by the loop.
    self.wait_s = 0.0
    self._depth = depth
    if depth:
      self._queue: queue.Queue = queue.Queue(maxsize=depth)
      self._stop = threading.Event()
      self._go = threading.Event()
      self._go.set()
      self._thread = threading.Thread(target=self._work, name='mos_jax-prefetch', daemon=True)
      self._thread.start()

  def _produce(self):
    step = self._next_step
    batch = self._to_device(next(self._loader))
    self._next_step += 1
    return step, batch, self._loader.get_state()

  def _work(self):
    try:
      while self._next_step <= self._last_step and not self._stop.is_set():
        while not self._go.wait(_POLL_S):
          if self._stop.is_set():
            return
        item = self._produce()
        if self._hold_after(item[0]):
          self._go.clear()  # Wait for the loop's resume() before the next draw.
        self._put(item)
    except Exception as e:  # pylint: disable=broad-except
      self._put(e)  # Raised in the loop's thread by next().

  def _put(self, item):
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=_POLL_S)
        return
      except queue.Full:
        continue

  def next(self, step: int):
    """The batch of `step` (steps are taken in order)."""
    start = time.perf_counter()
    if self._depth:
      item = self._queue.get()
      if isinstance(item, Exception):
        raise item
    else:
      item = self._produce()
    self.wait_s += time.perf_counter() - start
    got, batch, self._state = item
    if got != step:
      raise RuntimeError(f'prefetcher: expected the batch of step {step}, got step {got}')
    return batch

  def resume(self):
    """Lets the worker draw again after a `hold_after` step (call after changing the mixture).

    The worker is paused with nothing queued, so the loader's live position is the loop's: it is
    read again here to include what the loop changed (reward streams, probabilities)."""
    self._state = self._loader.get_state()
    if self._depth:
      self._go.set()

  @property
  def position(self) -> dict:
    """The loader state after the last batch taken (what the metrics report on)."""
    return self._state

  def get_state(self) -> bytes:
    """The loader position after the last batch taken, as the JSON bytes Grain's checkpoint
    handler saves (restore it onto the loader itself)."""
    return json.dumps(self._state, indent=4).encode()

  def close(self):
    if self._depth:
      self._stop.set()
      self._thread.join()
