"""The device mesh: axes `data, fsdp, sequence, tensor`, single- and multi-host.

Axis order is outermost to innermost: `tensor` (all-reduces every layer) and `sequence` (a K/V
hop every ring step) are the innermost axes, so `mesh_utils.create_device_mesh` puts them on
neighbouring devices (one host's NVLink / one TPU slice's ICI); `data` and `fsdp` take the slow
links between hosts or slices (`create_hybrid_device_mesh` with the DCN part carved from them).

All axes are `AxisType.Auto` (GSPMD propagation, `with_sharding_constraint`): this is the one
place that chooses axis types. The attention math that Explicit axes would reject lives inside
`jax.shard_map` (ring_attention.py).
"""

from collections.abc import Mapping
import logging
import math
import os

import jax
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh
import numpy as np

MESH_AXES = ("data", "fsdp", "sequence", "tensor")
# Axes that may span hosts/slices, the ones with the least traffic per step first.
_DCN_AXES_ORDER = ("data", "fsdp", "sequence", "tensor")


def resolve_axis_sizes(sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Fills in one -1 ("the rest") and checks the product equals `num_devices`.

  `sizes` may omit axes (size 1) and may be any mapping (dict, ml_collections ConfigDict).
  """
  unknown = set(sizes.keys()) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; the axes are {MESH_AXES}")
  resolved = {a: int(sizes[a]) if a in sizes else 1 for a in MESH_AXES}
  rest = [a for a, s in resolved.items() if s == -1]
  bad = [a for a, s in resolved.items() if s < 1 and s != -1]
  if bad or len(rest) > 1:
    raise ValueError(f"mesh sizes {resolved}: sizes must be >= 1, with at most one -1 (the rest)")
  known = math.prod(s for s in resolved.values() if s != -1)
  if rest:
    if num_devices % known:
      raise ValueError(f"mesh sizes {resolved}: {num_devices} devices are not divisible by the "
                       f"product {known} of the fixed axes, so {rest[0]}=-1 has no integer size")
    resolved[rest[0]] = num_devices // known
  if math.prod(resolved.values()) != num_devices:
    raise ValueError(f"mesh sizes {resolved} multiply to {math.prod(resolved.values())}, but "
                     f"there are {num_devices} devices; set one axis to -1 to take the rest")
  return resolved


def split_dcn(shape: Mapping[str, int], num_granules: int) -> tuple[dict[str, int], dict[str, int]]:
  """Splits axis sizes into (within-granule, across-granule) parts, `data` first.

  A granule is a host (GPU) or slice (TPU); the across-granule sizes multiply to num_granules.
  """
  ici, dcn, left = dict(shape), {a: 1 for a in shape}, num_granules
  for axis in _DCN_AXES_ORDER:
    take = math.gcd(ici[axis], left)
    ici[axis] //= take
    dcn[axis] = take
    left //= take
  if left != 1:
    raise ValueError(f"cannot spread mesh {dict(shape)} over {num_granules} hosts/slices: the "
                     f"axis sizes must absorb the host count (make data or fsdp a multiple of it)")
  if dcn["tensor"] > 1 or dcn["sequence"] > 1:
    logging.warning("mesh %s puts sequence/tensor across hosts (%s): expect slow collectives",
                    dict(shape), dcn)
  return ici, dcn


def _granules(devices) -> tuple[int, bool]:
  """(number of slices or hosts, whether a granule is a process rather than a TPU slice)."""
  slices = {getattr(d, "slice_index", 0) for d in devices}
  if len(slices) > 1:
    return len(slices), False
  return len({d.process_index for d in devices}), True


def make_mesh(sizes: Mapping[str, int] | None = None, *, devices=None) -> Mesh:
  """The training mesh over `devices` (default: all) with axes MESH_AXES.

  Args:
    sizes: axis -> size; omitted axes are 1 and one axis may be -1 (default: fsdp=-1).
    devices: devices to use (default jax.devices()).
  """
  devices = list(devices if devices is not None else jax.devices())
  resolved = resolve_axis_sizes(sizes if sizes is not None else {"fsdp": -1}, len(devices))
  shape = [resolved[a] for a in MESH_AXES]
  num_granules, process_is_granule = _granules(devices)
  platform = devices[0].platform
  if num_granules > 1:
    ici, dcn = split_dcn(resolved, num_granules)
    grid = mesh_utils.create_hybrid_device_mesh(
        [ici[a] for a in MESH_AXES], [dcn[a] for a in MESH_AXES], devices,
        process_is_granule=process_is_granule, allow_split_physical_axes=True)
  elif platform == "cpu":
    # No topology to optimize; keep device ids in order (simulated devices in tests).
    grid = np.array(devices).reshape(shape)
  else:
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _in_cluster() -> bool:
  """Whether the environment looks like a multi-process launch that JAX can auto-detect.

  ULTRALONG_DISTRIBUTED=1 says so explicitly (the launchers set it: on a Cloud TPU VM slice the
  worker list lives in the metadata server, not the environment), =0 says no.
  """
  env = os.environ
  forced = env.get("ULTRALONG_DISTRIBUTED", "").strip().lower()
  if forced in ("1", "true", "yes"):
    return True
  if forced in ("0", "false", "no"):
    return False
  if int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return True
  # Cloud TPU VMs under GKE: a multi-host slice lists several worker hostnames.
  return len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def _expand_slurm_counts(spec: str) -> list[int]:
  """SLURM's compressed per-node counts, "8(x2),4" -> [8, 8, 4]."""
  counts = []
  for part in filter(None, spec.split(",")):
    value, _, repeat = part.partition("(x")
    counts += [int(value)] * (int(repeat.rstrip(")")) if repeat else 1)
  return counts


def slurm_local_device_ids(env: Mapping[str, str] | None = None) -> list[int] | None:
  """The GPUs this SLURM task should drive, or None to leave the choice to JAX.

  JAX's SLURM detection gives task i of a node the single GPU [SLURM_LOCALID] (one process per
  GPU, jax/_src/clusters/cluster.py). That is right when every task sees all of the node's GPUs,
  but a task per node would then drive GPU 0 alone, and with one GPU bound per task (srun
  --gpus-per-task=1: CUDA_VISIBLE_DEVICES holds one id) ordinal SLURM_LOCALID does not exist.
  Returns all visible GPUs for one task per node, [0] for one bound GPU per task, else None.
  JAX_LOCAL_DEVICE_IDS (read by JAX itself) wins over all of this.
  """
  env = os.environ if env is None else env
  if "SLURM_JOB_ID" not in env or "SLURM_LOCALID" not in env or env.get("JAX_LOCAL_DEVICE_IDS"):
    return None
  visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
  per_node = _expand_slurm_counts(env.get("SLURM_STEP_TASKS_PER_NODE")
                                  or env.get("SLURM_TASKS_PER_NODE", ""))
  node = int(env.get("SLURM_NODEID", "0"))
  tasks_here = per_node[node] if node < len(per_node) else None
  if tasks_here == 1:
    gpus = len(visible) or int(env.get("SLURM_GPUS_ON_NODE", "0") or 0)
    if gpus:
      return list(range(gpus))
    logging.warning("one SLURM task on this node but its GPU count is unknown (neither "
                    "CUDA_VISIBLE_DEVICES nor SLURM_GPUS_ON_NODE is set): JAX will drive GPU 0 "
                    "only. Set JAX_LOCAL_DEVICE_IDS=0,1,...,7.")
    return None
  if len(visible) == 1:
    return [0]
  return None


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None,
                           local_device_ids: list[int] | None = None) -> bool:
  """Starts JAX's multi-controller runtime when there is more than one process.

  Call before any other JAX call. With `coordinator_address` ("host:port") the launch is explicit;
  otherwise `jax.distributed.initialize()` auto-detects Cloud TPU, SLURM and Open MPI when the
  environment says there are several processes (or ULTRALONG_DISTRIBUTED=1), and a single process
  runs without it. Under SLURM the GPUs each task drives follow `slurm_local_device_ids`.
  ULTRALONG_INIT_TIMEOUT (seconds, default 300) bounds the wait for the other processes.
  Returns whether the distributed runtime is (now) initialized.
  """
  is_initialized = getattr(jax.distributed, "is_initialized", None)
  if is_initialized is not None and is_initialized():
    return True
  if coordinator_address is None and not _in_cluster():
    return False
  if local_device_ids is None:
    local_device_ids = slurm_local_device_ids()
  # How long a process waits for all the others to connect (JAX's default: 300 s).
  timeout = int(os.environ.get("ULTRALONG_INIT_TIMEOUT", "300"))
  logging.info("jax.distributed.initialize: coordinator %s, process %s of %s, local devices %s, "
               "timeout %d s", coordinator_address or "auto-detected", process_id,
               num_processes, local_device_ids or "all", timeout)
  if coordinator_address is not None:
    jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids,
                               initialization_timeout=timeout)
  else:
    jax.distributed.initialize(local_device_ids=local_device_ids, initialization_timeout=timeout)
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True
