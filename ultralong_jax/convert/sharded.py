"""Hugging Face safetensors -> sharded global arrays, each process reading only what it holds.

    params = load_hf_params_sharded(reader, config, shardings)   # shardings: the params tree's

Each project array is built with `jax.make_array_from_single_device_arrays` from one slice per
addressable device; a slice is read from the safetensors files through `safe_open(...).get_slice`
(memory-mapped, only the rows/columns it covers), never as the whole HF tensor. With P processes
each host reads and holds about 1/P of the weights (replicated dimensions aside), which is what
makes a 70B load fit in host RAM.

The HF <-> project layout change of each tensor is `hf._layer_mappings`' own `to_project` function
(a transpose and/or a reshape that splits an axis). `hf_region` runs it on an untouched placeholder
array and reads the strides of the view it returns: they say which HF rows/columns a slice of the
project array covers and how to lay them out, so the slicing follows the table without a second,
hand-written copy of each layout.
"""

from __future__ import annotations

import ctypes
from typing import Callable, Sequence

import jax
import numpy as np

from ultralong_jax.convert import hf
from ultralong_jax.modeling.config import LlamaConfig
from ultralong_jax.modeling.llama import layer_param_shapes

Index = tuple[slice, ...]


def hf_region(to_project: Callable[[np.ndarray], np.ndarray], hf_shape: Sequence[int],
              index: Index) -> tuple[Index, list[tuple[int, int]]]:
  """Which part of an HF tensor a slice of its project-layout array covers.

  `to_project` maps the HF array (shape `hf_shape`) to the project layout by views only; `index`
  is a tuple of unit-step slices into that layout. Returns (box, steps): `box` the slices of the
  HF tensor to read, and per project axis of the slice, (HF axis, step along it) or (-1, 0) for
  an axis of length 1. `from_region(region, steps, shape)` then lays the read box out.
  """
  hf_shape = tuple(int(n) for n in hf_shape)
  base = np.empty(hf_shape, np.int8)  # never written or read: only its addresses are used
  view = to_project(base)[index]
  if not np.may_share_memory(view, base):
    raise ValueError(f"the HF->project mapping of a {hf_shape} tensor copies instead of viewing; "
                     "sharded loading needs transposes and reshapes that split an axis.")
  strides = base.strides  # int8: element strides
  offset = view.__array_interface__["data"][0] - base.__array_interface__["data"][0]
  start = [int(c) for c in np.unravel_index(offset, hf_shape)] if view.size else [0] * len(hf_shape)
  extent = [0] * len(hf_shape)
  steps = []
  for n, stride in zip(view.shape, view.strides):
    if n == 1:
      steps.append((-1, 0))
      continue
    axis = next((a for a in range(len(hf_shape)) if 0 < strides[a] <= stride), None)
    if axis is None or stride % strides[axis]:
      raise ValueError(f"a project axis of stride {stride} is not a step along one axis of the HF "
                       f"tensor {hf_shape}")
    step = stride // strides[axis]
    steps.append((axis, step))
    extent[axis] += (n - 1) * step
  for a, n in enumerate(hf_shape):
    if start[a] + extent[a] >= n:  # a carry into the next axis: not a box
      raise ValueError(f"slice {index} of the project layout of an HF {hf_shape} tensor is not a "
                       "box of it")
  box = tuple(slice(s, s + e + 1) for s, e in zip(start, extent))
  return box, steps


def from_region(region: np.ndarray, steps: list[tuple[int, int]], shape: Sequence[int]
                ) -> np.ndarray:
  """A read-only view, in the project layout of `shape`, of the HF box `region` read per
  `hf_region` (copy it, or assign it into a buffer)."""
  strides = [0 if axis < 0 else step * region.strides[axis] for axis, step in steps]
  return np.lib.stride_tricks.as_strided(region, shape=tuple(shape), strides=strides,
                                         writeable=False)


def _identity(w):
  return w


def _transpose(w):
  return w.T


def tensor_sources(config: LlamaConfig) -> dict[tuple, tuple[list[str], tuple, Callable]]:
  """Project path -> (HF names, one per stacked layer or a single one; HF shape; to_project)."""
  L, V, D = config.num_layers, config.vocab_size, config.hidden_size
  shapes = layer_param_shapes(config)
  sources = {("embed",): (["model.embed_tokens.weight"], (V, D), _identity)}
  for name, hf_suffix, (to_project, _) in hf._layer_mappings(config):  # pylint: disable=protected-access
    hf_shape = hf._hf_shape(config, name, shapes[name][0])  # pylint: disable=protected-access
    sources[("layers", name)] = ([f"model.layers.{i}.{hf_suffix}" for i in range(L)], hf_shape,
                                 to_project)
  sources[("final_norm",)] = (["model.norm.weight"], (D,), _identity)
  if not config.tie_word_embeddings:
    sources[("lm_head",)] = (["lm_head.weight"], (V, D), _transpose)
  return sources


