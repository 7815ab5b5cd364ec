"""One training loop for both stages: build, resume, step, watch, checkpoint, export.

  summary = run(config, workdir)

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
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

from ultralong_jax.convert import api as convert_api
from ultralong_jax.convert import checkpoint as model_checkpoint
from ultralong_jax.data import pretrain, sft
from ultralong_jax.modeling import llama
from ultralong_jax.parallel import layout, mesh as mesh_lib, sharding
from ultralong_jax.parallel.ring_attention import make_attention_fn
from ultralong_jax.training import checkpointing, metrics as metrics_lib, optimizer, outputs
from ultralong_jax.training import goodput
from ultralong_jax.training import preflight
from ultralong_jax.training import train_step
from ultralong_jax.training import watchdog
from ultralong_jax.training import config as config_lib


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


def _initial_params(c: ml_collections.ConfigDict, model_cfg, shardings: dict) -> dict:
  """Parameters placed by `shardings`: random (created sharded inside a jit, never whole on one
  host), or loaded from a HF directory / project checkpoint."""
  if c.init.mode == "random":
    make = lambda: nnx.to_pure_dict(nnx.state(llama.init_model(model_cfg, c.train.seed), nnx.Param))
    return jax.jit(make, out_shardings=shardings)()
  model = convert_api.from_pretrained(
      c.init.path, dtype=model_cfg.param_dtype, compute_dtype=model_cfg.dtype,
      remat_policy=model_cfg.remat_policy, rope_scaling=model_cfg.rope_scaling,
      max_position_embeddings=model_cfg.max_position_embeddings)
  return jax.device_put(convert_api.model_params(model), shardings)


def build_pipeline(c: ml_collections.ConfigDict):
  return (pretrain.build_pretrain_pipeline if c.stage == 1 else sft.build_sft_pipeline)(c.data)


@dataclasses.dataclass
class _Run:
  """Everything built from a config before the first step."""
  model_cfg: Any
  mesh: Any
  tx: Any
  abstract_params: dict
  params_sharding: dict
  state_sharding: dict
  batch_sharding: dict
  step_fn: Any
  pipe: Any


def _build(c: ml_collections.ConfigDict) -> _Run:
  model_cfg = config_lib.validate(c, jax.device_count(), jax.process_count())
  preflight.check(c, model_cfg)  # files, tokenizer, memory: before any compile
  mesh = mesh_lib.make_mesh({a: c.mesh[a] for a in config_lib.MESH_AXES})
  attention_fn = make_attention_fn(mesh, strategy=c.attention.strategy, layout=c.attention.layout,
                                   kernel=c.attention.kernel,
                                   chunk_size=c.attention.get("chunk_size", 1024))
  abstract = llama.abstract_model(model_cfg, attention_fn=attention_fn,
                                  constrain_fn=sharding.constrain_fn(mesh))
  graphdef, abstract_state = nnx.split(abstract)
  abstract_params = nnx.to_pure_dict(abstract_state)
  tx, schedule = optimizer.make_optimizer(c.optim, c.train.steps)
  params_sharding = train_step.param_shardings(mesh, abstract)
  state_sharding = train_step.state_shardings(mesh, tx, params_sharding, abstract_params)
  batch_sharding = train_step.batch_sharding(mesh, c.data.seq_len, c.data.global_batch_size)
  options = train_step.StepOptions(
      microbatches=c.train.microbatches,
      loss_chunk_size=min(c.train.loss_chunk_size, c.data.seq_len),
      z_loss_weight=c.train.z_loss_weight,
      use_segment_ids=config_lib.uses_segment_ids(c))
  step_fn = train_step.jit_train_step(train_step.make_train_step(graphdef, tx, schedule, options),
                                      mesh, state_sharding, batch_sharding)
  return _Run(model_cfg, mesh, tx, abstract_params, params_sharding, state_sharding,
              batch_sharding, step_fn, build_pipeline(c))


def run(c: ml_collections.ConfigDict, workdir: str, *, max_steps: int | None = None,
        progress: bool = True, checkpoint_dir: str | None = None,
        wrap_step: Callable[[Callable], Callable] | None = None) -> dict[str, Any]:
  """Trains per `c` in `workdir`, resuming from its newest complete checkpoint if any.

  Checkpoints go to `checkpoint_dir` when given (a path or a gs:// / s3:// URL), else to
  workdir/checkpoints; everything else the run writes stays in workdir (a filesystem path).

  max_steps stops after that many steps *of this invocation* (tests use it to interrupt a run);
  the run is otherwise complete at c.train.steps. Returns a summary dict (also summary.json),
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
    built = _build(c)  # validation and everything that can fail on bad input, before any compile
    if wrap_step is not None:
      built.step_fn = wrap_step(built.step_fn)
    ckpt = checkpointing.RunCheckpointer(
        workdir, every_steps=c.checkpoint.every_steps, keep=c.checkpoint.keep,
        async_save=c.checkpoint.async_save, directory=checkpoint_dir,
        retries=c.checkpoint.retries, backoff_s=c.checkpoint.retry_backoff_s)
  writer = metrics_lib.MetricsWriter(workdir)
  try:
    summary = _train(c, workdir, built, ckpt, writer, max_steps, progress, account)
  finally:
    ckpt.close()
    writer.close()
  if summary["complete"]:  # every process: the gather and the checkpoint write are collectives
    with account.timed("export"):
      summary.update(_finish(c, workdir, built.model_cfg, summary.pop("_params"), writer.path,
                             summary["end_step"]))
  summary.pop("_params", None)
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


def _train(c, workdir, built: _Run, ckpt, writer, max_steps, progress,
           account: goodput.TimeAccount) -> dict[str, Any]:
  dog = watchdog.Watchdog(c.train.hang_timeout_s, c.train.hang_startup_s,
                          watchdog.describe_process())
  with dog:
    return _train_watched(c, workdir, built, ckpt, writer, max_steps, progress, account, dog)


def _train_watched(c, workdir, built: _Run, ckpt, writer, max_steps, progress, account,
                   dog) -> dict[str, Any]:
  seq_len, batch_size = c.data.seq_len, c.data.global_batch_size
  n_seq = built.mesh.shape["sequence"]
  tx = built.tx
  data_iter = built.pipe.iterator()
  start_step, state = None, None
  if ckpt.latest_step() is not None:
    abstract = checkpointing.abstract_with_shardings(
        jax.eval_shape(lambda p: train_step.init_state(p, tx), built.abstract_params),
        built.state_sharding)
    with account.timed("restore"):
      start_step, state = ckpt.restore_latest(
          abstract, data_iter, fallback=c.checkpoint.get("fallback_on_corrupt", False))
    logging.info("resumed from step %s in %s", start_step, ckpt.directory)
  if start_step is None:
    start_step = 0
    with account.timed("startup"):
      params = _initial_params(c, built.model_cfg, built.params_sharding)
      state = jax.jit(lambda p: train_step.init_state(p, tx),
                      out_shardings=built.state_sharding)(params)
  # Steps up to the last one an earlier invocation logged are computed a second time.
  account.replay_until = goodput.last_logged_step(writer.path)
  if account.replay_until > start_step:
    logging.warning("resumed at step %d: steps %d-%d are computed again", start_step,
                    start_step + 1, account.replay_until)

  flops_per_token = metrics_lib.train_flops_per_token(built.model_cfg, seq_len)
  peak = metrics_lib.peak_tflops(override=c.metrics.peak_tflops)
  tokens_per_step = batch_size * seq_len
  end_step = c.train.steps if max_steps is None else min(c.train.steps, start_step + max_steps)
  bar = tqdm(total=c.train.steps, initial=start_step, disable=not progress or jax.process_index(),
             desc=config_lib.run_name(c), unit="step", dynamic_ncols=True)
  last, preempted = {}, False
  stop_on_nonfinite = c.train.get("nonfinite", "skip") == "stop"
  seen_nonfinite = {"count": 0}  # warn when the device-side count grows, not on every log line
  step = saved_step = start_step
  t_prev = time.perf_counter()
  account.start_steps()
  # The mesh context serves activation sharding hints inside the step; model construction and
  # loading stay outside it (NNX would read logical names as mesh axes there).
  try:
    with _Preemption() as preemption, jax.set_mesh(built.mesh):
      while step < end_step:
        with account.timed("data_wait"):
          batch = next(data_iter)
          if n_seq > 1:
            batch = layout.zigzag_permute(batch, n_seq, layout=c.attention.layout)
        batch = train_step.put_batch(batch, built.batch_sharding)
        state, step_metrics = built.step_fn(state, batch)
        step += 1
        if step % c.train.log_every == 0 or step == end_step:
          last = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
          now = time.perf_counter()
          seconds = (now - t_prev) / c.train.log_every
          t_prev = now
          last.update(step_time_s=seconds, tokens_per_s=tokens_per_step / seconds)
          tflops = flops_per_token * last["tokens_per_s"] / jax.device_count() / 1e12
          last["tflops_per_device"] = tflops
          if peak:
            last["mfu"] = tflops / peak
          writer.write(step, last)
          _check_numerics(c, last, ckpt, seen_nonfinite)  # after the write: the bad row is logged
          bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['learning_rate']:.2e}",
                          tok_s=f"{last['tokens_per_s']:,.0f}", tflops=f"{tflops:.3g}",
                          **({"mfu": f"{last['mfu']:.1%}"} if peak else {}))
        bar.update(1)
        preemption.check(step)
        if stop_on_nonfinite and (preemption.requested or ckpt.manager.should_save(step)):
          # Never checkpoint past a non-finite step under `stop`: one small sync per save.
          _check_numerics(c, {k: float(step_metrics[k]) for k in _NONFINITE_KEYS}, ckpt,
                          seen_nonfinite)
        dog.beat(step)
        with account.timed("checkpoint"):
          dog.slow_section()
          if ckpt.save(step, state, data_iter, c, force=preemption.requested):
            saved_step = step
        dog.beat(step, step_time=False)
        account.step_done(step)
        if preemption.requested:
          preempted = True
          logging.warning("SIGTERM: saved step %d, exiting", step)
          break
  finally:  # an error inside leaves the bar closed before it is printed
    bar.close()
  dog.slow_section()
  with account.timed("checkpoint"):
    if step != saved_step and (step == c.train.steps or max_steps is not None):
      if stop_on_nonfinite and step > start_step:
        _check_numerics(c, {k: float(step_metrics[k]) for k in _NONFINITE_KEYS}, ckpt,
                        seen_nonfinite)
      ckpt.save(step, state, data_iter, c, force=True)  # the end of this invocation
    ckpt.finish(step, state, data_iter, c)
  complete = step == c.train.steps
  data_stats = _jsonable(built.pipe.stats(data_iter))
  if c.stage == 1:  # the mix the resampling actually produced, next to the configured weights
    data_stats["realized_mix"] = pretrain.realized_mix(data_stats)
    logging.info("stage-1 realized domain mix (token shares): %s", data_stats["realized_mix"])
  return {"stage": c.stage, "start_step": start_step, "end_step": step, "complete": complete,
          "preempted": preempted, "checkpoints": ckpt.directory, "metrics": writer.path,
          "last_metrics": last, "data": data_stats,
          "nonfinite_steps": int(state["nonfinite_steps"]),
          "mesh": dict(built.mesh.shape), "model_params": built.model_cfg.num_params,
          "_params": state["params"] if complete else None}


