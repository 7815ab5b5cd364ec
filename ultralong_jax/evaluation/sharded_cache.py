"""The KV cache on a device mesh: slots split over `sequence`, attention merged by log-sum-exp.

`modeling/decode.py` is mesh-agnostic; this module gives it the sharded pieces:
  cache_attention_fn(mesh)  `decode.update_and_attend` under `jax.shard_map` over `sequence`:
                            new queries/keys arrive whole on every sequence device (all-gathered
                            by GSPMD: prefill with ring=False), each device writes and attends to
                            its own slots, partial results merge by pmax/psum.
  token_fns(mesh)           the same for a decode step (one token; decode.attend_token and
                            decode.write_tokens): every layer reads, one write per step.
  ring_cache_attention_fn(mesh)  the same result for a prefill chunk whose tokens stay split over
                            `sequence` (device i holds the chunk's i-th contiguous T/n tokens):
                            nothing of length T or S is gathered on any device (see _ring_local).
  place_cache, place_params by the logical names of the one sharding table (parallel/sharding.py).
Shapes as in decode.py.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from ultralong_jax.modeling import attention as attention_lib
from ultralong_jax.modeling import decode
from ultralong_jax.parallel import block_attention, sharding


def sequence_size(mesh) -> int:
  """Devices along the mesh axis the `length` logical axis maps to (1 without a mesh)."""
  if mesh is None:
    return 1
  axes = sharding.mesh_axes_of("length", mesh)
  return mesh.shape[axes[0]] if axes else 1


def batch_size(mesh) -> int:
  """Devices the `batch` logical axis is split over (data x fsdp; 1 without a mesh): a cache's
  batch dimension must be a multiple of this."""
  if mesh is None:
    return 1
  return math.prod(mesh.shape[a] for a in sharding.mesh_axes_of("batch", mesh))


def cache_attention_fn(mesh, *, kv_block: int = 512) -> decode.CacheAttentionFn:
  """`decode.update_and_attend` for a cache whose slots are split over the sequence axis."""
  if sequence_size(mesh) == 1:
    return functools.partial(decode.update_and_attend, kv_block=kv_block)
  axis = sharding.mesh_axes_of("length", mesh)[0]
  spec = lambda *names: sharding.logical_to_spec(names, mesh)  # noqa: E731
  q_spec = spec("batch", None, "heads", "head_dim")
  new_spec = spec("batch", None, "kv_heads", "head_dim")
  cache_spec = spec(*decode.CACHE_AXES)
  seg_spec = spec("batch", "length")

  def fn(q, k_new, v_new, q_seg, cache_k, cache_v, cache_seg, start, layer):
    local = functools.partial(decode.update_and_attend, kv_block=kv_block, axis=axis)
    in_specs = (q_spec, new_spec, new_spec, spec("batch", None), cache_spec, cache_spec,
                seg_spec, PartitionSpec(), PartitionSpec())
    # check_vma off: the psum'd output is the same on all sequence devices, which VMA typing
    # cannot infer through pmax/psum of the exp-weights.
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs,
                         out_specs=(q_spec, cache_spec, cache_spec, seg_spec),
                         check_vma=False)(q, k_new, v_new, q_seg, cache_k, cache_v, cache_seg,
                                          jnp.asarray(start, jnp.int32),
                                          jnp.asarray(layer, jnp.int32))

  return fn


def token_fns(mesh, *, kv_block: int = 512) -> decode.TokenFns:
  """`decode.attend_token` and `decode.write_tokens` for a cache whose slots are split over the
  sequence axis: the new token's q/k/v arrive whole on every sequence device, each device reads
  (and the owner of the slot writes) only its own slots."""
  if sequence_size(mesh) == 1:
    return decode.TokenFns(functools.partial(decode.attend_token, kv_block=kv_block),
                           decode.write_tokens)
  axis = sharding.mesh_axes_of("length", mesh)[0]
  spec = lambda *names: sharding.logical_to_spec(names, mesh)  # noqa: E731
  q_spec = spec("batch", None, "heads", "head_dim")
  new_spec = spec("batch", None, "kv_heads", "head_dim")
  layers_new_spec = spec("layers", "batch", None, "kv_heads", "head_dim")
  cache_spec = spec(*decode.CACHE_AXES)
  seg_spec = spec("batch", "length")
  scalar = PartitionSpec()

  def attend(q, k_new, v_new, q_seg, cache_k, cache_v, cache_seg, start, layer):
    local = functools.partial(decode.attend_token, kv_block=kv_block, axis=axis)
    # check_vma off, as in cache_attention_fn.
    return jax.shard_map(
        local, mesh=mesh, in_specs=(q_spec, new_spec, new_spec, spec("batch", None), cache_spec,
                                    cache_spec, seg_spec, scalar, scalar),
        out_specs=q_spec, check_vma=False)(q, k_new, v_new, q_seg, cache_k, cache_v, cache_seg,
                                           jnp.asarray(start, jnp.int32),
                                           jnp.asarray(layer, jnp.int32))

  def write(cache_k, cache_v, cache_seg, k_new, v_new, q_seg, start):
    local = functools.partial(decode.write_tokens, axis=axis)
    return jax.shard_map(
        local, mesh=mesh, in_specs=(cache_spec, cache_spec, seg_spec, layers_new_spec,
                                    layers_new_spec, spec("batch", None), scalar),
        out_specs=(cache_spec, cache_spec, seg_spec), check_vma=False)(
            cache_k, cache_v, cache_seg, k_new, v_new, q_seg, jnp.asarray(start, jnp.int32))

  return decode.TokenFns(attend, write)


def _ring_local(q, k_new, v_new, q_seg, cache_k, cache_v, cache_seg, start, *, axis: str,
                n: int, kv_block: int):
  """One device's part of a prefill chunk with the chunk and the cache both split over `axis`.

  q [B,t,N,H], k_new, v_new [B,t,K,H], q_seg [B,t]: this device's t = T/n tokens of the chunk
  (device i holds slots start + i t .. start + (i+1) t - 1); cache_* this device's S_local slots
  (device i owns slots i S_local .. (i+1) S_local - 1). Two passes around the ring:

    write:  the chunk's K/V blocks travel one hop per step; every device stores the slots it
            owns from each block passing by (n - 1 hops of [B,t,K,H]).
    attend: the queries travel with their float32 (out, lse) accumulators; each device attends
            the visiting queries to its own (now complete) slots, merges by log-sum-exp and
            passes them on; the n-th hop brings each block home. A device whose first slot comes
            after the visiting block's last query skips the block (causal).

  A device holds at most one visiting block, its cache shard and one [B,K,G,t,kv_block] score
  tile: a working set of O(t + S_local) = O((T + S) / n) per device.
  """
  B, t, N, H = q.shape
  K = k_new.shape[2]
  S_local = cache_k.shape[1]
  i = jax.lax.axis_index(axis)
  offset = i * S_local
  hop = lambda tree: jax.tree.map(  # noqa: E731
      lambda x: jax.lax.ppermute(x, axis, [(d, (d + 1) % n) for d in range(n)]), tree)
  block = (k_new, v_new, q_seg)
  for step in range(n):
    first = start + ((i - step) % n) * t - offset  # the visiting block's first slot, locally
    cache_k = decode._write(cache_k, block[0], first)  # pylint: disable=protected-access
    cache_v = decode._write(cache_v, block[1], first)  # pylint: disable=protected-access
    cache_seg = decode._write(cache_seg, block[2], first)  # pylint: disable=protected-access
    if step + 1 < n:
      block = hop(block)
  kv_slot = offset + jnp.arange(S_local)
  visiting = (q.reshape(B, t, K, N // K, H), q_seg,
              jnp.zeros((B, t, K, N // K, H), jnp.float32),
              jnp.full((B, K, N // K, t), attention_lib.NEG_INF, jnp.float32))
  for step in range(n):
    qb, segb, out, lse = visiting
    q_slot = start + ((i - step) % n) * t + jnp.arange(t)

    def attend_here(qb=qb, segb=segb, out=out, lse=lse, q_slot=q_slot):
      o, l = decode._partial_attention(  # pylint: disable=protected-access
          qb, cache_k, cache_v, q_slot, segb, kv_slot, cache_seg, scale=H ** -0.5,
          kv_block=min(kv_block, S_local))
      return block_attention.merge(out, lse, o, l)

    out, lse = jax.lax.cond(offset <= q_slot[-1], attend_here, lambda out=out, lse=lse: (out, lse))
    visiting = hop((qb, segb, out, lse))  # n hops: the last one brings each block home
  out = visiting[2]
  return out.reshape(B, t, N, H).astype(q.dtype), cache_k, cache_v, cache_seg


def ring_cache_attention_fn(mesh, *, kv_block: int = 512) -> decode.CacheAttentionFn | None:
  """`decode.update_and_attend` for T new tokens split over the sequence axis (T divisible by
  its size) and a cache whose slots are split over it: nothing gathered (`_ring_local`). None
  when the sequence axis is 1."""
  n = sequence_size(mesh)
  if n == 1:
    return None
  axis = sharding.mesh_axes_of("length", mesh)[0]
  spec = lambda *names: sharding.logical_to_spec(names, mesh)  # noqa: E731
  q_spec = spec("batch", "length", "heads", "head_dim")
  new_spec = spec("batch", "length", "kv_heads", "head_dim")
  cache_spec = spec(*decode.CACHE_AXES)
  seg_spec = spec("batch", "length")

  def local(q, k_new, v_new, q_seg, cache_k, cache_v, cache_seg, start, layer):
    out, k_l, v_l, cache_seg = _ring_local(q, k_new, v_new, q_seg, cache_k[layer],
                                           cache_v[layer], cache_seg, start, axis=axis, n=n,
                                           kv_block=kv_block)
    return (out, jax.lax.dynamic_update_index_in_dim(cache_k, k_l, layer, 0),
            jax.lax.dynamic_update_index_in_dim(cache_v, v_l, layer, 0), cache_seg)

  def fn(q, k_new, v_new, q_seg, cache_k, cache_v, cache_seg, start, layer):
    if q.shape[1] % n:
      raise ValueError(f"ring prefill: a chunk of {q.shape[1]} tokens does not split over the "
                       f"sequence axis of size {n}")
    # check_vma off: lax.cond's skipped branch returns the accumulators as they came, whose
    # varying-axes type the computed branch's does not match.
    return jax.shard_map(
        local, mesh=mesh, in_specs=(q_spec, new_spec, new_spec, seg_spec, cache_spec, cache_spec,
                                    seg_spec, PartitionSpec(), PartitionSpec()),
        out_specs=(q_spec, cache_spec, cache_spec, seg_spec),
        check_vma=False)(q, k_new, v_new, q_seg, cache_k, cache_v, cache_seg,
                         jnp.asarray(start, jnp.int32), jnp.asarray(layer, jnp.int32))

  return fn


def place_cache(cache: decode.KVCache, mesh) -> decode.KVCache:
  """Puts the cache on `mesh`: slots over `sequence`, batch over data x fsdp, kv heads over
  `tensor`; raises naming the dimension when the slot count does not divide."""
  if mesh is None:
    return cache
  kv = NamedSharding(mesh, sharding.logical_to_spec(decode.CACHE_AXES, mesh))
  sharding.check_divisible("KV cache [L, B, S, K, H]", cache.k.shape, kv.spec, mesh)
  seg = sharding.named_sharding(mesh, ("batch", "length"))
  return jax.device_put(cache, decode.KVCache(kv, kv, seg))


def place_params(model, mesh):
  """The model's parameters sharded by their logical names (in place), then decode's dict."""
  if mesh is not None:
    from flax import nnx  # pylint: disable=g-import-not-at-top
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, sharding.state_shardings(mesh, state)))
  return model.arrays()