def read_slice(reader: hf.SafetensorsReader, names: list[str], hf_shape: tuple, to_project,
               index: Index, stacked: bool, dtype=None) -> np.ndarray:
  """One device's slice `index` (unit-step slices with bounds) of a project array, read from the
  HF tensor(s) `names` (stacked: the first index is over layers, one HF tensor per layer)."""
  layers = range(len(names))[index[0]] if stacked else [0]
  inner = index[1:] if stacked else index
  box, steps = hf_region(to_project, hf_shape, inner)
  shape = tuple(s.stop - s.start for s in inner)  # `index` is _normalized
  out = None
  for j, i in enumerate(layers):
    region = reader.get_slice(names[i], box)
    if out is None:
      out = np.empty(((len(layers),) if stacked else ()) + shape,
                     dtype if dtype is not None else region.dtype)
    (out[j] if stacked else out)[...] = from_region(region, steps, shape)
    del region
  return out


def check_hf_shapes(reader: hf.SafetensorsReader, config: LlamaConfig) -> None:
  """Every tensor the config needs is there with its shape, and nothing else (headers only)."""
  plan = dict(hf.hf_tensor_plan(config))
  for name, shape in plan.items():
    stored = reader.shape(name)
    if stored != tuple(shape):
      raise ValueError(
          f"{reader.where(name)}: tensor {name!r} has shape {stored}, but config.json implies "
          f"{tuple(shape)}; the weights and config.json do not belong together.")
  allowed = set(plan) | ({"lm_head.weight"} if config.tie_word_embeddings else set())
  unexpected = [n for n in reader.keys()
                if n not in allowed and not n.endswith(hf._IGNORED_SUFFIXES)]  # pylint: disable=protected-access
  if unexpected:
    raise ValueError(
        f"{reader.hf_dir}: {len(unexpected)} tensor(s) a Llama with this config.json does not use, "
        f"e.g. {unexpected[:3]}; is it a Llama checkpoint, and are attention_bias / mlp_bias / "
        "tie_word_embeddings set right?")


def load_hf_params_sharded(reader: hf.SafetensorsReader, config: LlamaConfig, shardings: dict,
                           dtype=None) -> dict:
  """The project parameter tree as global jax arrays placed by `shardings` (a tree of
  jax.sharding.Sharding like the params), each process reading only its devices' slices.

  Call on every process (the arrays are global). One device slice is on the host at a time: it
  is read, cast to `dtype` (None: the stored dtype), put on its device and dropped. Devices with
  the same slice (replicated dimensions) share one read.
  """
  check_hf_shapes(reader, config)
  params: dict = {"layers": {}}
  for path, (names, hf_shape, to_project) in tensor_sources(config).items():
    stacked = path[0] == "layers"
    shape = ((len(names),) if stacked else ()) + tuple(to_project(
        np.empty(hf_shape, np.int8)).shape)
    sharding = shardings[path[0]] if not stacked else shardings["layers"][path[1]]
    by_slice: dict[tuple, list] = {}  # devices holding the same slice share one read
    for device, index in sharding.addressable_devices_indices_map(shape).items():
      index = _normalized(index, shape)
      by_slice.setdefault(tuple((s.start, s.stop) for s in index), [index]).append(device)
    arrays = {}
    for index, *devices in by_slice.values():
      host = read_slice(reader, names, hf_shape, to_project, index, stacked, dtype)
      arrays.update((d, jax.device_put(host, d)) for d in devices)
      del host
    arrays = [arrays[d] for d in sharding.addressable_devices_indices_map(shape)]
    array = jax.make_array_from_single_device_arrays(shape, sharding, arrays)
    del arrays
    _release_freed_host_memory()
    if stacked:
      params["layers"][path[1]] = array
    else:
      params[path[0]] = array
  return params


def _release_freed_host_memory() -> None:
  """Returns the host slices just freed to the OS. glibc serves allocations below its mmap
  threshold (which grows up to 32 MB) from its heaps and keeps them when freed, so without a
  trim the freed slices of one parameter add to the peak of the next (bench.convert, 1.25 GB,
  2 processes: peak 0.61 -> 0.57 x the weights). No-op where malloc_trim does not exist."""
  try:
    ctypes.CDLL(None).malloc_trim(0)
  except (OSError, AttributeError):
    pass


def _normalized(index, shape) -> Index:
  """Full unit-step slices (no None bounds) for each dimension of `shape`."""
  index = tuple(index) + (slice(None),) * (len(shape) - len(tuple(index)))
  out = []
  for s, n in zip(index, shape):
    start, stop, step = s.indices(n)
    if step != 1:
      raise ValueError(f"device slice {s} has step {step}; shardings give unit steps")
    out.append(slice(start, stop))
  return tuple(out)

