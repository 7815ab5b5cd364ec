"""Orbax checkpoints of a run: train state + Grain iterator state + config, in one step directory.

  workdir/checkpoints/<step>/state      params, optimizer state, step (sharded arrays)
  workdir/checkpoints/<step>/data_iter  the Grain iterator's state, one JSON per process
  workdir/checkpoints/<step>/config     the run's config (JSON)

Orbax writes each step into a temporary directory (`<step>.orbax-checkpoint-tmp-*`) and renames
it when complete, so `latest_step` never returns a partial checkpoint (a SIGKILL mid-write leaves
only the tmp directory, which Orbax ignores and cleans up). Restores take abstract arrays carrying
the *current* mesh's shardings, so a run may resume on a different mesh shape.

A complete but damaged checkpoint (a truncated file, a bad disk) fails to restore: `restore_latest`
raises CorruptCheckpointError naming the step directory, or, when asked to fall back, moves it to
`checkpoints_corrupt/` and resumes from the newest older step that restores. Either way the
failed restore's reads are finished before the error is reported (`event_loops.loops_closed_when_idle`), so
nothing prints after it from a background thread.

A write that fails (a full disk or bucket quota, a lost permission) is retried `retries` times,
each time with the step at hand, after a backoff that doubles; past that the run stops with
CheckpointWriteError naming the directory and the error. A failed write is never renamed into
place, so the newest complete checkpoint stays the one a restart restores. An async write fails
in Orbax's background thread: `save` looks for that at every step boundary (without waiting for
a write still in flight) and raises or retries there, one step after the failure at most.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import importlib.util
import logging
import os
import re
import shutil
import time
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from ultralong_jax.training import event_loops
from ultralong_jax.training.run_config import CheckpointConfig


class CorruptCheckpointError(ValueError):
  """A checkpoint directory that exists and is complete but cannot be restored."""


class CheckpointWriteError(ValueError):
  """A checkpoint write failed, and kept failing after checkpoint.retries attempts."""


class RunCheckpointer:
  """Saves every `every_steps` (and when forced), keeps the newest `keep`, async by default."""

  def __init__(self, workdir: str, config: CheckpointConfig, *, directory: str | None = None):
    """Checkpoints go to `directory` (a path, or a gs:// / s3:// URL Orbax writes through
    TensorStore and etils.epath) or by default to workdir/checkpoints, every
    checkpoint.every_steps, the newest checkpoint.keep kept. A failed write is retried
    checkpoint.retries times, after retry_backoff_s, 2 x retry_backoff_s, ... seconds."""
    every_steps, async_save = config.every_steps, config.async_save
    if directory is None:
      directory = os.path.join(workdir, "checkpoints")
    check_directory(directory)
    self.directory = directory if is_url(directory) else os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(every_steps, 1) if every_steps else 10**12,
        max_to_keep=config.keep, enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=("state", "data_iter", "config"),
        item_handlers={"state": _reporting(ocp.StandardCheckpointHandler()),
                       "data_iter": _reporting(grain.checkpoint.CheckpointHandler()),
                       "config": ocp.JsonCheckpointHandler()},
        options=options)
    self.retries, self.backoff_s, self._async = config.retries, config.retry_backoff_s, async_save
    # A failed write ends its background event loop the way a failed restore does (see
    # event_loops.IdleClosingLoop); for the checkpointer's life every new loop lets its tasks end first.
    self._previous_policy = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(event_loops.IdleClosingPolicy())
    self._in_flight: int | None = None  # the step of an async write not yet known complete
    self._failures = 0  # failed writes since the last one that completed

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iter, config: ml_collections.ConfigDict, *,
           force: bool = False) -> bool:
    """Starts a save when the interval says so (or `force`); returns whether one started.

    Call at every step boundary: it is also where the failure of an earlier async write is
    found (without blocking on a write still in flight) and answered with a retry of this step.
    Raises CheckpointWriteError once `retries` retries have failed too.
    """
    # With several processes the hosts may see the background write end at different steps, and
    # a retry on some of them only would leave the others waiting in its collectives: there the
    # failure is found at the next interval save instead, inside manager.save, on every host.
    if (self._in_flight is not None and jax.process_count() == 1
        and not self.manager.is_saving_in_progress()):
      force |= not self._settle()  # the background write ended; failed: retry with this step
    while True:
      try:
        started = self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data_iter=grain.checkpoint.CheckpointSave(data_iter),
            config=ocp.args.JsonSave(config.to_dict())), force=force)
      except Exception as e:  # pylint: disable=broad-except  # TensorStore/OS/etils all differ
        # manager.save first waits for the previous async write: its error surfaces here too.
        self._failed(self._in_flight if self._in_flight is not None else step, e)
        self._in_flight, force = None, True
        continue
      if started and self._async:
        self._in_flight = step
      elif started:  # a synchronous write is complete on return
        self._in_flight, self._failures = None, 0
      return started

  def _settle(self) -> bool:
    """Whether the async write in flight completed; on a failure, counts and logs it (raising
    CheckpointWriteError once there were too many). Blocks until that write has ended."""
    step = self._in_flight
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._in_flight = None
      self._failed(step, e)
      return False
    self._in_flight, self._failures = None, 0
    return True

  def _failed(self, step: int, error: Exception) -> None:
    self._failures += 1
    where = os.path.join(self.directory, str(step))
    newest = self.manager.latest_step()
    if self._failures > self.retries:
      raise CheckpointWriteError(
          f"checkpoint write to {self.directory} failed {self._failures} times in a row; the "
          f"last, step {step}: {_short(error)}. The newest complete checkpoint is "
          f"{'step ' + str(newest) if newest is not None else 'none'}; free space or fix the "
          "permissions there, then run the same command again to resume (checkpoint.retries="
          f"{self.retries}).") from error
    delay = self.backoff_s * 2 ** (self._failures - 1)
    logging.warning("checkpoint write %s failed (%s); retry %d of %d in %.1f s, with the step "
                    "at hand", where, _short(error), self._failures, self.retries, delay)
    self._backoff(delay)

  def _backoff(self, seconds: float) -> None:
    time.sleep(seconds)

  def finish(self, step: int, state: Any, data_iter, config: ml_collections.ConfigDict) -> None:
    """Waits for the last write of the run; if it failed, writes `step` again (retries) until
    one completes or CheckpointWriteError is raised."""
    while self._in_flight is not None and not self._settle():
      self.save(step, state, data_iter, config, force=True)

  def restore(self, step: int, abstract_state: Any, data_iter) -> Any:
    """Restores `step` into arrays shaped/sharded like `abstract_state`; the Grain iterator is
    restored in place. Returns the state.

    With several processes, each reads its own shards and iterator file, so a damaged file can
    fail the restore on some processes only. Every process then raises (the error names the
    processes that failed), never only those: the others would go on with this step's state
    while the failed ones tried an older step (`_agree`).
    """
    with event_loops.loops_closed_when_idle():
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data_iter=grain.checkpoint.CheckpointRestore(data_iter)))
    failed = next((r.error for r in restored.values() if isinstance(r, _Failed)), None)
    _agree(failed, os.path.join(self.directory, str(step)))
    return restored["state"]

  def restore_latest(self, abstract_state: Any, data_iter, *,
                     fallback: bool) -> tuple[int | None, Any]:
    """(step, state) of the newest checkpoint that restores; (None, None) when there is none.

    A newer checkpoint that fails is moved aside only once an older one restores: if every step
    fails, the cause is more likely the config (a changed model shape) than the disk, and nothing
    is moved.
    """
    failed = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        state = self.restore(step, abstract_state, data_iter)
      except Exception as e:  # pylint: disable=broad-except  # tensorstore/json/grain all differ
        failed.append((step, e))
        path = os.path.join(self.directory, str(step))
        if not fallback:
          raise CorruptCheckpointError(
              f"checkpoint {path} could not be restored ({_short(e)}); set "
              "checkpoint.fallback_on_corrupt=True to move it aside and resume from the previous "
              "checkpoint, or delete that directory.") from e
        logging.warning("checkpoint %s could not be restored (%s); trying an older one", path, e)
        continue
      for bad, _ in failed:
        self._quarantine(bad)
      return step, state
    if failed:
      step, e = failed[0]
      raise CorruptCheckpointError(
          f"no checkpoint in {self.directory} could be restored; the newest, step {step}, failed "
          f"with {_short(e)}. Does the config match the run that wrote them?") from e
    return None, None

  def _quarantine(self, step: int) -> None:
    """Moves a damaged step out of Orbax's sight, so a new save of that step can succeed and the
    bytes stay available for a post-mortem."""
    if jax.process_index() == 0:
      if is_url(self.directory):  # object stores: etils.epath (no shutil there)
        source = epath.Path(self.directory) / str(step)
        target = epath.Path(self.directory).parent / "checkpoints_corrupt" / str(step)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
          target.rmtree()
        source.rename(target)
      else:
        target = os.path.join(os.path.dirname(self.directory), "checkpoints_corrupt", str(step))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.exists(target):
          shutil.rmtree(target)
        shutil.move(os.path.join(self.directory, str(step)), target)
      logging.warning("moved the unreadable checkpoint of step %d to %s", step, target)
    if jax.process_count() > 1:  # the others list the steps again only once it has moved
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices(f"ultralong_jax: checkpoint {step} quarantined")
    self.manager.reload()

  def wait(self) -> None:
    """Blocks until the write in flight has ended (a failure counts as in `save`)."""
    if self._in_flight is not None:
      self._settle()
    self.manager.wait_until_finished()

  def close(self) -> None:
    """Ends the checkpointer; a write failure not reported by `save`/`finish` (the run stopped
    on another error) is logged, so that it does not replace that error."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      logging.error("checkpoint write in %s failed: %s", self.directory, _short(e))
    try:  # close waits on the background writer again, which can re-raise a failure
      self.manager.close()
    except Exception as e:  # pylint: disable=broad-except
      logging.error("checkpoint write in %s failed: %s", self.directory, _short(e))
    finally:
      asyncio.set_event_loop_policy(self._previous_policy)


