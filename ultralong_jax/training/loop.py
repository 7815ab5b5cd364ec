"""One training loop for both stages, in the recipe's order:

  summary = run(config, workdir)

  build       validate the config and resolve it into typed pieces (config.resolve), pre-flight
              its files and memory, then the sharded train step (train_step.from_config) and
              the data pipeline                                               `build`
  resume      the newest complete checkpoint (state and data position), else the initial
              parameters (random, or a HF / project checkpoint)              `_resume`
  step        next batch, in the ring's layout, as sharded arrays -> the compiled step
  log         metrics.jsonl with throughput and MFU, the progress bar        `StepLog`
  guard       train.nonfinite on the step's device-side counters             `NonFiniteGuard`
  checkpoint  every checkpoint.every_steps, on SIGTERM (`_Preemption`) and at the end of the
              invocation; a hang watchdog around it all                      `train`
  export      once complete: final/ (project checkpoint), hf/ and loss.png   `export.py`

Stage 1 (continued pretraining on packed long documents) and stage 2 (chat SFT) differ only in
their data pipeline and whether attention is restricted by segment ids.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from typing import Any, Callable

import jax
import ml_collections
from tqdm import tqdm

from ultralong_jax.convert import api as convert_api
from ultralong_jax.data import pretrain, sft
from ultralong_jax.parallel import layout
from ultralong_jax.training import checkpointing, export, metrics as metrics_lib, outputs
from ultralong_jax.training import goodput
from ultralong_jax.training import preflight
from ultralong_jax.training import train_step
from ultralong_jax.training import watchdog
from ultralong_jax.training import config as config_lib
from ultralong_jax.training.run_config import RunConfig, TrainConfig


class NonFiniteError(ValueError):
  """The run stopped on a NaN/Inf loss or gradient (train.nonfinite=stop, or too many skipped)."""


class _Preemption:
  """SIGTERM sets a flag; the loop saves at the next step boundary and exits cleanly.

  With several processes each host gets its SIGTERM at its own moment, and a host that saved and
  left at step n while another went on to step n+1 would leave both waiting in a collective. So
  there JAX's preemption sync service (started by jax.distributed.initialize) catches SIGTERM
  instead, and `check(step)` turns true at the same step on every host
  (multihost_utils.reached_preemption_sync_point, which must be called at every step).
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    self._synced = False

  def __enter__(self):
    self._synced = jax.process_count() > 1 and jax.distributed.is_initialized()
    if self._synced:
      return self  # our handler would replace the sync service's own SIGTERM handler

    def handler(signum, frame):
      del signum, frame
      self.requested = True
    try:
      self._previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. some notebook kernels): no handler
      self._previous = None
    return self

  def check(self, step: int) -> bool:
    """Whether to save and stop after `step`; call once per step, on every process."""
    if self._synced and not self.requested:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      self.requested = multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def initial_params(run: RunConfig, built: train_step.TrainStep) -> dict:
  """Parameters placed by the step's shardings: random (created sharded inside a jit), or loaded
  from a HF directory / project checkpoint, each process reading only its devices' slices; never
  whole on one host."""
  if run.init.mode == "random":
    return built.random_params(run.train.seed)
  return convert_api.load_params(run.init.path, built.model_config, built.shardings["params"])


def build_pipeline(run: RunConfig):
  return (pretrain.build_pretrain_pipeline if run.stage == 1 else sft.build_sft_pipeline)(run.data)


@dataclasses.dataclass(frozen=True)
class Run:
  """What a config builds before the first step: its resolved pieces, the train step and the
  data pipeline."""
  config: RunConfig
  train_step: train_step.TrainStep
  pipe: Any


def build(c: ml_collections.ConfigDict) -> Run:
  """Validates and resolves `c` (and pre-flights its files, tokenizer and memory) before
  building anything."""
  run = config_lib.resolve(c, jax.device_count(), jax.process_count())
  preflight.check(run)  # files, tokenizer, memory: before any compile
  return Run(run, train_step.from_config(run), build_pipeline(run))


