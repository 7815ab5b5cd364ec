"""Orbax checkpoints of a run: train state + Grain iterator state + config, in one step directory.

  workdir/checkpoints/<step>/state      params, optimizer state, step (sharded arrays)
  workdir/checkpoints/<step>/data_iter  the Grain iterator's state, one JSON per process
  workdir/checkpoints/<step>/config     the run's config (JSON)

Orbax writes each step into a temporary directory and renames it when complete, so `latest_step`
never returns a partial checkpoint. Restores take abstract arrays carrying the *current* mesh's
shardings, so a run may resume on a different mesh shape.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp


class RunCheckpointer:
  """Saves every `every_steps` (and when forced), keeps the newest `keep`, async by default."""

  def __init__(self, workdir: str, *, every_steps: int, keep: int, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(every_steps, 1) if every_steps else 10**12,
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=("state", "data_iter", "config"),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data_iter": grain.checkpoint.CheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()},
        options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iter, config: ml_collections.ConfigDict, *,
           force: bool = False) -> bool:
    """Starts a save when the interval says so (or `force`); returns whether one started."""
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data_iter=grain.checkpoint.CheckpointSave(data_iter),
        config=ocp.args.JsonSave(config.to_dict())), force=force)

  def restore(self, step: int, abstract_state: Any, data_iter) -> Any:
    """Restores `step` into arrays shaped/sharded like `abstract_state`; the Grain iterator is
    restored in place. Returns the state."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data_iter=grain.checkpoint.CheckpointRestore(data_iter)))
    return restored["state"]

  def restore_config(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))[
        "config"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` placed by `shardings` (restore targets for any mesh)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
