"""Figures: the needle heatmap (as in the UltraLong paper, Fig. 1) and per-position curves."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")  # files only, no display needed
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def short_length(n: float) -> str:
  """A context length as quoted: 131072 -> 128K, 1048576 -> 1M."""
  # Binary units, as context lengths are quoted (128K = 131072).
  return f"{n / 2**20:.3g}M" if n >= 2**20 else f"{n / 1024:.3g}K" if n >= 1024 else str(int(n))


def heatmap(scores: np.ndarray, lengths: Sequence[int], depths: Sequence[float], path: str, *,
            training_length: int | None = None, title: str = "Needle in a haystack") -> str:
  """scores [depths, lengths] in [0, 1] -> PNG at `path`: x = context length, y = needle depth
  (0% top), red (0) to green (1); a dashed line after the last length <= training_length."""
  from matplotlib.colors import LinearSegmentedColormap  # pylint: disable=g-import-not-at-top
  plt = _pyplot()
  cmap = LinearSegmentedColormap.from_list("needle", ["#F0496E", "#EBB839", "#0CD79F"])
  fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(lengths) + 2), 0.45 * len(depths) + 2))
  im = ax.imshow(np.asarray(scores, float), cmap=cmap, vmin=0, vmax=1, aspect="auto")
  step = max(1, len(lengths) // 12)
  ax.set_xticks(range(0, len(lengths), step), [short_length(n) for n in lengths[::step]], rotation=45)
  ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel("needle depth")
  if training_length is not None:
    inside = sum(n <= training_length for n in lengths)
    if 0 < inside < len(lengths):
      ax.axvline(inside - 0.5, color="white", linestyle="--", linewidth=2,
                 label=f"training length {short_length(training_length)}")
      ax.legend(loc="lower left", fontsize=8)
  ax.set_title(f"{title} (mean score {np.nanmean(scores):.3f})")
  fig.colorbar(im, ax=ax, label="score")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def table_heatmap(values: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str],
                  path: str, *, title: str, vmax: float = 100.0) -> str:
  """values [rows, cols] (0..vmax) -> PNG at `path`: one cell per value, written in the cell,
  red (0) to green (vmax); e.g. RULER's task x length table."""
  from matplotlib.colors import LinearSegmentedColormap  # pylint: disable=g-import-not-at-top
  plt = _pyplot()
  cmap = LinearSegmentedColormap.from_list("score", ["#F0496E", "#EBB839", "#0CD79F"])
  values = np.asarray(values, float)
  fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(col_labels) + 2.5),
                                  0.4 * len(row_labels) + 1.5))
  ax.imshow(values, cmap=cmap, vmin=0, vmax=vmax, aspect="auto")
  ax.set_xticks(range(len(col_labels)), list(col_labels))
  ax.set_yticks(range(len(row_labels)), list(row_labels))
  for (i, j), v in np.ndenumerate(values):
    ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=8)
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def curves(x: Sequence[float], ys: dict[str, Sequence[float]], path: str, *, xlabel: str,
           ylabel: str, title: str, log_x: bool = False) -> str:
  """One line per entry of `ys` over `x`; PNG at `path`."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4))
  for name, y in ys.items():
    ax.plot(x, y, marker="o", markersize=3, label=name)
  if log_x:
    ax.set_xscale("log")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  if len(ys) > 1:
    ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
