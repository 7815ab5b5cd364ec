"""The end of a complete run: the final model as a project checkpoint (final/, where stage 2
starts from), a Hugging Face directory (hf/) and the loss curve (loss.png).

  loop.run calls `write_final(run, workdir, params, metrics_path, step)` on every
  process once the run has reached train.steps.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from ultralong_jax.convert import api as convert_api
from ultralong_jax.convert import checkpoint as model_checkpoint
from ultralong_jax.convert import hf
from ultralong_jax.training import metrics as metrics_lib, outputs
from ultralong_jax.training.run_config import RunConfig


def write_final(run: RunConfig, workdir: str, params, metrics_path: str, step: int
                ) -> dict[str, str]:
  """The final model as a project checkpoint (stage 2 starts from it) and a HF directory; the
  loss curve as a PNG. Each is written aside and moved into place when complete (outputs.py), so
  after a resumed run they all describe `step`, the step the run ended at; final/run.json says so.
  Called on every process: Orbax writes the sharded parameters as they are (each process its own
  shards, no gather), and the HF export gathers one tensor at a time (`layer_getter`), both
  collectives; process 0 alone prepares and renames the directories, writes the HF files and the
  plot."""
  primary = jax.process_index() == 0
  model_cfg = run.model
  final = os.path.join(workdir, "final")
  out = {"final_checkpoint": final}
  partial = outputs.start_dir(final) if primary else outputs.partial_path(final)
  _sync("ultralong_jax.loop: final/ leftovers cleared")
  model_checkpoint.save_params(partial, model_cfg, params)
  _sync("ultralong_jax.loop: final/ parameters written")
  if primary:
    with open(os.path.join(partial, RUN_INFO), "w") as f:
      json.dump({"stage": run.stage, "step": step, "steps": run.train.steps}, f)
    outputs.commit_dir(final)
  if run.export.hf:
    get = layer_getter(params)
    if primary:
      out["hf_export"] = os.path.join(workdir, "hf")
      outputs.replace_dir(out["hf_export"], lambda tmp: convert_api.export_hf(
          tmp, model_cfg, get, dtype=run.export.dtype))
    else:  # the same gathers in the same order as process 0's export
      for _ in hf.iter_hf_tensors(model_cfg, get):
        pass
  if primary and os.path.exists(metrics_path):
    png = os.path.join(workdir, "loss.png")
    outputs.replace_file(png, lambda tmp: metrics_lib.plot_loss(
        metrics_path, tmp, title=f"{run.run_name} loss"))
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


class _Layers:
  """A stacked parameter [L, ...] whose layers come to the host one at a time: `[i]` gathers
  layer i (a collective when the array spans processes) as numpy on every process."""

  def __init__(self, array: jax.Array):
    self._array = array
    self._take = jax.jit(lambda x, i: jax.lax.dynamic_index_in_dim(x, i, keepdims=False))

  def __getitem__(self, i: int) -> np.ndarray:
    return _to_host(self._take(self._array, i))


def layer_getter(params: dict):
  """`get(path)` for `hf.iter_hf_tensors` over sharded (possibly multi-host) parameters: the
  embedding and head are gathered whole, stacked parameters one layer at a time, so a host holds
  one HF tensor (plus what the writer keeps for its current safetensors shard)."""

  def get(path):
    node = params
    for key in path:
      node = node[key]
    return _Layers(node) if path[0] == "layers" else _to_host(node)

  return get


def _to_host(x: jax.Array) -> np.ndarray:
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
