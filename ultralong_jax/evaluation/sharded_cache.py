"""The KV cache on a device mesh: slots split over `sequence`, attention merged by log-sum-exp.

`modeling/decode.py` is mesh-agnostic; this module gives it the sharded pieces:
  cache_attention_fn(mesh)  `decode.update_and_attend` under `jax.shard_map` over `sequence`:
                            new queries/keys arrive whole on every sequence device (all-gathered
                            by GSPMD, they are one chunk or one token), each device writes and
                            attends to its own slots, partial results merge by pmax/psum.
  place_cache, place_params by the logical names of the one sharding table (parallel/sharding.py).
  ring_prefill_fn(mesh)     the training ring attention for a prompt's first chunk (zigzag layout).
Shapes as in decode.py.
"""

from __future__ import annotations

import functools
import math

import jax
from jax.sharding import NamedSharding, PartitionSpec

from ultralong_jax.modeling import decode
from ultralong_jax.parallel import layout, sharding


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
  cache_spec = spec("batch", "length", "kv_heads", "head_dim")
  seg_spec = spec("batch", "length")

  def fn(q, k_new, v_new, q_seg, cache_k, cache_v, cache_seg, start, *, attend=True):
    local = functools.partial(decode.update_and_attend, kv_block=kv_block, attend=attend,
                              axis=axis)
    in_specs = (q_spec, new_spec, new_spec, spec("batch", None), cache_spec, cache_spec,
                seg_spec, PartitionSpec())
    out_specs = (q_spec if attend else None, cache_spec, cache_spec, seg_spec)
    if not attend:  # shard_map wants an array for every output: drop the None one around it
      inner = local
      local = lambda *a: inner(*a)[1:]  # noqa: E731
      out_specs = out_specs[1:]
    # check_vma off: the psum'd output is the same on all sequence devices, which VMA typing
    # cannot infer through pmax/psum of the exp-weights.
    result = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                           check_vma=False)(q, k_new, v_new, q_seg, cache_k, cache_v, cache_seg,
                                            jax.numpy.asarray(start, jax.numpy.int32))
    return result if attend else (None, *result)

  return fn


def ring_prefill_fn(mesh, **ring_options):
  """(attention_fn, layout permutation for a chunk length) for a prompt's first chunk, or None
  when the sequence axis is 1. The chunk length must be divisible by 2 x sequence size."""
  if sequence_size(mesh) == 1:
    return None
  from ultralong_jax.parallel import ring_attention  # pylint: disable=g-import-not-at-top
  n = sequence_size(mesh)
  attention_fn = ring_attention.make_attention_fn(mesh, **ring_options)
  layout_name = ring_options.get("layout", "zigzag")
  return attention_fn, lambda length: layout.permutation(length, n, layout_name)


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
