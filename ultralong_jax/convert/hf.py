"""Hugging Face safetensors (Llama, Mistral, Qwen2, Qwen3) <-> the project's parameter tree,
tensor by tensor. The four families share transformers' Llama tensor names; the optional
per-layer tensors (biases, q/k norms) are rows of `_layer_mappings` like the others.

The project tree (nnx.to_pure_dict of a Llama) is
  {"embed": [V,D], "layers": {"wq": [L,D,N,H], ...}, "final_norm": [D], "lm_head": [D,V]}.
HF stores per-layer torch Linear weights [out, in]; each mapping below names the HF tensor and the
reshape between the two layouts. Only safetensors are read: pickle-based .bin/.pt files can run
code when loaded.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Iterator

import numpy as np
from safetensors import safe_open

from ultralong_jax.modeling.config import LlamaConfig
from ultralong_jax.modeling.llama import layer_param_shapes

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Older Llama exports saved RoPE buffers; they are recomputed from the config, never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _layer_mappings(config: LlamaConfig):
  """(project name, HF name suffix, to_project(hf_array), to_hf(project_array)) per layer tensor."""
  D, N, K, H = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim

  def proj_in(heads):  # torch [heads*H, D] <-> ours [D, heads, H]
    return (lambda w: w.T.reshape(D, heads, H), lambda w: w.reshape(D, heads * H).T)

  identity = (lambda w: w, lambda w: w)
  transpose = (lambda w: w.T, lambda w: w.T)
  table = {
      "attn_norm": ("input_layernorm.weight", identity),
      "wq": ("self_attn.q_proj.weight", proj_in(N)),
      "wk": ("self_attn.k_proj.weight", proj_in(K)),
      "wv": ("self_attn.v_proj.weight", proj_in(K)),
      "wo": ("self_attn.o_proj.weight",
             (lambda w: w.T.reshape(N, H, D), lambda w: w.reshape(N * H, D).T)),
      "mlp_norm": ("post_attention_layernorm.weight", identity),
      "w_gate": ("mlp.gate_proj.weight", transpose),
      "w_up": ("mlp.up_proj.weight", transpose),
      "w_down": ("mlp.down_proj.weight", transpose),
      "bq": ("self_attn.q_proj.bias", (lambda b: b.reshape(N, H), lambda b: b.reshape(N * H))),
      "bk": ("self_attn.k_proj.bias", (lambda b: b.reshape(K, H), lambda b: b.reshape(K * H))),
      "bv": ("self_attn.v_proj.bias", (lambda b: b.reshape(K, H), lambda b: b.reshape(K * H))),
      "bo": ("self_attn.o_proj.bias", identity),
      "b_gate": ("mlp.gate_proj.bias", identity),
      "b_up": ("mlp.up_proj.bias", identity),
      "b_down": ("mlp.down_proj.bias", identity),
      "q_norm": ("self_attn.q_norm.weight", identity),  # Qwen3
      "k_norm": ("self_attn.k_norm.weight", identity),
  }
  return [(name, *table[name]) for name in layer_param_shapes(config)]


def _hf_shape(config: LlamaConfig, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The HF shape of a per-layer project tensor of `shape` (without L)."""
  return _to_hf_dummy(config, name, shape).shape


def _to_hf_dummy(config, name, shape):
  to_hf = {n: fns[1] for n, _, fns in _layer_mappings(config)}[name]
  return to_hf(np.empty(shape, dtype=np.int8))


# --- reading ------------------------------------------------------------------------------------


def read_hf_config(hf_dir: str) -> dict:
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isdir(hf_dir):
    raise FileNotFoundError(f"{hf_dir} is not a directory; pass a Hugging Face model directory.")
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path} not found: a Hugging Face model directory holds config.json next to its "
        "*.safetensors files.")
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg}).") from None


