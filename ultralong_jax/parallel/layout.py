"""Token layouts over the `sequence` mesh axis, and the one-time batch permutation they need.

A causal sequence split contiguously over n devices is unbalanced: device n-1 attends to the whole
prefix while device 0 attends to its own chunk only (n x the work at the diagonal-heavy end). The
zigzag layout (Brandon et al. 2023, "Striped Attention"; the ring-flash-attention "zigzag" variant)
cuts the sequence into 2n chunks and gives device i chunks i and 2n-1-i, so every device holds one
early and one late chunk and does the same causal work.

The permutation is applied ONCE to the whole batch (tokens, targets, positions, segment ids, loss
mask travel together) before the train step; every layer then works on the permuted order and the
attention kernel recovers the original order from the layout for its causal mask. Per-token losses
are summed, so the loss is unchanged by the permutation.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

LAYOUTS = ("zigzag", "contiguous")


def check_length(length: int, n: int, layout: str) -> int:
  """Returns the chunk size c of `layout` for a global `length` over n devices, or raises."""
  if layout not in LAYOUTS:
    raise ValueError(f"layout={layout!r}: expected one of {LAYOUTS}.")
  parts = 2 * n if layout == "zigzag" else n
  if length % parts:
    raise ValueError(
        f"sequence length {length} is not divisible by {parts} "
        f"({'2 x ' if layout == 'zigzag' else ''}sequence axis size {n}) as the {layout!r} layout "
        f"needs; pad the length to a multiple of {parts} or change the mesh's sequence size.")
  return length // parts


def permutation(length: int, n: int, layout: str = "zigzag") -> np.ndarray:
  """Original token index of each position in the laid-out sequence, shape [length].

  Position p of the laid-out sequence (device p // (length / n)) holds original token
  permutation[p]; `x_laid_out = x[:, permutation]`.
  """
  c = check_length(length, n, layout)
  if layout == "contiguous":
    return np.arange(length)
  chunks = [chunk for i in range(n) for chunk in (i, 2 * n - 1 - i)]
  return np.concatenate([np.arange(ch * c, (ch + 1) * c) for ch in chunks])


def _apply(tree: Any, index: np.ndarray, axis: int) -> Any:
  def take(x):
    if x is None:
      return None
    return jnp.take(x, jnp.asarray(index), axis=axis) if isinstance(x, jax.Array) else np.take(
        x, index, axis=axis)
  return jax.tree.map(take, tree)


def zigzag_permute(batch: Any, n: int, *, axis: int = 1, layout: str = "zigzag") -> Any:
  """Reorders the length axis of every array in `batch` (a pytree, e.g. a dict of [B, T] arrays)
  into `layout` for a sequence axis of size n. numpy arrays stay numpy (host-side data pipeline)."""
  leaves = [x for x in jax.tree.leaves(batch) if x is not None]
  if not leaves:
    return batch
  length = leaves[0].shape[axis]
  for x in leaves:
    if x.shape[axis] != length:
      raise ValueError(f"all arrays need the same length on axis {axis}: {x.shape} vs {length}")
  return _apply(batch, permutation(length, n, layout), axis)


def zigzag_unpermute(batch: Any, n: int, *, axis: int = 1, layout: str = "zigzag") -> Any:
  """Inverse of `zigzag_permute` (e.g. to put per-token losses or logits back in token order)."""
  leaves = [x for x in jax.tree.leaves(batch) if x is not None]
  if not leaves:
    return batch
  return _apply(batch, np.argsort(permutation(leaves[0].shape[axis], n, layout)), axis)


def per_device_causal_pairs(length: int, n: int, layout: str) -> np.ndarray:
  """Number of (query, key) pairs with key <= query that each device's queries need, shape [n].

  The useful causal work per device under `layout`: equal entries mean balanced load. Computed in
  closed form per device (no [length, length] matrix) so it works for millions of tokens.
  """
  perm = permutation(length, n, layout)
  # Query at original index t attends to t + 1 keys.
  return (perm.reshape(n, -1).astype(np.int64) + 1).sum(axis=1)