_NONFINITE_KEYS = ("nonfinite_steps", "first_nonfinite_step")


def _check_numerics(c, metrics: dict, ckpt, seen: dict) -> None:
  """Applies train.nonfinite to the device-side counters (read only when the host syncs anyway)."""
  skipped, first = int(metrics["nonfinite_steps"]), int(metrics["first_nonfinite_step"])
  if skipped == seen["count"]:
    return
  seen["count"] = skipped
  limit = c.train.get("max_nonfinite_steps", 0)
  if c.train.get("nonfinite", "skip") == "skip" and (not limit or skipped <= limit):
    logging.warning("%d step(s) with a non-finite loss or gradient skipped (the first: step %d)",
                    skipped, first)
    return
  ckpt.wait()  # an async save in flight is part of the answer
  good = [s for s in ckpt.manager.all_steps() if s < first]
  where = (f"step {max(good)} in {ckpt.directory}" if good else
           f"none (no checkpoint before step {first} in {ckpt.directory})")
  why = ("train.nonfinite=stop" if c.train.get("nonfinite", "skip") == "stop" else
         f"{skipped} skipped steps > train.max_nonfinite_steps={limit}")
  raise NonFiniteError(
      f"non-finite loss or gradient at step {first} ({why}); the update was not applied. "
      f"Last good checkpoint: {where}. Lower optim.learning_rate or inspect that step's batch, "
      "then resume (the run restarts from the last checkpoint).")


