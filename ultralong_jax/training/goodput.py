"""Where a run's wall time went, and its goodput: productive step time over wall time.

One account per invocation of `loop.run`, from its start to its summary.json:

  startup_s           validation, pre-flight, mesh/model/pipeline build, the initial parameters
  restore_s           reading the checkpoint a resumed run starts from
  compile_s           the invocation's first step: tracing and XLA compilation (plus that step)
  productive_step_s   steps never computed before
  recomputed_step_s   steps a restart computes again: those after the checkpoint it resumed from
                      up to the previous invocation's last logged step (metrics.jsonl)
  checkpoint_s        time the loop was blocked saving (async writes overlap steps and do not
                      count; waiting for one, a synchronous write and retry backoffs do)
  data_wait_s         time the loop waited for the next batch
  export_s            final/, hf/ and the loss plot at the end of a complete run
  other_s             the rest of the wall time (metrics lines, the progress bar, shutdown)
  goodput             productive_step_s / wall_s

A step's time is the wall time of its loop iteration less the data wait and checkpoint time
inside it: dispatch is asynchronous, so an iteration absorbs the device time of whatever step
the host waits for in it; over a run the sums are exact, the split between steps is not.
Recomputed steps are found from logged rows: with train.log_every > 1 the steps after the
previous invocation's last row count as productive.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any

CATEGORIES = ("startup", "restore", "compile", "productive_step", "recomputed_step", "checkpoint",
              "data_wait", "export")


class TimeAccount:
  """Seconds by category (CATEGORIES) and step counts of one invocation."""

  def __init__(self):
    self._start = time.perf_counter()
    self.seconds = dict.fromkeys(CATEGORIES, 0.0)
    self.steps = {"productive": 0, "recomputed": 0}
    self.replay_until = 0  # steps <= this were computed (and logged) by an earlier invocation
    self._lap_start: float | None = None
    self._lap_charged = 0.0
    self._laps = 0

  @contextlib.contextmanager
  def timed(self, category: str):
    start = time.perf_counter()
    try:
      yield
    finally:
      self.seconds[category] += time.perf_counter() - start

  def start_steps(self) -> None:
    """Marks the start of the first step's iteration."""
    self._lap_start, self._lap_charged = time.perf_counter(), sum(self.seconds.values())

  def step_done(self, step: int) -> None:
    """Charges the iteration that ended with `step` (less what `timed` charged inside it)."""
    now, charged = time.perf_counter(), sum(self.seconds.values())
    spent = (now - self._lap_start) - (charged - self._lap_charged)
    kind = "recomputed" if step <= self.replay_until else "productive"
    self.steps[kind] += 1
    self.seconds["compile" if self._laps == 0 else f"{kind}_step"] += spent
    self._laps += 1
    self._lap_start, self._lap_charged = now, sum(self.seconds.values())

  def summary(self) -> dict[str, Any]:
    """The account as JSON-able numbers (summary.json's "time")."""
    wall = time.perf_counter() - self._start
    out = {"wall_s": wall, **{f"{k}_s": v for k, v in self.seconds.items()}}
    out["other_s"] = max(0.0, wall - sum(self.seconds.values()))
    out["productive_steps"] = self.steps["productive"]
    out["recomputed_steps"] = self.steps["recomputed"]
    out["goodput"] = self.seconds["productive_step"] / wall if wall > 0 else 0.0
    return out


def last_logged_step(metrics_path: str) -> int:
  """The highest step in a run's metrics.jsonl (0 when there is none): how far earlier
  invocations got, whatever their checkpoints say."""
  if not os.path.exists(metrics_path):
    return 0
  last = 0
  with open(metrics_path) as f:
    for line in f:
      try:
        last = max(last, int(json.loads(line)["step"]))
      except (ValueError, KeyError, TypeError):  # a line cut short by a kill
        continue
  return last


def write_tensorboard(workdir: str, step: int, account: dict[str, Any]) -> None:
  """The account as `time/*` scalars at `step` in workdir/tensorboard (next to the training
  curves; one point per invocation). No-op without tensorboardX."""
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
  except ImportError:
    return
  writer = SummaryWriter(os.path.join(workdir, "tensorboard"), filename_suffix=".time")
  try:
    for key, value in account.items():
      writer.add_scalar(f"time/{key}", value, step)
  finally:
    writer.close()
