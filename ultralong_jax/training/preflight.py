"""Pre-flight checks that run after `config.validate` and before anything compiles.

  preflight.check(run)          # run = config.resolve(c, ...)

`validate` checks the config against itself and the device count; this checks it against the
world: the data files it names exist and are readable, the tokenizer's vocabulary fits the
model's embedding, and (on accelerators) the memory estimate of training/memory.py fits the
device. Each error names the config key, so a bad run fails in seconds instead of after an hour
of compiling and loading on hundreds of hosts.
"""

from __future__ import annotations

import glob
import logging
import os

import jax

from ultralong_jax.data.config import PretrainData, SftData
from ultralong_jax.data.tokenizer import load_tokenizer
from ultralong_jax.modeling.config import LlamaConfig
from ultralong_jax.training import memory
from ultralong_jax.training.run_config import RunConfig

def check(run: RunConfig) -> None:
  """Raises ValueError naming the first key whose files, tokenizer or memory would fail."""
  if run.preflight.check_paths:
    check_paths(run.data)
    check_tokenizer_vocab(run.data, run.model)
  if run.preflight.check_memory:
    check_memory(run)


def _readable_file(key: str, path: str) -> None:
  if not os.path.exists(path):
    raise ValueError(f"{key}: {path} does not exist.")
  if not os.access(path, os.R_OK) or (os.path.isdir(path) and not os.access(path, os.X_OK)):
    raise ValueError(f"{key}: {path} is not readable by this user.")


def check_paths(data: PretrainData | SftData) -> None:
  """Stage 1: every domain's prepared directory holds files; stage 2: every chat glob matches a
  readable file; both: the tokenizer (where set) and every TFDS data_dir exist."""
  if data.tokenizer:
    _readable_file("data.tokenizer", data.tokenizer)
  if data.stage == 1:
    for name, dom in data.domains.items():
      if dom.tfds:  # the dataset itself is opened (and checked) when the pipeline builds
        _readable_file(f"data.domains.{name}.data_dir", dom.data_dir)
        continue
      key = f"data.domains.{name}.path"
      _readable_file(key, dom.path)
      if not os.path.isdir(dom.path) or not os.listdir(dom.path):
        raise ValueError(f"{key}: {dom.path} is not a non-empty directory; prepare it with "
                         "python -m ultralong_jax.data.prepare --output_dir=...")
  elif data.chat_tfds:
    _readable_file("data.chat_tfds_data_dir", data.chat_tfds_data_dir)
  else:
    for pattern in (p.strip() for p in data.chat_files.split(",") if p.strip()):
      files = sorted(glob.glob(pattern))
      if not files:
        raise ValueError(f"data.chat_files: {pattern!r} matches no file.")
      for path in files:
        _readable_file("data.chat_files", path)


def check_tokenizer_vocab(data: PretrainData | SftData, model_cfg: LlamaConfig) -> None:
  """A token id the embedding cannot index would be a silent gather of garbage on accelerators
  (XLA clamps out-of-range indices); refuse a tokenizer larger than the model's vocabulary."""
  if not data.tokenizer:
    return
  try:
    vocab = load_tokenizer(data.tokenizer).vocab_size
  except Exception as e:  # pylint: disable=broad-except  # any parse failure: name the key
    raise ValueError(f"data.tokenizer: {data.tokenizer} could not be loaded ({e}).") from None
  if vocab > model_cfg.vocab_size:
    raise ValueError(f"data.tokenizer has {vocab} tokens but the model's vocab_size is "
                     f"{model_cfg.vocab_size} (model.preset / init.path): ids >= "
                     f"{model_cfg.vocab_size} cannot be embedded; use the model's tokenizer.")


def estimate_bytes_per_device(run: RunConfig, platform: str | None = None) -> dict[str, float]:
  """training.memory.estimate for this config on its devices: bytes per device by part, and
  "total"."""
  platform = platform or jax.default_backend()
  return memory.estimate(memory.shape_from_config(run, platform))


def device_memory_bytes() -> int | None:
  """The first device's memory limit, or None where the backend does not say (CPU)."""
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except  # backends without the API
    return None
  return (stats or {}).get("bytes_limit")


def check_memory(run: RunConfig, available: int | None = None,
                 platform: str | None = None) -> None:
  """Stops with "will not fit; try ..." when even the estimate less its 20% tolerance exceeds
  device memory (`available` bytes, default the first device's); warns when the estimate is
  above memory.USABLE of it. The devices are those the config was resolved for."""
  available = device_memory_bytes() if available is None else available
  if not available:
    return
  est = estimate_bytes_per_device(run, platform)
  gib = lambda x: f"{x / 2**30:.1f} GiB"
  parts = ", ".join(f"{k} {gib(v)}" for k, v in est.items() if k != "total" and v)
  if est["total"] <= memory.USABLE * available:
    return
  if est["total"] * (1 - memory.TOLERANCE) <= available:
    logging.warning("memory: the estimate %s per device (%s) is close to the device's %s; the "
                    "run may fail with out-of-memory (python -m ultralong_jax.estimate_memory "
                    "--suggest lists meshes with more room).", gib(est["total"]), parts,
                    gib(available))
    return
  s = run.mesh.sizes
  activations = est["checkpoints"] + est["layer_working_set"] + est["attention"]
  weights = est["params"] + est["optimizer"] + est["gradients"] + est["weight_temps"]
  hints = []
  if activations > est["total"] / 3:
    hints.append(f"mesh.sequence={2 * s['sequence']} (CP)")
    if run.model.remat_policy != "full":
      hints.append("model.remat_policy=full")
  if weights > est["total"] / 3:
    hints.append(f"mesh.fsdp={2 * s['fsdp']} or optim.state_dtype=bfloat16")
  raise ValueError(f"will not fit: about {gib(est['total'])} per device ({parts}) vs "
                   f"{gib(available)} available; try {', '.join(hints) or 'more devices'} "
                   "(python -m ultralong_jax.estimate_memory --suggest lists meshes that fit; "
                   "preflight.check_memory=False skips this estimate).")