def _finish(c, workdir, model_cfg, params, metrics_path, step: int) -> dict[str, str]:
  """The final model as a project checkpoint (stage 2 starts from it) and a HF directory; the
  loss curve as a PNG. Each is written aside and moved into place when complete (outputs.py), so
  after a resumed run they all describe `step`, the step the run ended at; final/run.json says so.
  Called on every process: gathering the sharded parameters and Orbax's save are collectives;
  process 0 alone prepares and renames the directories, writes the HF export and the plot."""
  params = _host_params(params)
  primary = jax.process_index() == 0
  final = os.path.join(workdir, "final")
  out = {"final_checkpoint": final}
  partial = outputs.start_dir(final) if primary else outputs.partial_path(final)
  _sync("ultralong_jax.loop: final/ leftovers cleared")
  model_checkpoint.save_params(partial, model_cfg, params)  # numpy arrays: process 0 writes them
  _sync("ultralong_jax.loop: final/ parameters written")
  if primary:
    with open(os.path.join(partial, RUN_INFO), "w") as f:
      json.dump({"stage": c.stage, "step": step, "steps": c.train.steps}, f)
    outputs.commit_dir(final)
    if c.export.hf:
      out["hf_export"] = os.path.join(workdir, "hf")
      outputs.replace_dir(out["hf_export"], lambda tmp: convert_api.export_hf(
          tmp, model_cfg, convert_api.params_getter(params), dtype=c.export.dtype))
    if os.path.exists(metrics_path):
      png = os.path.join(workdir, "loss.png")
      outputs.replace_file(png, lambda tmp: metrics_lib.plot_loss(
          metrics_path, tmp, title=f"{config_lib.run_name(c)} loss"))
      out["loss_plot"] = png
  # The others wait here: exiting early would start JAX's shutdown barrier, whose timeout
  # (5 min) an 8B export can outlast, and a launcher may end the job when its first task exits.
  _sync("ultralong_jax.loop: final exports written")
  return out


RUN_INFO = "run.json"  # in final/: {"stage", "step", "steps"} of the run that wrote it


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


def _host_params(params: dict) -> dict:
  """The whole parameter tree as numpy on this host. With several processes the parameters are
  sharded across hosts, so every process must call this: it gathers one tensor at a time (never
  the whole tree replicated on a device), and every host holds the full tree in RAM after it."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, jax.device_get(params))
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)),
                      params)


def _jsonable(x):
  return json.loads(json.dumps(x, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