class SafetensorsReader:
  """Lazy, memory-mapped access to the tensors of a (possibly sharded) safetensors checkpoint."""

  def __init__(self, hf_dir: str):
    self.hf_dir = hf_dir
    index_path = os.path.join(hf_dir, INDEX_FILE)
    single_path = os.path.join(hf_dir, SINGLE_FILE)
    if os.path.exists(index_path):
      with open(index_path) as f:
        self.weight_map = json.load(f)["weight_map"]
    elif os.path.exists(single_path):
      with safe_open(single_path, framework="numpy") as f:
        self.weight_map = {name: SINGLE_FILE for name in f.keys()}
    else:
      unsafe = [n for n in os.listdir(hf_dir) if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
      hint = (f" It has {unsafe}: pickle-based files are never loaded (they can execute code); "
              "re-save the model with `save_pretrained(..., safe_serialization=True)`." if unsafe
              else "")
      raise FileNotFoundError(f"{hf_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}.{hint}")

  def keys(self) -> list[str]:
    return list(self.weight_map)

  def get(self, name: str) -> np.ndarray:
    """A copy of one tensor. The file is opened per call: a mapping kept open would leave every
    page read so far resident in this process (a second copy of the weights in RSS)."""
    if name not in self.weight_map:
      raise KeyError(f"tensor {name!r} is missing from the checkpoint in {self.hf_dir}.")
    path = os.path.join(self.hf_dir, self.weight_map[name])
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} is listed in {INDEX_FILE} but missing.")
    with safe_open(path, framework="numpy") as f:
      return f.get_tensor(name)

  def where(self, name: str) -> str:
    return os.path.join(self.hf_dir, self.weight_map.get(name, "?"))

  def _path(self, name: str) -> str:
    if name not in self.weight_map:
      raise KeyError(f"tensor {name!r} is missing from the checkpoint in {self.hf_dir}.")
    path = os.path.join(self.hf_dir, self.weight_map[name])
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} is listed in {INDEX_FILE} but missing.")
    return path

  def shape(self, name: str) -> tuple[int, ...]:
    """A tensor's shape, from its file's header (no data read)."""
    with safe_open(self._path(name), framework="numpy") as f:
      return tuple(f.get_slice(name).get_shape())

  def get_slice(self, name: str, box: tuple[slice, ...], block_bytes: int = 16 << 20
                ) -> np.ndarray:
    """A copy of `tensor[box]` (one unit-step slice per dimension), read through the memory map
    in blocks of leading-axis rows. The pages a read touches stay resident while the map is
    open, and a column slice touches whole rows, so each block's map is closed before the next
    one opens: the host holds the result plus at most ~block_bytes of mapped file."""
    path = self._path(name)
    with safe_open(path, framework="numpy") as f:
      view = f.get_slice(name)
      shape, dtype = tuple(view.get_shape()), view.get_dtype()
      rows = range(shape[0])[box[0]] if shape else range(0)
      if len(shape) < 2 or not rows:  # vectors (norms, biases) are small
        return view[box]
    row_bytes = int(np.prod(shape[1:])) * _DTYPE_BYTES.get(dtype, 8)
    step = max(1, block_bytes // max(row_bytes, 1))
    out = None
    for r in range(rows.start, rows.stop, step):
      with safe_open(path, framework="numpy") as f:
        block = f.get_slice(name)[(slice(r, min(r + step, rows.stop)), *box[1:])]
      if out is None:
        out = np.empty((len(rows), *block.shape[1:]), block.dtype)
      out[r - rows.start:r - rows.start + len(block)] = block
    return out


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "BOOL": 1}


def _checked(reader: SafetensorsReader, name: str, expected: tuple[int, ...]) -> np.ndarray:
  array = reader.get(name)
  if tuple(array.shape) != tuple(expected):
    raise ValueError(
        f"{reader.where(name)}: tensor {name!r} has shape {tuple(array.shape)}, but config.json "
        f"implies {tuple(expected)}; the weights and config.json do not belong together.")
  return array


