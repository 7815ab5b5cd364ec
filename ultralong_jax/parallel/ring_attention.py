"""Sequence-parallel attention over the mesh's `sequence` axis: ring and all-gather strategies.

q [B, T, N, H], k, v [B, S=T, K, H] arrive sharded as the sharding table says (length over
`sequence`, batch over data/fsdp, heads over `tensor`); inside `jax.shard_map` every device holds
T / n tokens in the chosen layout and loops over the n key/value blocks:

  strategy="ring"       K/V (and their segment ids) travel one hop per step with `ppermute`; the
                        next hop is issued before the current block's compute so the two overlap.
  strategy="allgather"  K/V are all-gathered once (MaxText's default: with GQA they are N/K times
                        smaller than Q) and sliced per step; dK/dV are reduce-scattered back.

Partial results merge by log-sum-exp. The backward pass is a custom VJP that runs the same loop
again from the saved (q, k, v, out, lse) of the local block only: for the ring, dK/dV accumulators
travel with K/V and take one extra hop home, so per-device memory stays O(T / n).

Causal zigzag schedule (device i holds chunks i and 2n-1-i, c = T / 2n tokens each; at step s it
holds the K/V of device j = i - s mod n): step 0 is the local block (q0·k0 causal, q1·k0 full,
q1·k1 causal); a step with j < i needs q0·k0 and q1·k0, one with j > i needs q1·k0 and q1·k1, all
full c x c blocks. Every device does 3 + 2(n-1) block products of c x c: equal work, and only the
two diagonal blocks carry masked-out halves. Non-causal attention does one full block per step.

Masks. The kernels that mask by positions ("xla", "chunked"; BlockKernel.positions) take the
causal mask from the tokens' positions (modeling.attention.mask), which travel with K/V, so the
result is attention for tokens in ANY order; the layout only sets how each step's block is split
(halves under zigzag), and a sub-block is computed only when its first key does not come after
its last query in (segment id, position) order (for a laid-out batch exactly the blocks above). The fused
kernels ("cudnn*", "dpa_xla*", "splash") can only mask by index order within a block (a causal
flag; cuDNN's packed layout and splash add segment ids), so with them the causal order IS the
layout: the caller lays the batch out with layout.zigzag_permute and passes no positions; given
positions are refused rather than silently replaced by the layout's order.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from ultralong_jax.modeling import attention
from ultralong_jax.parallel import block_attention, chunked_attention, sharding
from ultralong_jax.parallel import layout as layout_lib

STRATEGIES = ("ring", "allgather")


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static description of one sharded attention call (hashable: a custom_vjp nondiff arg)."""
  axis: str
  n: int
  strategy: str
  layout: str
  causal: bool
  scale: float
  kernel: str | block_attention.BlockKernel
  chunk_size: int
  by_positions: bool  # causal masks from positions (see the module docstring)

  def block_kernel(self) -> block_attention.BlockKernel:
    return block_attention.get_kernel(self.kernel, chunk_size=self.chunk_size)