@dataclasses.dataclass(frozen=True)
class _Failed:
  """What an item's restore returned instead of raising (see `_reporting`)."""
  error: Exception


def _reporting(handler):
  """`handler` (Orbax's or Grain's, registered by class, so patched per instance) with a failed
  restore returned as `_Failed` instead of raised: Orbax ends every restore with a barrier across
  processes, which a process that raised before it would never reach (the others would wait
  there until its timeout). Past the barrier, all processes compare their outcomes (`_agree`)."""
  restore = handler.restore

  def reporting_restore(*args, **kwargs):
    try:
      return restore(*args, **kwargs)
    except Exception as e:  # pylint: disable=broad-except  # re-raised by _agree on every process
      return _Failed(e)

  handler.restore = reporting_restore
  return handler


def _agree(error: Exception | None, where: str) -> None:
  """Raises on every process when the restore of `where` failed on any: this process's own
  error, or one naming the processes that failed."""
  failed = _processes_that_failed(error is not None) if jax.process_count() > 1 else []
  if error is not None:
    raise error
  if failed:
    raise CorruptCheckpointError(f"process(es) {failed} could not restore {where} (their logs "
                                 "have the error); this process could")


def _processes_that_failed(failed_here: bool) -> list[int]:
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  flags = multihost_utils.process_allgather(np.array([int(failed_here)], np.int32))
  return [i for i, f in enumerate(np.asarray(flags).reshape(-1)) if f]


