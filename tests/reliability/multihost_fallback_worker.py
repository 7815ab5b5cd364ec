"""One process of test_multihost_fallback.py (run under launch/multihost.sh --local 2).

Saves steps 1 and 2 of a small fsdp-sharded state, damages the file of step 2 that process 1
wrote and alone reads back (its data iterator's state), then restores: strictly (every process must raise), then with
fallback (every process must resume from step 1). Writes what it saw to RESULT.<process>.
"""

import argparse
import dataclasses
import json
import os

import numpy as np


class _Iterator:
  """The smallest iterator Grain's checkpoint handler stores (get_state -> bytes)."""

  def __init__(self):
    self.position = 0

  def get_state(self) -> bytes:
    return json.dumps({"position": self.position}).encode()

  def set_state(self, state: bytes) -> None:
    self.position = json.loads(state)["position"]

  def start_prefetch(self) -> None:
    pass


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--result", required=True)
  parser.add_argument("--coordinator_address")
  parser.add_argument("--num_processes", type=int)
  parser.add_argument("--process_id", type=int)
  args = parser.parse_args()
  from ultralong_jax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  mesh_lib.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
  import jax  # pylint: disable=import-outside-toplevel
  import ml_collections  # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from ultralong_jax.training import checkpointing, config as config_lib, run_config

  sharding = NamedSharding(mesh_lib.make_mesh({"fsdp": -1}), P("fsdp"))

  def state_at(step):
    return {"w": jax.make_array_from_callback(
        (64,), sharding, lambda index: np.full(64, step, np.float32)[index])}

  config = ml_collections.ConfigDict({"note": "fallback test"})
  iterator = _Iterator()
  checkpoint = dataclasses.replace(run_config.CheckpointConfig.of(config_lib.base_config(1)),
                                   every_steps=1, keep=5, async_save=False)
  ckpt = checkpointing.RunCheckpointer(args.workdir, checkpoint)
  for step in (1, 2):
    iterator.position = step
    ckpt.save(step, state_at(step), iterator, config, force=True)
  ckpt.wait()
  multihost_utils.sync_global_devices("both steps written")
  if jax.process_index() == 1:  # its own iterator file, which no other process reads
    with open(os.path.join(ckpt.directory, "2", "data_iter", "process_1-of-2.json"), "r+b") as f:
      f.truncate(os.path.getsize(f.name) // 2)
  multihost_utils.sync_global_devices("step 2 damaged on process 1")
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                          state_at(0))
  seen = {"process": jax.process_index()}
  try:
    ckpt.restore_latest(abstract, iterator, fallback=False)
    seen["strict"] = "restored"
  except checkpointing.CorruptCheckpointError as e:
    seen["strict"] = f"CorruptCheckpointError: {e}"
  step, state = ckpt.restore_latest(abstract, iterator, fallback=True)
  seen["fallback_step"] = step
  seen["values"] = sorted({float(v) for s in state["w"].addressable_shards
                           for v in np.asarray(s.data)})
  seen["iterator_position"] = iterator.position
  seen["steps_left"] = sorted(ckpt.manager.all_steps())
  ckpt.close()
  with open(f"{args.result}.{jax.process_index()}", "w") as f:
    json.dump(seen, f)
  multihost_utils.sync_global_devices("done")


if __name__ == "__main__":
  main()