def load_hf_params(
    reader: SafetensorsReader, config: LlamaConfig, dtype: np.dtype | None = None,
    put: Callable[[tuple, np.ndarray], object] = lambda path, a: a,
) -> dict:
  """Reads HF tensors into the project tree, one stacked parameter at a time.

  `put(path, array)` receives each finished host array (e.g. to device_put it) so at most one
  stacked parameter is held on the host beyond what `put` keeps. `dtype` None keeps the stored one.
  """
  L, V, D = config.num_layers, config.vocab_size, config.hidden_size
  used = set()

  def read(name, shape):
    used.add(name)
    a = _checked(reader, name, shape)
    return a if dtype is None else a.astype(dtype)

  params = {"embed": put(("embed",), read("model.embed_tokens.weight", (V, D))), "layers": {}}
  shapes = layer_param_shapes(config)
  for name, hf_suffix, (to_project, _) in _layer_mappings(config):
    shape = shapes[name][0]
    hf_shape = _hf_shape(config, name, shape)
    stacked = None
    for i in range(L):
      a = to_project(read(f"model.layers.{i}.{hf_suffix}", hf_shape))
      if stacked is None:
        stacked = np.empty((L, *shape), dtype=a.dtype)
      stacked[i] = a
    params["layers"][name] = put(("layers", name), stacked)
    del stacked
  params["final_norm"] = put(("final_norm",), read("model.norm.weight", (D,)))
  if not config.tie_word_embeddings:
    params["lm_head"] = put(("lm_head",), read("lm_head.weight", (V, D)).T)
  elif "lm_head.weight" in reader.weight_map:
    used.add("lm_head.weight")  # some exports store the tied head too; it equals embed_tokens
  unexpected = [n for n in reader.keys() if n not in used and not n.endswith(_IGNORED_SUFFIXES)]
  if unexpected:
    raise ValueError(
        f"{reader.hf_dir}: {len(unexpected)} tensor(s) a Llama with this config.json does not use, "
        f"e.g. {unexpected[:3]}; is it a Llama checkpoint, and are attention_bias / mlp_bias / "
        "tie_word_embeddings set right?")
  return params


# --- writing ------------------------------------------------------------------------------------


def hf_tensor_plan(config: LlamaConfig) -> list[tuple[str, tuple[int, ...]]]:
  """Every HF tensor name with its shape, in the order they are written."""
  L, V, D = config.num_layers, config.vocab_size, config.hidden_size
  shapes = layer_param_shapes(config)
  plan = [("model.embed_tokens.weight", (V, D))]
  for name, hf_suffix, _ in _layer_mappings(config):
    for i in range(L):
      plan.append((f"model.layers.{i}.{hf_suffix}", _hf_shape(config, name, shapes[name][0])))
  plan.append(("model.norm.weight", (D,)))
  if not config.tie_word_embeddings:
    plan.append(("lm_head.weight", (V, D)))
  return plan


def iter_hf_tensors(config: LlamaConfig, get: Callable[[tuple], np.ndarray]
                    ) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (HF name, array) in `hf_tensor_plan` order; `get(path)` returns a project array.

  Parameter-major order (q_proj of every layer, then k_proj, ...): each stacked parameter is
  fetched once, sliced per layer and released, so the host holds one stacked parameter at a time.
  transformers loads shards in any order through the index.
  """
  yield "model.embed_tokens.weight", get(("embed",))
  for name, hf_suffix, (_, to_hf) in _layer_mappings(config):
    stacked = get(("layers", name))
    for i in range(config.num_layers):
      yield f"model.layers.{i}.{hf_suffix}", np.ascontiguousarray(to_hf(stacked[i]))
    del stacked
  yield "model.norm.weight", get(("final_norm",))
  if not config.tie_word_embeddings:
    yield "lm_head.weight", np.ascontiguousarray(get(("lm_head",)).T)
