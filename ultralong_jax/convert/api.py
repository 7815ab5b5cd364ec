"""`from_pretrained` and `save_pretrained`: Hugging Face Llama directories in and out.

    model = ultralong_jax.from_pretrained("Llama-3.1-8B-Instruct", rope_scaling=ultralong_rope_scaling(128))
    ultralong_jax.save_pretrained(model, "out/UltraLong-8B-1M", tokenizer_dir="Llama-3.1-8B-Instruct")
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from ultralong_jax.convert import checkpoint, hf, sharded
from ultralong_jax.modeling.config import LlamaConfig
from ultralong_jax.modeling.llama import Llama, abstract_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "generation_config.json", "chat_template.jinja")
MAX_SHARD_BYTES = 5 * 1000**3  # transformers' default max_shard_size="5GB"


def _rope_overrides(rope_scaling, max_position_embeddings) -> dict[str, Any]:
  overrides: dict[str, Any] = {}
  if rope_scaling is not None:
    overrides["rope_scaling"] = rope_scaling
    if max_position_embeddings is None and "original_max_position_embeddings" in rope_scaling:
      # e.g. llama3 factor 128 over 8K -> 1,048,576 (UltraLong-1M's max_position_embeddings).
      max_position_embeddings = int(rope_scaling["factor"] *
                                    rope_scaling["original_max_position_embeddings"])
  if max_position_embeddings is not None:
    overrides["max_position_embeddings"] = max_position_embeddings
  return overrides


def load_config(path: str, rope_scaling: Mapping[str, Any] | None = None,
                max_position_embeddings: int | None = None, **config_overrides) -> LlamaConfig:
  """The LlamaConfig of a HF directory or project checkpoint, with overrides applied."""
  overrides = {**_rope_overrides(rope_scaling, max_position_embeddings), **config_overrides}
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path} is not a directory: give a Hugging Face model directory "
                            "(config.json + *.safetensors) or a project checkpoint "
                            "(model_config.json + params/).")
  if checkpoint.is_project_checkpoint(path):
    return checkpoint.read_config(path, **overrides)
  return LlamaConfig.from_hf_dict(hf.read_hf_config(path),
                                  source=os.path.join(path, "config.json"), **overrides)


def from_pretrained(
    path: str, dtype=jnp.float32, *, rope_scaling: Mapping[str, Any] | None = None,
    max_position_embeddings: int | None = None, compute_dtype=None,
    attention_fn: Callable[..., jax.Array] | None = None, **config_overrides,
) -> Llama:
  """Loads a Llama from a HF directory (config.json + safetensors, single or sharded) or from a
  project checkpoint (`python -m ultralong_jax.convert hf-to-jax`).

  dtype: parameter dtype (fp32 master weights by default); compute_dtype: matmul dtype (defaults
  to dtype). rope_scaling replaces the checkpoint's RoPE scaling, which is how stage 1 turns
  Llama-3.1-8B-Instruct into a 1M model; max_position_embeddings then defaults to
  factor x original_max_position_embeddings. Other keyword arguments override LlamaConfig fields
  (e.g. remat_policy).
  """
  dtype = jnp.dtype(dtype)
  config = load_config(path, rope_scaling, max_position_embeddings,
                       param_dtype=dtype.name, dtype=jnp.dtype(compute_dtype or dtype).name,
                       **config_overrides)
  graphdef, abstract_state = nnx.split(abstract_model(config, attention_fn=attention_fn))
  if checkpoint.is_project_checkpoint(path):
    params = checkpoint.load_params(path, nnx.to_pure_dict(abstract_state), dtype=dtype)
  else:
    reader = hf.SafetensorsReader(path)
    # Each stacked parameter goes to the device as soon as it is assembled, so the host never
    # holds more than one of them besides what the device backend keeps.
    params = hf.load_hf_params(reader, config, dtype=np.dtype(dtype),
                               put=lambda _, a: jnp.asarray(a))
  nnx.replace_by_pure_dict(abstract_state, params)
  return nnx.merge(graphdef, abstract_state)


def load_params(path: str, config: LlamaConfig, shardings: dict) -> dict:
  """The parameter tree of a HF directory or project checkpoint as global arrays placed by
  `shardings` (NamedShardings shaped like the tree), in config.param_dtype.

  Multi-host: call on every process; each reads only the slices its own devices hold (Orbax
  restores by shard; safetensors through `sharded.load_hf_params_sharded`), so no host ever
  holds the whole model.
  """
  dtype = np.dtype(config.param_dtype)
  if checkpoint.is_project_checkpoint(path):
    abstract = nnx.to_pure_dict(nnx.state(abstract_model(config), nnx.Param))
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
    return checkpoint.load_params(path, abstract, dtype=dtype)
  return sharded.load_hf_params_sharded(hf.SafetensorsReader(path), config, shardings,
                                        dtype=dtype)


def model_params(model: Llama) -> dict:
  """The model's parameters as the project's pure-dict tree (arrays, not Variables)."""
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def params_getter(params: dict) -> Callable[[tuple], np.ndarray]:
  def get(path):
    node = params
    for key in path:
      node = node[key]
    return checkpoint.host_array(node)
  return get


def write_safetensors(
    out_dir: str, config: LlamaConfig, get: Callable[[tuple], np.ndarray], dtype=None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> list[str]:
  """Writes HF safetensors shards (<= max_shard_bytes each, with an index when there are several).

  The shard plan is computed from shapes first, so file names are final (`-of-N`) and each shard's
  tensors are the only ones held in memory while it is written.
  """
  dtype = np.dtype(dtype) if dtype is not None else np.dtype(config.param_dtype)
  plan = hf.hf_tensor_plan(config)
  shard_of, shards, size = {}, [[]], 0
  for name, shape in plan:
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += nbytes
    shard_of[name] = len(shards) - 1
  n = len(shards)
  names = ([hf.SINGLE_FILE] if n == 1 else
           [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
  pending: dict[str, np.ndarray] = {}
  current = 0
  total = 0
  for name, array in hf.iter_hf_tensors(config, get):
    if shard_of[name] != current:
      save_file(pending, os.path.join(out_dir, names[current]), metadata={"format": "pt"})
      pending, current = {}, shard_of[name]
    pending[name] = np.ascontiguousarray(array.astype(dtype, copy=False))
    total += pending[name].nbytes
  save_file(pending, os.path.join(out_dir, names[current]), metadata={"format": "pt"})
  if n > 1:
    index = {"metadata": {"total_size": total},
             "weight_map": {name: names[shard_of[name]] for name, _ in plan}}
    with open(os.path.join(out_dir, hf.INDEX_FILE), "w") as f:
      json.dump(index, f, indent=2)
  return names


def export_hf(out_dir: str, config: LlamaConfig, get: Callable[[tuple], np.ndarray], *,
              tokenizer_dir: str | None = None, dtype=None,
              max_shard_bytes: int = MAX_SHARD_BYTES) -> str:
  """config.json + safetensors (+ tokenizer files) for a parameter source `get(path)`."""
  os.makedirs(out_dir, exist_ok=True)
  dtype_name = np.dtype(dtype).name if dtype is not None else config.param_dtype
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config.to_hf_dict(torch_dtype=dtype_name), f, indent=2)
  write_safetensors(out_dir, config, get, dtype=dtype, max_shard_bytes=max_shard_bytes)
  if tokenizer_dir is not None:
    copied = [n for n in TOKENIZER_FILES if os.path.exists(os.path.join(tokenizer_dir, n))]
    if not copied:
      raise FileNotFoundError(f"{tokenizer_dir} holds none of {TOKENIZER_FILES}.")
    for name in copied:
      shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(out_dir, name))
  return out_dir


def save_pretrained(model: Llama, out_dir: str, *, tokenizer_dir: str | None = None, dtype=None,
                    max_shard_bytes: int = MAX_SHARD_BYTES) -> str:
  """Writes a HF directory that `transformers.AutoModelForCausalLM.from_pretrained` loads.

  config.json carries the model's rope_scaling and max_position_embeddings; weights are saved in
  `dtype` (default: the parameter dtype; "bfloat16" halves the size). Returns out_dir.
  """
  return export_hf(out_dir, model.config, params_getter(model_params(model)),
                   tokenizer_dir=tokenizer_dir, dtype=dtype, max_shard_bytes=max_shard_bytes)