def run(c: ml_collections.ConfigDict, workdir: str, *, max_steps: int | None = None,
        progress: bool = True, checkpoint_dir: str | None = None,
        wrap_step: Callable[[Callable], Callable] | None = None) -> dict[str, Any]:
  """Trains per `c` in `workdir`, resuming from its newest complete checkpoint if any.

  Checkpoints go to `checkpoint_dir` when given (a path or a gs:// / s3:// URL), else to
  workdir/checkpoints; everything else the run writes stays in workdir (a filesystem path).

  max_steps stops after that many steps *of this invocation* (tests use it to interrupt a run);
  the run is otherwise complete at train.steps. Returns a summary dict (also summary.json),
  with the invocation's time account (goodput.py) under "time".

  wrap_step, when given, receives the compiled `step_fn(state, batch) -> (state, metrics)` and
  returns the function the loop calls instead (the crash tests inject faults through it).
  """
  account = goodput.TimeAccount()
  check_workdir(workdir)
  if checkpoint_dir is not None:
    checkpointing.check_directory(checkpoint_dir)
  os.makedirs(workdir, exist_ok=True)
  with account.timed("startup"):
    built = build(c)  # validation and everything that can fail on bad input, before any compile
    step_fn = built.train_step.step if wrap_step is None else wrap_step(built.train_step.step)
    ckpt = checkpointing.RunCheckpointer(workdir, built.config.checkpoint,
                                         directory=checkpoint_dir)
  writer = metrics_lib.MetricsWriter(workdir)
  try:
    trained = train(built, step_fn, ckpt, writer, max_steps=max_steps, progress=progress,
                    account=account)
  finally:
    ckpt.close()
    writer.close()
  summary = _summary(built, trained, ckpt.directory, writer.path)
  if summary["complete"]:  # every process: the gather and the checkpoint write are collectives
    with account.timed("export"):
      summary.update(export.write_final(built.config, workdir, trained.state["params"],
                                        writer.path, trained.end_step))
  summary["process_count"] = jax.process_count()
  summary["time"] = account.summary()
  logging.info("time account: %s", json.dumps(summary["time"]))
  if jax.process_index() == 0:  # one writer per run (the workdir is shared between hosts)
    goodput.write_tensorboard(workdir, summary["end_step"], summary["time"])
    outputs.write_json(os.path.join(workdir, "summary.json"), summary)
  return summary


def check_workdir(workdir: str) -> None:
  """Rejects an object-store URL as workdir before anything starts: the run writes metrics.jsonl,
  summary.json, loss.png, final/ and hf/ with plain file I/O, so it would fail at its first
  metrics line (or, worse, at the export after the last step)."""
  if "://" in workdir:
    raise ValueError(
        f"--workdir={workdir}: the workdir must be a filesystem path, not a URL (metrics, summary, "
        "final checkpoint and HF export are written with file I/O). Use a filesystem every host "
        "sees (NFS, Lustre, Filestore) or mount the bucket with Cloud Storage FUSE and pass the "
        "mount point, e.g. `gcsfuse --implicit-dirs BUCKET /mnt/gcs` then "
        "--workdir=/mnt/gcs/runs/stage1; checkpoints alone may go to the bucket directly with "
        "--checkpoint_dir=gs://BUCKET/runs/stage1/checkpoints (docs/launch.md, Storage).")


@dataclasses.dataclass(frozen=True)
class Trained:
  """How one invocation of `train` ended: the train state after `end_step` and what it saw."""
  state: dict            # train_step's train state {"params", "opt_state", "step", ...}
  start_step: int
  end_step: int
  preempted: bool
  last_metrics: dict     # the last metrics line written
  data_stats: dict       # the pipeline's statistics (JSON-able)


