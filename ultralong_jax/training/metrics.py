"""What users watch: FLOPs and MFU, a progress bar, TensorBoard, a JSON-lines file, a loss plot."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax

from ultralong_jax.modeling.config import LlamaConfig

# Dense bf16 peak TFLOP/s per device (vendor specs; H100/H200 SXM without sparsity).
PEAK_TFLOPS = {
    "tpu v4": 275.0, "tpu v5 lite": 197.0, "tpu v5e": 197.0, "tpu v5p": 459.0, "tpu v5": 459.0,
    "tpu v6 lite": 918.0, "tpu v6e": 918.0,
    "a100": 312.0, "h100": 989.0, "h200": 989.0,
}


def peak_tflops(device: jax.Device | None = None, override: float = 0.0) -> float | None:
  """Per-device peak from the table by device kind; `override` (metrics.peak_tflops) wins; None
  when unknown (CPU), in which case MFU is not reported."""
  if override:
    return override
  kind = (device or jax.devices()[0]).device_kind.lower()
  for name in sorted(PEAK_TFLOPS, key=len, reverse=True):
    if name in kind:
      return PEAK_TFLOPS[name]
  return None


def train_flops_per_token(config: LlamaConfig, seq_len: int, causal: bool = True) -> float:
  """Model FLOPs per trained token (forward + backward = 3x forward), PaLM-style accounting.

  Matmul weights: 6 FLOPs per parameter per token (the input embedding is a gather, so it is
  excluded; a tied head still counts once as the output projection). Attention: per layer, QK^T and
  PV cost 2·2·N·H FLOPs per (query, key) pair forward; causal attention visits ~T/2 keys per query.
  """
  D, V, L = config.hidden_size, config.vocab_size, config.num_layers
  matmul_params = config.num_params - V * D  # drop the embedding gather
  if config.tie_word_embeddings:
    matmul_params += V * D  # ... but the tied output projection is a real matmul
  keys = seq_len / 2 if causal else seq_len
  attention = 4 * L * config.num_heads * config.head_dim * keys
  return 6 * matmul_params + 3 * attention


class MetricsWriter:
  """JSON lines (always), TensorBoard event files (when tensorboardX imports), on process 0."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled and jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:
        self._tb = None

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"step": step, "time": time.time(), **{k: _py(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for k, v in row.items():
        if k not in ("step", "time") and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _py(v):
  try:
    return float(v)
  except (TypeError, ValueError):
    return v


def read_metrics(path: str) -> list[dict[str, Any]]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_loss(metrics_path: str, png_path: str, title: str = "training loss") -> str:
  """Loss (and learning rate) against step, as a PNG next to the JSON lines it is drawn from."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  rows = [r for r in read_metrics(metrics_path) if "loss" in r]
  fig, ax = plt.subplots(figsize=(7, 4))
  ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="loss", color="tab:blue")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats / token)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  if rows and "learning_rate" in rows[0]:
    lr_ax = ax.twinx()
    lr_ax.plot([r["step"] for r in rows], [r["learning_rate"] for r in rows], color="tab:gray",
               alpha=0.5, label="learning rate")
    lr_ax.set_ylabel("learning rate")
  fig.tight_layout()
  fig.savefig(png_path, dpi=120)
  plt.close(fig)
  return png_path
