"""The KV cache and attention to it: chunked prefill and one-token decode run the model's own
decoder layer (llama.forward) with a cache-updating attention closure.

Shapes: B batch, T new tokens (a prefill chunk, or 1 when decoding), S cache slots, N query heads,
K kv heads, G = N / K, H head dim, D width, V vocab, L layers.

The KV cache holds keys (after RoPE) and values of every layer in natural token order:

  k, v         [L, B, S, K, H]   ("layers", "batch", "length", "kv_heads", "head_dim")
  segment_ids  [B, S] int32      ("batch", "length"): 1 = a token, 0 = padding or not yet written

so on a mesh the slots are split contiguously over the `sequence` axis (device d holds slots
[d S/n, (d+1) S/n)) by the same sharding table as training. Prompts are LEFT-padded: every row's
prompt ends at the same slot, so all rows write the same slot when decoding (one scalar index),
while `positions` (for RoPE) count each row's own tokens. A query at slot t sees the keys at slots
<= t with its own segment id (attention.mask with slots as the order): tokens see tokens, padding
sees padding (never an empty row).

Attention to the cache is `update_and_attend`: write the new keys/values, then attend with an
online softmax over blocks of `kv_block` slots. Under `jax.shard_map` over `sequence` (the
`cache_attention_fn` built by evaluation/sharded_cache.py; this module stays mesh-agnostic) each
device writes only the slots it owns and attends the (all-gathered) new queries to them, and the
per-device partial results are merged by log-sum-exp (pmax / psum), so the cache is never
gathered. Prefill chunks use the ring form of the same closure (`ring_cache_attention_fn`): the
chunk's tokens stay split over `sequence` too, and its keys/values and then its queries travel
around the ring, so no device holds a whole chunk or the whole cache.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from ultralong_jax.modeling import attention as attention_lib
from ultralong_jax.modeling import llama
from ultralong_jax.modeling.config import LlamaConfig

CACHE_AXES = ("layers", "batch", "length", "kv_heads", "head_dim")


class KVCache(NamedTuple):
  k: jax.Array            # [L, B, S, K, H]
  v: jax.Array            # [L, B, S, K, H]
  segment_ids: jax.Array  # [B, S] int32


def init_cache(config: LlamaConfig, batch: int, length: int, dtype=None) -> KVCache:
  """An empty cache of `length` slots (evaluation/sharded_cache.py places it on a mesh)."""
  shape = (config.num_layers, batch, length, config.num_kv_heads, config.head_dim)
  dtype = jnp.dtype(dtype or config.dtype)
  return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                 jnp.zeros((batch, length), jnp.int32))


# --- attention to the cache --------------------------------------------------------------------

def _partial_attention(q, k, v, q_slot, q_seg, kv_slot, kv_seg, *, scale, kv_block):
  """Attention of q to one device's cache slots, online softmax over blocks of `kv_block` keys.

  q [B,T,K,G,H], k, v [B,S,K,H], q_slot [T], q_seg [B,T], kv_slot [S], kv_seg [B,S].
  Returns out [B,T,K,G,H] float32 normalized over these slots and lse [B,K,G,T].
  """
  B, T, K, G, H = q.shape
  S = k.shape[1]
  nb = S // kv_block
  blocks = tuple(x.reshape(x.shape[0], nb, kv_block, *x.shape[2:]).swapaxes(0, 1)
                 for x in (k, v, kv_seg)) + (kv_slot.reshape(nb, kv_block),)

  def step(carry, block):
    out, m, l = carry
    kb, vb, segb, slotb = block
    s = jnp.einsum("BTKGH,BSKH->BKGTS", q, kb, preferred_element_type=jnp.float32) * scale
    visible = attention_lib.mask(q_slot[None], slotb[None], q_seg, segb, causal=True)
    s = jnp.where(visible, s, attention_lib.NEG_INF)
    m_new = jnp.maximum(m, s.max(-1))
    p = jnp.exp(s - m_new[..., None])
    corr = jnp.exp(m - m_new)
    l = l * corr + p.sum(-1)
    pv = jnp.einsum("BKGTS,BSKH->BTKGH", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
    out = out * corr.transpose(0, 3, 1, 2)[..., None] + pv
    return (out, m_new, l), None

  init = (jnp.zeros((B, T, K, G, H), jnp.float32), jnp.full((B, K, G, T), attention_lib.NEG_INF, jnp.float32),
          jnp.zeros((B, K, G, T), jnp.float32))
  (out, m, l), _ = jax.lax.scan(step, init, blocks)
  return out / l.transpose(0, 3, 1, 2)[..., None], m + jnp.log(l)


def _write(cache, new, start):
  """Stores new [B,T,...] at slots start.. of this device's cache [B,S_local,...]; slots owned by
  other devices arrive as indices out of range and are dropped."""
  S = cache.shape[1]
  idx = start + jnp.arange(new.shape[1])
  idx = jnp.where((idx >= 0) & (idx < S), idx, S)  # S is out of bounds: mode="drop" skips it
  return cache.at[:, idx].set(new.astype(cache.dtype), mode="drop")


def update_and_attend(q, k_new, v_new, q_seg, cache_k, cache_v, cache_seg, start, *,
                      kv_block: int = 512, axis: str | None = None):
  """Writes k/v of T new tokens at slots [start, start+T) and attends q to the whole cache.

  q [B,T,N,H], k_new, v_new [B,T,K,H], q_seg [B,T]; cache_k, cache_v [B,S,K,H], cache_seg [B,S];
  start: scalar slot of the first new token. Returns (out [B,T,N,H], cache_k, cache_v,
  cache_seg). `kv_block` must divide S.

  Called inside `jax.shard_map` with `axis` (the mesh axis the slots are split over), the cache
  arguments are this device's slots and the partial results of all devices are merged by
  log-sum-exp; new tokens falling in other devices' slots are not written here.
  """
  S_local = cache_k.shape[1]
  offset = 0 if axis is None else jax.lax.axis_index(axis) * S_local
  cache_k = _write(cache_k, k_new, start - offset)
  cache_v = _write(cache_v, v_new, start - offset)
  cache_seg = _write(cache_seg, q_seg, start - offset)
  B, T, N, H = q.shape
  K = k_new.shape[2]
  q_slot = start + jnp.arange(T)
  out, lse = _partial_attention(q.reshape(B, T, K, N // K, H), cache_k, cache_v, q_slot, q_seg,
                                offset + jnp.arange(S_local), cache_seg, scale=H ** -0.5,
                                kv_block=min(kv_block, S_local))
  if axis is not None:
    # Each device's out is normalized over its own slots: reweigh by exp(lse_d - lse_total).
    lse_max = jax.lax.pmax(lse, axis)
    w = jnp.exp(lse - lse_max)
    total = jax.lax.psum(w, axis)
    out = jax.lax.psum(out * (w / total).transpose(0, 3, 1, 2)[..., None], axis)
  return out.reshape(B, T, N, H).astype(q.dtype), cache_k, cache_v, cache_seg


CacheAttentionFn = Callable[..., tuple]
"""(q, k_new, v_new, q_seg, cache_k, cache_v, cache_seg, start) -> as update_and_attend."""


# --- the cached forward ------------------------------------------------------------------------

def forward(config: LlamaConfig, params: dict, cache: KVCache, input_ids: jax.Array,
            positions: jax.Array, segment_ids: jax.Array, start, *,
            cache_attention_fn: CacheAttentionFn = update_and_attend,
            constrain: Callable[[jax.Array, tuple], jax.Array] | None = None,
            ) -> tuple[jax.Array, KVCache]:
  """T new tokens through the model (llama.forward) with the cache: (final-normed hidden
  [B,T,D], new cache).

  params: `Llama.arrays()`. input_ids, positions, segment_ids [B,T] in natural order at slots
  [start, start+T). `cache_attention_fn` is `update_and_attend` or a sharded form of it
  (evaluation/sharded_cache.py); `constrain(x, logical_names)` hints activation shardings.
  """

  def attention(q, k, v, layer, state):
    cache_k, cache_v, cache_seg = state
    out, k_l, v_l, cache_seg = cache_attention_fn(
        q, k, v, segment_ids, cache_k[layer], cache_v[layer], cache_seg, start)
    cache_k = jax.lax.dynamic_update_index_in_dim(cache_k, k_l, layer, 0)
    cache_v = jax.lax.dynamic_update_index_in_dim(cache_v, v_l, layer, 0)
    return out, (cache_k, cache_v, cache_seg)

  hidden, state = llama.forward(config, params, input_ids, positions, attention, tuple(cache),
                                constrain=constrain)
  return hidden, KVCache(*state)