def train(built: Run, step_fn: Callable, ckpt, writer, *, max_steps: int | None, progress: bool,
          account: goodput.TimeAccount) -> Trained:
  """Resume, then step, log, guard and checkpoint until train.steps (or max_steps of this
  invocation, or SIGTERM), under the hang watchdog; ends with a checkpoint of the last step."""
  run = built.config
  dog = watchdog.Watchdog(run.train.hang_timeout_s, run.train.hang_startup_s,
                          watchdog.describe_process())
  ts = built.train_step
  with dog:
    data_iter = built.pipe.iterator()
    start_step, state = _resume(run, ts, ckpt, data_iter, account)
    _note_replay(account, writer.path, start_step)
    steps = run.train.steps
    end_step = steps if max_steps is None else min(steps, start_step + max_steps)
    guard = NonFiniteGuard(run.train, ckpt)
    log = StepLog(run, ts, writer, start_step, progress)
    n_seq = ts.mesh.shape["sequence"]
    step = saved_step = start_step
    preempted = False
    account.start_steps()
    # The mesh context serves activation sharding hints inside the step; model construction and
    # loading stay outside it (NNX would read logical names as mesh axes there).
    try:
      with _Preemption() as preemption, jax.set_mesh(ts.mesh):
        while step < end_step:
          with account.timed("data_wait"):
            batch = _next_batch(data_iter, n_seq, run.attention.layout)
          state, step_metrics = step_fn(state, ts.put_batch(batch))
          step += 1
          if log.due(step, end_step):
            guard.check(log.write(step, step_metrics))  # after the write: the bad row is logged
          log.advance()
          # The save is forced by the flag as read here; a SIGTERM landing later in this step
          # stops the run now only if this step was saved anyway, else after the next step.
          stop = preemption.check(step)
          if guard.stop and (stop or ckpt.manager.should_save(step)):
            guard.before_save(step_metrics)  # never checkpoint past a non-finite step
          dog.beat(step)
          with account.timed("checkpoint"):
            dog.slow_section()
            if ckpt.save(step, state, data_iter, run.raw, force=stop):
              saved_step = step
          dog.beat(step, step_time=False)
          account.step_done(step)
          if stop or (preemption.requested and saved_step == step):
            preempted = True
            logging.warning("SIGTERM: saved step %d, exiting", step)
            break
    finally:  # an error inside leaves the bar closed before it is printed
      log.close()
    dog.slow_section()
    with account.timed("checkpoint"):
      if step != saved_step and (step == steps or max_steps is not None):
        if step > start_step:
          guard.before_save(step_metrics)
        ckpt.save(step, state, data_iter, run.raw, force=True)  # the end of this invocation
      ckpt.finish(step, state, data_iter, run.raw)
    return Trained(state, start_step, step, preempted, log.last,
                   _data_stats(run.stage, built.pipe, data_iter))


def _resume(run: RunConfig, built: train_step.TrainStep, ckpt, data_iter,
            account: goodput.TimeAccount) -> tuple[int, dict]:
  """(step, train state): the newest complete checkpoint (which also moves `data_iter` to where
  it was), else step 0 with the initial parameters."""
  if ckpt.latest_step() is not None:
    abstract = built.abstract_state()
    with account.timed("restore"):
      step, state = ckpt.restore_latest(abstract, data_iter,
                                        fallback=run.checkpoint.fallback_on_corrupt)
    logging.info("resumed from step %s in %s", step, ckpt.directory)
    if step is not None:
      return step, state
  with account.timed("startup"):
    return 0, built.init_state(initial_params(run, built))


def _note_replay(account: goodput.TimeAccount, metrics_path: str, start_step: int) -> None:
  """Steps up to the last one an earlier invocation logged are computed a second time."""
  account.replay_until = goodput.last_logged_step(metrics_path)
  if account.replay_until > start_step:
    logging.warning("resumed at step %d: steps %d-%d are computed again", start_step,
                    start_step + 1, account.replay_until)


def _next_batch(data_iter, n_seq: int, layout_name: str) -> dict:
  """The next global batch (this process's rows), in the ring's layout when sequence > 1."""
  batch = next(data_iter)
  return layout.zigzag_permute(batch, n_seq, layout=layout_name) if n_seq > 1 else batch


