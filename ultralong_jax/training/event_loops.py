"""Event loops for Orbax's checkpoint reads and writes that close only once their tasks have
ended, so that TensorStore's late callbacks and failed tasks print nothing around the run's own
error line (used by training/checkpointing.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

# How long a failed restore's remaining reads may run on before they are cancelled: reads of a
# local checkpoint end in milliseconds; a large one on an object store may need a while.
_SETTLE_SECONDS = 60.0


class IdleClosingLoop(asyncio.SelectorEventLoop):
  """An event loop that lets the tasks still pending on it end before it closes.

  Orbax runs a restore as one asyncio.gather of TensorStore reads (one per array) on a fresh
  loop, which it closes as soon as the gather returns, pending tasks or not
  (orbax.checkpoint asyncio_utils._run_sync_via_new_loop). When one read fails the gather raises
  at once, with the other reads still in flight in TensorStore's threads; as each completes,
  TensorStore's done-callback calls loop.call_soon_threadsafe on the closed loop and reports the
  `RuntimeError: Event loop is closed` through sys.unraisablehook, i.e. a traceback on stderr per
  array, from a thread, at any moment, even in the middle of the run's own error line. Here
  those tasks run to their end first, so every TensorStore callback lands on an open loop; past
  _SETTLE_SECONDS they are cancelled (asyncio.run's own teardown; a cancelled TensorStore future
  runs its callback at once, on this thread).

  A failed write or read also leaves tasks that ended with the same error after the gather that
  reported it had returned; nobody retrieves their exceptions, and when they are garbage-collected
  (any time later, e.g. after the run's own error line) asyncio would log a traceback for each.
  The failure they share is reported by the checkpointer, so here they are one debug line.
  """

  def __init__(self):
    super().__init__()
    self.set_exception_handler(_quiet_unretrieved)

  def close(self) -> None:
    if not self.is_closed() and not self.is_running() and not _loop_running_here():
      pending = asyncio.all_tasks(self)
      if pending:
        try:
          self.run_until_complete(asyncio.wait_for(
              asyncio.gather(*pending, return_exceptions=True), _SETTLE_SECONDS))
        except TimeoutError:
          logging.warning("a failed checkpoint read still ran after %.0f s; cancelled it",
                          _SETTLE_SECONDS)
    super().close()


def _quiet_unretrieved(loop: asyncio.AbstractEventLoop, context: dict) -> None:
  if context.get("message", "").startswith("Task exception was never retrieved"):
    logging.debug("a checkpoint task also failed: %s",
                  str(context.get("exception")).strip().split("\n")[0][:300])
  else:
    loop.default_exception_handler(context)


class IdleClosingPolicy(asyncio.DefaultEventLoopPolicy):

  def new_event_loop(self) -> asyncio.AbstractEventLoop:
    return IdleClosingLoop()


def _loop_running_here() -> bool:
  try:
    asyncio.get_running_loop()
  except RuntimeError:
    return False
  return True


@contextlib.contextmanager
def loops_closed_when_idle():
  """Event loops created inside (Orbax creates one per restore) close only once idle."""
  previous = asyncio.get_event_loop_policy()
  asyncio.set_event_loop_policy(IdleClosingPolicy())
  try:
    yield
  finally:
    asyncio.set_event_loop_policy(previous)