def is_url(path: str) -> bool:
  return "://" in str(path)


# URL scheme -> the package etils.epath needs for it (TensorFlow's gfile also serves gs://).
_URL_PACKAGES = {"gs": ("gcsfs", "tensorflow"), "s3": ("s3fs",)}


def check_directory(directory: str) -> None:
  """Fails before the run starts when a checkpoint URL cannot be written: an unknown scheme, or
  the filesystem package etils.epath needs for it is missing (Orbax would fail at the first
  save, after the compile)."""
  if not is_url(directory):
    return
  scheme = str(directory).split("://", 1)[0]
  if scheme not in _URL_PACKAGES:
    raise ValueError(f"--checkpoint_dir={directory}: supported URLs are gs:// and s3:// (or use a "
                     "filesystem path, e.g. a mounted bucket).")
  if not any(importlib.util.find_spec(p) for p in _URL_PACKAGES[scheme]):
    raise ValueError(f"--checkpoint_dir={directory}: writing {scheme}:// needs the "
                     f"'{_URL_PACKAGES[scheme][0]}' package on every host "
                     f"(pip install {_URL_PACKAGES[scheme][0]}), which is not installed.")


def _short(e: Exception) -> str:
  """The first line of an error, capped: TensorStore errors embed a whole JSON spec. An OS error
  inside (TensorStore's "[os_error_code=27]") is named in full, wherever the cap falls."""
  text = str(e).strip().splitlines()[0] if str(e).strip() else ""
  if len(text) > 300:
    text = f"{text[:140]} ... {text[-140:]}"
  os_error = re.search(r"os_error_code='?(\d+)", str(e))
  if os_error:
    code = int(os_error.group(1))
    text += f" [OS error {errno.errorcode.get(code, code)}: {os.strerror(code)}]"
  return f"{type(e).__name__}: {text}"


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` placed by `shardings` (restore targets for any mesh)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
