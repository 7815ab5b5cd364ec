"""Hang watchdog: a run whose steps stop completing dies loudly instead of waiting forever.

A host stuck in a collective (a dead peer, a wedged NCCL/ICI link) blocks every other host at
their next collective, and the job holds its accelerators doing nothing until the scheduler's
time limit. The watchdog is a daemon thread; the loop calls `beat(step)` after every step. If
no beat comes within the timeout, it writes, to stderr, one line naming the step, the host, the
process and its devices, then every thread's Python stack, and ends the process with
HANG_EXIT_CODE, so that the launcher restarts the job from its last checkpoint (docs/launch.md).

The timeout is train.hang_timeout_s when set, else AUTO_MULTIPLE x the median of recent step
times, at least AUTO_FLOOR_S. Until the first step completes (build, restore, compile) and
around a checkpoint write, the allowance is train.hang_startup_s instead (at least the timeout).
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import statistics
import sys
import threading
import time
import traceback

# EX_TEMPFAIL (sysexits.h): a temporary failure, to be retried; launchers restart on it.
HANG_EXIT_CODE = 75
AUTO_MULTIPLE = 10.0
AUTO_FLOOR_S = 600.0
_RECENT = 32  # step times the automatic timeout takes the median of


class Watchdog:
  """`with Watchdog(timeout_s, startup_s, where) as dog: ... dog.beat(step) ...`"""

  def __init__(self, timeout_s: float, startup_s: float, where: str):
    """timeout_s: 0 = automatic; startup_s: the allowance before the first step and around
    checkpoint writes; where: host / process / devices, for the report."""
    self._fixed = timeout_s
    self._startup = max(startup_s, timeout_s)
    self._where = where
    self._step = None
    self._recent = collections.deque(maxlen=_RECENT)
    self._last_beat = time.monotonic()
    self._deadline = self._last_beat + self._startup
    self._allowance = self._startup
    self._lock = threading.Lock()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)

  def __enter__(self) -> "Watchdog":
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    self._thread.join()

  def timeout(self) -> float:
    """Seconds a step may take before the watchdog fires."""
    if self._fixed > 0:
      return self._fixed
    if not self._recent:
      return self._startup
    return max(AUTO_FLOOR_S, AUTO_MULTIPLE * statistics.median(self._recent))

  def beat(self, step: int, *, step_time: bool = True) -> None:
    """`step` completed (step_time=False: the time since the last beat was not a step's, e.g. a
    checkpoint write's, and is not used for the automatic timeout)."""
    now = time.monotonic()
    with self._lock:
      if self._step is not None and step_time:  # the first step's time is its compile
        self._recent.append(now - self._last_beat)
      self._step, self._last_beat = step, now
      self._allowance = self.timeout()
      self._deadline = now + self._allowance

  def slow_section(self) -> None:
    """The next beat may take the startup allowance (a checkpoint write, a final wait)."""
    with self._lock:
      self._allowance = max(self._startup, self.timeout())
      self._deadline = time.monotonic() + self._allowance

  def _watch(self) -> None:
    while not self._stop.wait(min(1.0, max(0.05, self._allowance / 20))):
      with self._lock:
        late = time.monotonic() > self._deadline
        allowance, step = self._allowance, self._step
      if late:
        self._fire(allowance, step)

  def _fire(self, allowance: float, step: int | None) -> None:
    done = "no step completed yet" if step is None else f"the last completed step is {step}"
    lines = [f"hang watchdog: nothing completed for {allowance:.0f} s (train.hang_timeout_s / "
             f"train.hang_startup_s); {done}; {self._where}. Exiting with {HANG_EXIT_CODE} so the "
             "launcher restarts the run from its last checkpoint. Stacks of all threads:"]
    frames = sys._current_frames()  # pylint: disable=protected-access
    for thread in threading.enumerate():
      frame = frames.get(thread.ident)
      if frame is None or thread is threading.current_thread():
        continue
      daemon = ", daemon" if thread.daemon else ""
      lines.append(f'--- thread "{thread.name}" (id {thread.ident}{daemon})')
      lines.extend(line.rstrip("\n") for line in traceback.format_stack(frame))
    report = "\n".join(lines)
    logging.error("hang watchdog fired at step %s; see the stacks on stderr", step)
    try:
      sys.stderr.write(report + "\n")
      sys.stderr.flush()
    finally:
      os._exit(HANG_EXIT_CODE)  # pylint: disable=protected-access  # the main thread is stuck


def describe_process() -> str:
  """"host H, process i of n, devices [...]" for the watchdog's report (computed up front: a hung
  runtime may not answer later)."""
  import jax  # pylint: disable=import-outside-toplevel
  devices = ", ".join(str(d) for d in jax.local_devices())
  return (f"host {socket.gethostname()}, process {jax.process_index()} of {jax.process_count()}, "
          f"devices [{devices}]")