def _blocks(plan: _Plan, step: int, i, j, length: int, pos, kv_pos, seg, kv_seg):
  """Sub-block products of one step: (q_start, q_len, kv_start, kv_len, causal, valid).

  Starts may be traced (they depend on the device index i); lengths and `causal` are static;
  `valid` is None (always computed) or a traced bool (computed under lax.cond). With masks from
  positions (pos, seg [B, T] of the local queries, kv_pos, kv_seg of the step's keys) every
  sub-block of the layout's split is listed, valid when some key may be visible to some query
  (chunked_attention.sees).
  """
  if not plan.causal:
    return [(0, length, 0, length, False, None)]
  if plan.by_positions:
    parts = [(0, length)] if plan.layout == "contiguous" else [(0, length // 2),
                                                                (length // 2, length // 2)]
    return [(qs, ql, ks, kl, True, chunked_attention.sees(
        chunked_attention.bounds(_slice(kv_pos, ks, kl), _slice(kv_seg, ks, kl), 1, last=False),
        chunked_attention.bounds(_slice(pos, qs, ql), _slice(seg, qs, ql), 1, last=True))[0])
            for qs, ql in parts for ks, kl in parts]
  if plan.layout == "contiguous":
    if step == 0:
      return [(0, length, 0, length, True, None)]
    return [(0, length, 0, length, False, j < i)]
  c = length // 2
  if step == 0:
    return [(0, c, 0, c, True, None), (c, c, 0, c, False, None), (c, c, c, c, True, None)]
  half = jnp.where(j < i, 0, c)
  return [(half, c, 0, c, False, None), (c, c, half, c, False, None)]


def _positions(plan: _Plan, q_pos, kv_pos):
  """The kernel's position keywords for one sub-block (none when it masks by index order)."""
  return dict(q_pos=q_pos, kv_pos=kv_pos) if plan.by_positions else {}


def _slice(x, start, size, axis=1):
  return None if x is None else jax.lax.dynamic_slice_in_dim(x, start, size, axis)


class _KVSource:
  """Yields each step's K/V block: by ring rotation or by slicing an all-gathered copy."""

  def __init__(self, plan: _Plan, kv):
    self.plan = plan
    if plan.strategy == "allgather":
      self.full = jax.tree.map(
          lambda x: jax.lax.all_gather(x, plan.axis, axis=1, tiled=True), kv)
      self.local = kv[0].shape[1]
    else:
      self.current = kv

  def block(self, j):
    if self.plan.strategy == "allgather":
      return jax.tree.map(lambda x: _slice(x, j * self.local, self.local), self.full)
    return self.current

  def advance(self):
    if self.plan.strategy == "ring":
      self.current = _rotate(self.plan, self.current)

  def fence(self, accumulators):
    """Orders the unrolled steps: the next step's blocks depend on this step's accumulators.

    Without it XLA may hoist every step's score computation ahead of the merges and hold all n
    blocks' temporaries at once (O(T^2 / n) memory instead of one block's).
    """
    if self.plan.strategy == "ring":
      accumulators, self.current = jax.lax.optimization_barrier((accumulators, self.current))
    else:
      accumulators, self.full = jax.lax.optimization_barrier((accumulators, self.full))
    return accumulators


def _rotate(plan: _Plan, tree):
  perm = [(d, (d + 1) % plan.n) for d in range(plan.n)]
  return jax.tree.map(lambda x: jax.lax.ppermute(x, plan.axis, perm), tree)


def _forward(plan: _Plan, q, k, v, seg, pos):
  """Local forward: q [B, T, K, G, H] (this device's tokens), k, v [B, T, K, H], seg and pos
  [B, T] or None."""
  kernel = plan.block_kernel()
  b, t, kh, g, h = q.shape
  i = jax.lax.axis_index(plan.axis)
  # Accumulators vary like q (not constants): under check_vma a skipped block's lax.cond branch
  # returns them as they are, which must match the computed branch's type.
  out = jnp.zeros_like(q, jnp.float32)
  lse = jnp.full_like(q, attention.NEG_INF, jnp.float32, shape=(b, kh, g, t))
  source = _KVSource(plan, (k, v, seg, pos))
  for step in range(plan.n):
    j = (i - step) % plan.n
    kb, vb, sb, pb = source.block(j)
    if step + 1 < plan.n:
      source.advance()  # next hop in flight while this block computes
    for qs, ql, ks, kl, causal, valid in _blocks(plan, step, i, j, t, pos, pb, seg, sb):
      args = (_slice(q, qs, ql), _slice(kb, ks, kl), _slice(vb, ks, kl),
              _slice(seg, qs, ql), _slice(sb, ks, kl))
      where = _positions(plan, _slice(pos, qs, ql), _slice(pb, ks, kl))
      acc = (_slice(out, qs, ql), _slice(lse, qs, ql, 3))
      update = lambda args=args, causal=causal, acc=acc, where=where: block_attention.merge(
          *acc, *kernel.forward(*args, causal=causal, scale=plan.scale, **where))
      # A skipped block keeps the accumulator (not a constant: under check_vma both branches
      # must be device-varying).
      o_new, l_new = update() if valid is None else jax.lax.cond(valid, update, lambda: acc)
      out = jax.lax.dynamic_update_slice_in_dim(out, o_new, qs, 1)
      lse = jax.lax.dynamic_update_slice_in_dim(lse, l_new, qs, 3)
    out, lse = source.fence((out, lse))
  return out, lse


def _backward(plan: _Plan, q, k, v, seg, pos, out, lse, dout):
  """Local backward: the forward's loop again, dK/dV accumulated per K/V block."""
  kernel = plan.block_kernel()
  t = q.shape[1]
  i = jax.lax.axis_index(plan.axis)
  delta = jnp.einsum("BTKGH,BTKGH->BKGT", dout.astype(jnp.float32), out)
  dq = jnp.zeros_like(q, jnp.float32)  # varying like q (see _forward)
  source = _KVSource(plan, (k, v, seg, pos))
  if plan.strategy == "allgather":
    dk = jnp.zeros_like(k, jnp.float32, shape=source.full[0].shape)
  else:
    dk = jnp.zeros_like(k, jnp.float32)
  dv = jnp.zeros_like(dk)
  for step in range(plan.n):
    j = (i - step) % plan.n
    kb, vb, sb, pb = source.block(j)
    if step + 1 < plan.n:
      source.advance()
    # Ring: this step's dK/dV accumulators are those of block j, which traveled with it.
    offset = j * t if plan.strategy == "allgather" else 0
    for qs, ql, ks, kl, causal, valid in _blocks(plan, step, i, j, t, pos, pb, seg, sb):
      args = (_slice(q, qs, ql), _slice(kb, ks, kl), _slice(vb, ks, kl),
              _slice(seg, qs, ql), _slice(sb, ks, kl), _slice(out, qs, ql),
              _slice(lse, qs, ql, 3), _slice(dout, qs, ql), _slice(delta, qs, ql, 3))
      where = _positions(plan, _slice(pos, qs, ql), _slice(pb, ks, kl))
      acc = (_slice(dq, qs, ql), _slice(dk, offset + ks, kl), _slice(dv, offset + ks, kl))

      def update(args=args, causal=causal, acc=acc, where=where):
        grads = kernel.backward(*args, causal=causal, scale=plan.scale, **where)
        return tuple(a + d for a, d in zip(acc, grads))

      dq_s, dk_s, dv_s = update() if valid is None else jax.lax.cond(valid, update, lambda: acc)
      dq = jax.lax.dynamic_update_slice_in_dim(dq, dq_s, qs, 1)
      dk = jax.lax.dynamic_update_slice_in_dim(dk, dk_s, offset + ks, 1)
      dv = jax.lax.dynamic_update_slice_in_dim(dv, dv_s, offset + ks, 1)
    if plan.strategy == "ring":
      # After the last step's compute the accumulators take the hop home (n hops in total).
      dk, dv = _rotate(plan, (dk, dv))
    dq, dk, dv = source.fence((dq, dk, dv))
  if plan.strategy == "allgather":
    dk, dv = (jax.lax.psum_scatter(x, plan.axis, scatter_dimension=1, tiled=True)
              for x in (dk, dv))
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(plan, q, k, v, seg, pos):
  out, _ = _forward(plan, q, k, v, seg, pos)
  return out.astype(q.dtype)


def _attend_fwd(plan, q, k, v, seg, pos):
  out, lse = _forward(plan, q, k, v, seg, pos)
  # Residuals are this device's blocks only: O(T / n) memory.
  return out.astype(q.dtype), (q, k, v, seg, pos, out, lse)


def _attend_bwd(plan, res, dout):
  q, k, v, seg, pos, out, lse = res
  dq, dk, dv = _backward(plan, q, k, v, seg, pos, out, lse, dout)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def _local(plan: _Plan, q, k, v, masks):
  b, t, n_heads, h = q.shape
  kv_heads = k.shape[2]
  out = _attend(plan, q.reshape(b, t, kv_heads, n_heads // kv_heads, h), k, v,
                masks.get("segment_ids"), masks.get("positions"))
  return out.reshape(b, t, n_heads, h)


def _block_length(t: int, n: int, causal: bool, layout: str) -> int:
  """The kernel's query length: half the local tokens under causal zigzag (two chunks each)."""
  return t // n // (2 if causal and layout == "zigzag" else 1)


def training_block_length(t: int, n: int, layout: str) -> int:
  """The block the kernel of make_attention_fn's causal attention sees for T tokens over n
  sequence shards: T / 2n under zigzag, T / n contiguous, T with one shard (a one-block ring)."""
  return _block_length(t, n, True, layout if n > 1 else "contiguous")


def _check_arguments(q, k, v, strategy: str, **masks):
  if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
    raise ValueError(f"expected q [B,T,N,H], k and v [B,S,K,H]; got {q.shape}, {k.shape}, {v.shape}")
  b, t, n_heads, h = q.shape
  if k.shape[0] != b or k.shape[1] != t or k.shape[3] != h:
    raise ValueError(f"ring attention is self-attention: k/v {k.shape} must be [B={b}, S=T={t}, "
                     f"K, H={h}]")
  if n_heads % k.shape[2]:
    raise ValueError(f"query heads N={n_heads} must be a multiple of kv heads K={k.shape[2]}")
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy={strategy!r}: expected one of {STRATEGIES}")
  for name, x in masks.items():
    if x is not None and x.shape != (b, t):
      raise ValueError(f"{name} {x.shape} must be [B, T] = {(b, t)}")


def ring_attention(q, k, v, *, mesh: Mesh, positions=None, segment_ids=None, causal: bool = True,
                   scale: float | None = None, strategy: str = "ring", layout: str = "zigzag",
                   kernel: str | block_attention.BlockKernel = "auto",
                   chunk_size: int = chunked_attention.CHUNK_SIZE):
  """Attention with the length sharded over the mesh's sequence axis.

  Args:
    q: [B, T, N, H] queries, k, v: [B, T, K, H] keys/values (N divisible by K: GQA, never
      repeated).
    mesh: the device mesh; axes come from the sharding table (sharding.LOGICAL_AXIS_RULES).
    positions: [B, T] int, the tokens' positions: the causal mask keeps keys whose position is
      not after the query's (modeling.attention.mask), so the tokens may come in any order.
      None: the tokens are in `layout` order (layout.zigzag_permute of a natural-order batch).
      Only kernels that mask by positions take them (see the module docstring); the others
      refuse them.
    segment_ids: [B, T] int, tokens attend only within equal ids (0 = padding is allowed).
    causal: causal mask by position.
    scale: score scale, default 1/sqrt(H).
    strategy: "ring" (ppermute K/V) or "allgather" (gather K/V once).
    layout: "zigzag" (balanced causal work) or "contiguous" (unbalanced; for comparison): how
      each step's block is split, and the order of tokens given without positions.
    kernel: "auto" | "xla" | "chunked" | "cudnn" | "cudnn_packed" | "dpa_xla" |
      "dpa_xla_packed" | "splash" (block_attention.select_kernel), or a BlockKernel object
      (e.g. training.compile_plan.STANDIN_KERNEL, the memory stand-in).
    chunk_size: query/key chunk of the "chunked" kernel; "auto" picks that kernel (where cuDNN
      and splash do not apply) when a ring block is longer than this. Caps splash's tile.
  Returns:
    [B, T, N, H] attention output, sharded like q.
  """
  _check_arguments(q, k, v, strategy, segment_ids=segment_ids, positions=positions)
  b, t, _, h = q.shape
  axis = sharding.mesh_axes_of("length", mesh)
  if len(axis) != 1:
    raise ValueError(f"the sharding table must map 'length' to one mesh axis; got {axis}")
  axis = axis[0]
  n = mesh.shape[axis]
  if causal:
    layout_lib.check_length(t, n, layout)
  elif t % n:
    raise ValueError(f"sequence length {t} is not divisible by the sequence axis size {n}")
  q_spec = sharding.logical_to_spec(("batch", "length", "heads", "head_dim"), mesh)
  kv_spec = sharding.logical_to_spec(("batch", "length", "kv_heads", "head_dim"), mesh)
  for name, x, spec in (("q", q, q_spec), ("k/v", k, kv_spec)):
    sharding.check_divisible(name, x.shape, spec, mesh)
  seg_spec = sharding.logical_to_spec(("batch", "length"), mesh)
  chosen = block_attention.select_kernel(
      kernel, has_segment_ids=segment_ids is not None, platform=mesh.devices.flat[0].platform,
      block_length=_block_length(t, n, causal, layout), chunk_size=chunk_size)
  by_positions = causal and block_attention.get_kernel(chosen, chunk_size=chunk_size).positions
  if causal and positions is not None and not by_positions:
    raise ValueError(
        f"kernel={chosen!r} masks by the layout's token order and cannot take positions: lay the "
        f"tokens out with layout.zigzag_permute(batch, n, layout={layout!r}) and call without "
        "positions, or use kernel='xla' or 'chunked', which mask by any positions.")
  if by_positions and positions is None:
    positions = jnp.broadcast_to(jnp.asarray(layout_lib.permutation(t, n, layout), jnp.int32),
                                 (b, t))
  plan = _Plan(axis=axis, n=n, strategy=strategy, layout=layout, causal=causal,
               scale=float(scale if scale is not None else 1.0 / math.sqrt(h)),
               kernel=chosen, chunk_size=chunk_size, by_positions=by_positions)
  masks = {name: x for name, x in (("segment_ids", segment_ids),
                                   ("positions", positions if by_positions else None))
           if x is not None}
  # Splash's Pallas calls declare outputs without varying-axes types, which check_vma rejects
  # (as MaxText, run splash under check_vma=False; every other kernel keeps the check).
  fn = jax.shard_map(functools.partial(_local, plan), mesh=mesh,
                     in_specs=(q_spec, kv_spec, kv_spec, {name: seg_spec for name in masks}),
                     out_specs=q_spec, check_vma=plan.kernel != "splash")
  return fn(q, k, v, masks)


def make_attention_fn(mesh: Mesh, *, strategy: str = "ring", layout: str = "zigzag",
                      kernel: str | block_attention.BlockKernel = "auto",
                      chunk_size: int = chunked_attention.CHUNK_SIZE):
  """An `attention_fn` for the model: ring_attention when the sequence axis is > 1.

  With the whole sequence on every device (sequence axis 1) there is no ring, but a long sequence
  still needs a fused kernel: the kernel is chosen as for a ring block of length T
  (block_attention.select_kernel: cuDNN on GPU without segment ids, chunked for T > chunk_size)
  and run as a one-block ring in the contiguous layout; where that choice is "xla" (short
  sequences on CPU/TPU) the plain reference attention runs instead (the same math, no shard_map).

  The callable has the model's signature `(q, k, v, *, positions, segment_ids, causal, scale)`;
  strategy, layout, kernel and chunk_size are ring_attention's (training passes the config's
  attention.strategy / layout / kernel / chunk_size). With a sequence axis > 1 the batch must
  have been laid out once with layout.zigzag_permute (its `layout`): kernels that mask by
  positions get the model's positions, the fused ones take the order from the layout.
  """
  axis = sharding.mesh_axes_of("length", mesh)
  if not axis:
    return attention.dot_product_attention
  n = mesh.shape[axis[0]]
  layout = layout if n > 1 else "contiguous"
  platform = mesh.devices.flat[0].platform

  def attention_fn(q, k, v, *, positions=None, segment_ids=None, causal=True, scale=None):
    t = q.shape[1]
    chosen = block_attention.select_kernel(
        kernel, has_segment_ids=segment_ids is not None, platform=platform,
        block_length=_block_length(t, n, causal, layout), chunk_size=chunk_size)
    if n == 1 and chosen == "xla":
      return attention.dot_product_attention(q, k, v, positions=positions, segment_ids=segment_ids,
                                   causal=causal, scale=scale)
    if not block_attention.get_kernel(chosen, chunk_size=chunk_size).positions:
      positions = None  # the batch is in `layout` order, which is this kernel's mask
    return ring_attention(q, k, v, mesh=mesh, positions=positions, segment_ids=segment_ids,
                          causal=causal, scale=scale, strategy=strategy, layout=layout,
                          kernel=chosen, chunk_size=chunk_size)

  return attention_fn
