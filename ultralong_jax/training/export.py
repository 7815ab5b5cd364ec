"""The end of a complete run: the final model as a project checkpoint (final/, where stage 2
starts from), a Hugging Face directory (hf/) and the loss curve (loss.png).

  loop.run calls `write_final(c, workdir, model_config, params, metrics_path, step)` on every
  process once the run has reached train.steps.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from ultralong_jax.convert import api as convert_api
from ultralong_jax.convert import checkpoint as model_checkpoint
from ultralong_jax.training import config as config_lib, metrics as metrics_lib, outputs


def write_final(c, workdir, model_cfg, params, metrics_path, step: int) -> dict[str, str]:
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