class StepLog:
  """metrics.jsonl lines every train.log_every steps (and at the invocation's last step), with
  step time, tokens/s, model TFLOP/s per device and MFU, and the progress bar."""

  def __init__(self, run: RunConfig, built: train_step.TrainStep, writer, start_step: int,
               progress: bool):
    self.every = run.train.log_every
    self.last: dict[str, float] = {}
    self._writer = writer
    self._flops_per_token = metrics_lib.train_flops_per_token(built.model_config, built.seq_len)
    self._peak = metrics_lib.peak_tflops(override=run.metrics.peak_tflops)
    self._tokens_per_step = built.batch_size * built.seq_len
    self._bar = tqdm(total=run.train.steps, initial=start_step,
                     disable=not progress or jax.process_index(), desc=run.run_name,
                     unit="step", dynamic_ncols=True)
    self._t_prev = time.perf_counter()

  def due(self, step: int, end_step: int) -> bool:
    return step % self.every == 0 or step == end_step

  def write(self, step: int, step_metrics: dict) -> dict[str, float]:
    """Reads the step's metrics to the host (a sync), writes their line; returns it."""
    last = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
    now = time.perf_counter()
    seconds = (now - self._t_prev) / self.every
    self._t_prev = now
    last.update(step_time_s=seconds, tokens_per_s=self._tokens_per_step / seconds)
    tflops = self._flops_per_token * last["tokens_per_s"] / jax.device_count() / 1e12
    last["tflops_per_device"] = tflops
    if self._peak:
      last["mfu"] = tflops / self._peak
    self._writer.write(step, last)
    self._bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['learning_rate']:.2e}",
                          tok_s=f"{last['tokens_per_s']:,.0f}", tflops=f"{tflops:.3g}",
                          **({"mfu": f"{last['mfu']:.1%}"} if self._peak else {}))
    self.last = last
    return last

  def advance(self) -> None:
    self._bar.update(1)

  def close(self) -> None:
    self._bar.close()


class NonFiniteGuard:
  """train.nonfinite applied to the step's device-side counters `nonfinite_steps` and
  `first_nonfinite_step` (train_step.py), read only when the host syncs anyway: `check` at every
  metrics line, `before_save` (under `stop`, one small sync) before every checkpoint so a run
  never saves past a non-finite step. `skip` warns when the count grows and stops once it is over
  train.max_nonfinite_steps (0: no limit); `stop` stops at the first one."""

  def __init__(self, train_cfg: TrainConfig, ckpt):
    self.stop = train_cfg.nonfinite == "stop"
    self.limit = train_cfg.max_nonfinite_steps
    self._ckpt = ckpt
    self._seen = 0  # warn when the count grows, not on every metrics line

  def check(self, metrics: dict) -> None:
    skipped, first = int(metrics["nonfinite_steps"]), int(metrics["first_nonfinite_step"])
    if skipped == self._seen:
      return
    self._seen = skipped
    if not self.stop and (not self.limit or skipped <= self.limit):
      logging.warning("%d step(s) with a non-finite loss or gradient skipped (the first: step %d)",
                      skipped, first)
      return
    self._ckpt.wait()  # an async save in flight is part of the answer
    good = [s for s in self._ckpt.manager.all_steps() if s < first]
    where = (f"step {max(good)} in {self._ckpt.directory}" if good else
             f"none (no checkpoint before step {first} in {self._ckpt.directory})")
    why = ("train.nonfinite=stop" if self.stop else
           f"{skipped} skipped steps > train.max_nonfinite_steps={self.limit}")
    raise NonFiniteError(
        f"non-finite loss or gradient at step {first} ({why}); the update was not applied. "
        f"Last good checkpoint: {where}. Lower optim.learning_rate or inspect that step's batch, "
        "then resume (the run restarts from the last checkpoint).")

  def before_save(self, step_metrics: dict) -> None:
    if self.stop:
      self.check({k: step_metrics[k] for k in ("nonfinite_steps", "first_nonfinite_step")})


def _data_stats(stage: int, pipe, data_iter) -> dict:
  stats = _jsonable(pipe.stats(data_iter))
  if stage == 1:  # the mix the resampling actually produced, next to the configured weights
    stats["realized_mix"] = pretrain.realized_mix(stats)
    logging.info("stage-1 realized domain mix (token shares): %s", stats["realized_mix"])
  return stats


def _summary(built: Run, trained: Trained, checkpoints: str, metrics_path: str
             ) -> dict[str, Any]:
  run = built.config
  return {"stage": run.stage, "start_step": trained.start_step, "end_step": trained.end_step,
          "complete": trained.end_step == run.train.steps, "preempted": trained.preempted,
          "checkpoints": checkpoints, "metrics": metrics_path,
          "last_metrics": trained.last_metrics, "data": trained.data_stats,
          "nonfinite_steps": int(trained.state["nonfinite_steps"]),
          "mesh": dict(built.train_step.mesh.shape),
          "model_params": built.train_step.model_config.num_params}


def _jsonable(x):
  return json.loads(json.dumps(x, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
