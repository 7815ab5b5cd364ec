"""The project's model checkpoint: an Orbax tree of parameters plus the model config as JSON.

Layout of a checkpoint directory C:
  C/model_config.json   LlamaConfig.to_json() (shape, RoPE, numerics)
  C/params/             Orbax StandardCheckpointer tree {"embed", "layers": {...}, ...}
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from ultralong_jax.modeling.config import LlamaConfig

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"


def is_project_checkpoint(path: str) -> bool:
  return os.path.exists(os.path.join(path, CONFIG_FILE))


def save_params(path: str, config: LlamaConfig, params: dict) -> None:
  """Writes `params` (numpy or jax arrays, the nnx pure-dict tree) and the config under `path`."""
  path = os.path.abspath(path)
  os.makedirs(path, exist_ok=True)
  params_dir = os.path.join(path, PARAMS_DIR)
  if os.path.exists(params_dir):
    raise FileExistsError(f"{params_dir} exists; choose a new --out directory or remove it.")
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(params_dir, params)
    checkpointer.wait_until_finished()
  with open(os.path.join(path, CONFIG_FILE), "w") as f:
    f.write(config.to_json())


def read_config(path: str, **overrides) -> LlamaConfig:
  config_path = os.path.join(path, CONFIG_FILE)
  if not os.path.exists(config_path):
    raise FileNotFoundError(
        f"{config_path} not found: a project checkpoint holds {CONFIG_FILE} and {PARAMS_DIR}/ "
        "(written by `python -m ultralong_jax.convert hf-to-jax`).")
  with open(config_path) as f:
    return LlamaConfig.from_json(f.read(), source=config_path, **overrides)


def _stored_params(path: str, abstract_params: dict) -> tuple[str, Any]:
  """(the parameters' directory, the stored tree's metadata), after checking the stored shapes
  against `abstract_params`."""
  params_dir = os.path.join(os.path.abspath(path), PARAMS_DIR)
  if not os.path.isdir(params_dir):
    raise FileNotFoundError(f"{params_dir} not found: the checkpoint is incomplete.")
  with ocp.StandardCheckpointer() as checkpointer:
    stored = checkpointer.metadata(params_dir)
  stored_tree = getattr(stored, "item_metadata", stored)
  stored_tree = getattr(stored_tree, "tree", stored_tree)
  _check_shapes(params_dir, stored_tree, abstract_params)
  return params_dir, stored_tree


def load_params(path: str, abstract_params: dict, dtype=None) -> dict:
  """Restores the parameter tree; `abstract_params` (ShapeDtypeStructs, shardings allowed) says
  the shapes, and where it carries shardings, the placement. Arrays are cast to `dtype` if given."""
  params_dir, stored_tree = _stored_params(path, abstract_params)
  with ocp.StandardCheckpointer() as checkpointer:
    # Restore in the stored dtype (no silent cast inside Orbax), then cast here. Without a
    # sharding an array goes to this process's first device: the one the checkpoint was written
    # from may not exist here (another process count or mesh).
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda a, m: jax.ShapeDtypeStruct(a.shape, m.dtype,
                                          sharding=getattr(a, "sharding", None) or local),
        abstract_params, stored_tree)
    params = checkpointer.restore(params_dir, target)
  if dtype is not None:
    params = jax.tree.map(lambda a: a.astype(dtype), params)
  return params


def param_getter(path: str, abstract_params: dict):
  """`get(tree_path)` -> numpy array of one parameter, restored alone from the checkpoint at
  `path` (Orbax partial restore onto this process's first device), for `hf.iter_hf_tensors`:
  an export holds one stacked parameter at a time, never the whole tree, whatever process
  count wrote the checkpoint."""
  params_dir, stored_tree = _stored_params(path, abstract_params)
  local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def get(tree_path: tuple) -> np.ndarray:
    meta = stored_tree
    for key in tree_path:
      meta = meta[key]
    item = jax.ShapeDtypeStruct(tuple(meta.shape), meta.dtype, sharding=local)
    for key in reversed(tree_path):
      item = {key: item}
    with ocp.PyTreeCheckpointer() as checkpointer:
      restored = checkpointer.restore(params_dir, args=ocp.args.PyTreeRestore(
          item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
          partial_restore=True))
    for key in tree_path:
      restored = restored[key]
    return host_array(restored)

  return get


def _check_shapes(where: str, stored, expected) -> None:
  stored_paths = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_leaves_with_path(stored)}
  for path, leaf in jax.tree_util.tree_leaves_with_path(expected):
    key = jax.tree_util.keystr(path)
    if key not in stored_paths:
      raise ValueError(f"{where}: parameter {key} is missing; checkpoint and model_config.json "
                       "do not belong together.")
    if tuple(stored_paths[key].shape) != tuple(leaf.shape):
      raise ValueError(f"{where}: parameter {key} has shape {tuple(stored_paths[key].shape)}, "
                       f"model_config.json implies {tuple(leaf.shape)}.")
  extra = set(stored_paths) - {jax.tree_util.keystr(p) for p, _ in
                               jax.tree_util.tree_leaves_with_path(expected)}
  if extra:
    raise ValueError(f"{where}: parameters {sorted(extra)[:3]} are not in the model.")


def host_array(a) -> np.ndarray:
  """A numpy view/copy of one array (gathered if sharded across devices of this process)."""
  return np.asarray(jax.device_get(a))
