"""Pre-flight checks that run after `config.validate` and before anything compiles.

  preflight.check(c, model_cfg)

`validate` checks the config against itself and the device count; this checks it against the
world: the data files it names exist and are readable, the tokenizer's vocabulary fits the
model's embedding, and (on accelerators) an analytic memory estimate fits the device. Each error
names the config key, so a bad run fails in seconds instead of after an hour of compiling and
loading on hundreds of hosts.
"""

from __future__ import annotations

import glob
import math
import os

import jax
import ml_collections

from ultralong_jax.data.tokenizer import load_tokenizer
from ultralong_jax.modeling.config import LlamaConfig

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def check(c: ml_collections.ConfigDict, model_cfg: LlamaConfig) -> None:
  """Raises ValueError naming the first key whose files, tokenizer or memory would fail."""
  flags = c.get("preflight", ml_collections.ConfigDict())
  if flags.get("check_paths", True):
    check_paths(c.data)
    check_tokenizer_vocab(c.data, model_cfg)
  if flags.get("check_memory", True):
    check_memory(c, model_cfg)


def _readable_file(key: str, path: str) -> None:
  if not os.path.exists(path):
    raise ValueError(f"{key}: {path} does not exist.")
  if not os.access(path, os.R_OK) or (os.path.isdir(path) and not os.access(path, os.X_OK)):
    raise ValueError(f"{key}: {path} is not readable by this user.")


def check_paths(data: ml_collections.ConfigDict) -> None:
  """Stage 1: every domain's prepared directory holds files; stage 2: every chat glob matches a
  readable file; both: the tokenizer (where set) exists."""
  if data.get("tokenizer"):
    _readable_file("data.tokenizer", data.tokenizer)
  if data.stage == 1:
    for name, dom in data.domains.items():
      key = f"data.domains.{name}.path"
      _readable_file(key, dom.path)
      if not os.path.isdir(dom.path) or not os.listdir(dom.path):
        raise ValueError(f"{key}: {dom.path} is not a non-empty directory; prepare it with "
                         "python -m ultralong_jax.data.prepare --output_dir=...")
  else:
    for pattern in (p.strip() for p in data.chat_files.split(",") if p.strip()):
      files = sorted(glob.glob(pattern))
      if not files:
        raise ValueError(f"data.chat_files: {pattern!r} matches no file.")
      for path in files:
        _readable_file("data.chat_files", path)


def check_tokenizer_vocab(data: ml_collections.ConfigDict, model_cfg: LlamaConfig) -> None:
  """A token id the embedding cannot index would be a silent gather of garbage on accelerators
  (XLA clamps out-of-range indices); refuse a tokenizer larger than the model's vocabulary."""
  if not data.get("tokenizer"):
    return
  try:
    vocab = load_tokenizer(data.tokenizer).vocab_size
  except Exception as e:  # pylint: disable=broad-except  # any parse failure: name the key
    raise ValueError(f"data.tokenizer: {data.tokenizer} could not be loaded ({e}).") from None
  if vocab > model_cfg.vocab_size:
    raise ValueError(f"data.tokenizer has {vocab} tokens but the model's vocab_size is "
                     f"{model_cfg.vocab_size} (model.preset / init.path): ids >= "
                     f"{model_cfg.vocab_size} cannot be embedded; use the model's tokenizer.")


def _mesh_sizes(c: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
  sizes = {a: c.mesh[a] for a in ("data", "fsdp", "sequence", "tensor")}
  fixed = math.prod(s for s in sizes.values() if s != -1)
  return {a: (num_devices // fixed if s == -1 else s) for a, s in sizes.items()}


def estimate_bytes_per_device(c: ml_collections.ConfigDict, model_cfg: LlamaConfig,
                              num_devices: int) -> dict[str, float]:
  """A *lower bound* on the bytes one device needs, by part (so a failure is certain, a pass is
  not a promise; XLA's temporaries, the ring's K/V buffers and fragmentation come on top).

  Params, Adam's two moments and the gradients are sharded over fsdp x tensor (the rules in
  parallel/sharding.py). Saved for the backward pass, per layer, in the compute dtype, for this
  device's tokens B/(data*fsdp*microbatches) x T/sequence: with `full` remat only the layer input
  [., D / tensor]; with the dots policies (and `none`, which saves more) also the matmul outputs:
  q, k, v ((N + 2K) H / tensor), the attention and MLP output projections (2 D / tensor) and
  gate/up (2 F / tensor).
  """
  s = _mesh_sizes(c, num_devices)
  shards = s["fsdp"] * s["tensor"]
  n = model_cfg.num_params
  params = n * _BYTES.get(str(c.model.param_dtype), 4) / shards
  optimizer = n * (_BYTES.get(str(c.optim.state_dtype), 4) + 4) / shards
  grads = n * 4 / shards
  rows = c.data.global_batch_size // (s["data"] * s["fsdp"] * max(c.train.microbatches, 1))
  tokens = max(rows, 1) * (c.data.seq_len // s["sequence"])
  d, f, t = model_cfg.hidden_size, model_cfg.intermediate_size, s["tensor"]
  h = model_cfg.head_dim or d // model_cfg.num_heads
  # [., D] tensors between layers are split over sequence x tensor (residual_length in
  # parallel/sharding.py: Megatron-style sequence parallelism), hence D / tensor.
  width = d / t if str(c.model.remat_policy) == "full" else (
      3 * d / t + (model_cfg.num_heads + 2 * model_cfg.num_kv_heads) * h / t + 2 * f / t)
  activations = tokens * width * _BYTES.get(str(c.model.dtype), 4) * model_cfg.num_layers
  return {"params": params, "optimizer": optimizer, "grads": grads, "activations": activations,
          "total": params + optimizer + grads + activations}


def device_memory_bytes() -> int | None:
  """The first device's memory limit, or None where the backend does not say (CPU)."""
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except  # backends without the API
    return None
  return (stats or {}).get("bytes_limit")


def check_memory(c: ml_collections.ConfigDict, model_cfg: LlamaConfig,
                 available: int | None = None, num_devices: int | None = None) -> None:
  """Stops with "will not fit; try ..." when the lower-bound estimate exceeds device memory."""
  available = device_memory_bytes() if available is None else available
  if not available:
    return
  num_devices = jax.device_count() if num_devices is None else num_devices
  est = estimate_bytes_per_device(c, model_cfg, num_devices)
  if est["total"] <= available:
    return
  s = _mesh_sizes(c, num_devices)
  gib = lambda x: f"{x / 2**30:.1f} GiB"
  parts = ", ".join(f"{k} {gib(v)}" for k, v in est.items() if k != "total")
  hints = []
  if est["activations"] > est["total"] / 3:
    hints.append(f"mesh.sequence={2 * s['sequence']} (CP)")
    if c.model.remat_policy != "full":
      hints.append("model.remat_policy=full")
  if est["params"] + est["optimizer"] + est["grads"] > est["total"] / 3:
    hints.append(f"mesh.fsdp={2 * s['fsdp']} or optim.state_dtype=bfloat16")
  raise ValueError(f"will not fit: at least {gib(est['total'])} per device ({parts}) vs "
                   f"{gib(available)} available; try "
                   f"{', '.join(hints) or 'more devices'} (preflight.check_memory=False to "
                   "skip this estimate).")
