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

Attention to the cache: a prefill chunk (T > 1) goes through `update_and_attend` (write the new
keys/values, then attend with an online softmax over blocks of `kv_block` slots); a decode step
(T = 1) through `attend_token` in every layer (read only: the cached slots in place, plus the
token itself) and one `write_tokens` after the last layer, so the cache is updated in place.
Under `jax.shard_map` over `sequence` (the `cache_attention_fn` and `token_fns` built by
evaluation/sharded_cache.py; this module stays mesh-agnostic) each
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


def _merge_devices(out, lse, axis):
  """Partial results out [B,T,K,G,H], lse [B,K,G,T], each normalized over one device's slots, to
  the result over all devices of `axis` (reweighed by exp(lse_d - lse_total))."""
  lse_max = jax.lax.pmax(lse, axis)
  w = jnp.exp(lse - lse_max)
  total = jax.lax.psum(w, axis)
  return jax.lax.psum(out * (w / total).transpose(0, 3, 1, 2)[..., None], axis)


def update_and_attend(q, k_new, v_new, q_seg, cache_k, cache_v, cache_seg, start, layer, *,
                      kv_block: int = 512, axis: str | None = None):
  """Writes layer `layer`'s k/v of T new tokens at slots [start, start+T) and attends q to the
  whole cache of that layer (prefill chunks; `attend_token` is the one-token form).

  q [B,T,N,H], k_new, v_new [B,T,K,H], q_seg [B,T]; cache_k, cache_v [L,B,S,K,H] (all layers),
  cache_seg [B,S]; start: scalar slot of the first new token; layer: scalar layer index.
  Returns (out [B,T,N,H], cache_k, cache_v, cache_seg). `kv_block` must divide S.

  Called inside `jax.shard_map` with `axis` (the mesh axis the slots are split over), the cache
  arguments are this device's slots and the partial results of all devices are merged by
  log-sum-exp; new tokens falling in other devices' slots are not written here.
  """
  S_local = cache_k.shape[2]
  offset = 0 if axis is None else jax.lax.axis_index(axis) * S_local
  B, T, N, H = q.shape
  K = k_new.shape[2]
  k_l = _write(cache_k[layer], k_new, start - offset)
  v_l = _write(cache_v[layer], v_new, start - offset)
  cache_seg = _write(cache_seg, q_seg, start - offset)
  out, lse = _partial_attention(q.reshape(B, T, K, N // K, H), k_l, v_l, start + jnp.arange(T),
                                q_seg, offset + jnp.arange(S_local), cache_seg,
                                scale=H ** -0.5, kv_block=min(kv_block, S_local))
  if axis is not None:
    out = _merge_devices(out, lse, axis)
  cache_k = jax.lax.dynamic_update_index_in_dim(cache_k, k_l, layer, 0)
  cache_v = jax.lax.dynamic_update_index_in_dim(cache_v, v_l, layer, 0)
  return out.reshape(B, T, N, H).astype(q.dtype), cache_k, cache_v, cache_seg


def attend_token(q, k_new, v_new, q_seg, cache_k, cache_v, cache_seg, start, layer, *,
                 kv_block: int = 512, axis: str | None = None):
  """Attention of one new token per row to layer `layer`'s cached slots before `start` and to
  itself; the cache is only read (`write_tokens` stores the new keys/values after all layers).

  q [B,1,N,H], k_new, v_new [B,1,K,H], q_seg [B,1]; cache_k, cache_v [L,B,S,K,H] (all layers),
  cache_seg [B,S]; start: the new token's slot; layer: scalar layer index. Returns out [B,1,N,H].

  Why not update_and_attend: writing each layer's token into the stacked cache between reads
  makes XLA copy the whole cache (every layer) per layer to keep the version the next read
  needs; reading the blocks in place with multiply-and-reduce (not a dot, whose operand XLA
  copies first) and writing once per step leaves the cache where it is. Under `jax.shard_map`
  with `axis`, the device owning slot `start` adds the token itself and the per-device results
  merge by log-sum-exp.
  """
  B, _, N, H = q.shape
  K = k_new.shape[2]
  G = N // K
  S_local = cache_k.shape[2]
  kv_block = min(kv_block, S_local)
  offset = 0 if axis is None else jax.lax.axis_index(axis) * S_local
  q = q.reshape(B, K, G, H).astype(jnp.float32) * H ** -0.5
  q_seg = q_seg[:, 0]

  def step(carry, block):
    out, m, l = carry
    first = block * kv_block
    kb, vb = (jax.lax.dynamic_slice(c, (layer, 0, first, 0, 0), (1, B, kv_block, K, H))[0]
              for c in (cache_k, cache_v))
    segb = jax.lax.dynamic_slice(cache_seg, (0, first), (B, kv_block))
    s = jnp.sum(q[:, None] * kb[:, :, :, None].astype(jnp.float32), axis=-1)  # [B,S,K,G]
    # Slots before the token's own (start - 1 and earlier), within its segment.
    visible = attention_lib.mask(jnp.reshape(start - 1, (1, 1)),
                                 (offset + first + jnp.arange(kv_block))[None], q_seg[:, None],
                                 segb, causal=True)[:, 0, 0, 0]
    s = jnp.where(visible[:, :, None, None], s, attention_lib.NEG_INF)
    m_new = jnp.maximum(m, s.max(1))
    p = jnp.exp(s - m_new[:, None])
    corr = jnp.exp(m - m_new)
    pv = jnp.sum(p[..., None] * vb[:, :, :, None].astype(jnp.float32), axis=1)  # [B,K,G,H]
    return (out * corr[..., None] + pv, m_new, l * corr + p.sum(1)), None

  # The token itself starts the online softmax (on the device owning its slot), stored as the
  # cache stores it.
  k_self, v_self = (x.astype(cache_k.dtype).astype(jnp.float32).reshape(B, K, 1, H)
                    for x in (k_new, v_new))
  s_self = jnp.sum(q * k_self, axis=-1)  # [B,K,G]
  if axis is not None:
    s_self = jnp.where((start >= offset) & (start < offset + S_local), s_self,
                       attention_lib.NEG_INF)
  init = (jnp.broadcast_to(v_self, (B, K, G, H)), s_self, jnp.ones((B, K, G), jnp.float32))
  (out, m, l), _ = jax.lax.scan(step, init, jnp.arange(S_local // kv_block))
  if axis is not None:
    out = _merge_devices((out / l[..., None])[:, None], (m + jnp.log(l))[..., None], axis)[:, 0]
  else:
    out = out / l[..., None]
  return out.reshape(B, 1, N, H).astype(k_new.dtype)


def write_tokens(cache_k, cache_v, cache_seg, k_new, v_new, q_seg, start, *,
                 axis: str | None = None):
  """Stores one token's keys/values of every layer, k_new, v_new [L,B,1,K,H], and its segment
  ids q_seg [B,1] at slot `start` (this device's slots [L,B,S_local,K,H] under `axis`; a slot
  another device owns is not written). Returns (cache_k, cache_v, cache_seg)."""
  S_local = cache_k.shape[2]
  offset = 0 if axis is None else jax.lax.axis_index(axis) * S_local
  slot = start - offset
  slot = jnp.where((slot >= 0) & (slot < S_local), slot, S_local)  # out of bounds: dropped
  cache_k = cache_k.at[:, :, slot].set(k_new[:, :, 0].astype(cache_k.dtype), mode="drop")
  cache_v = cache_v.at[:, :, slot].set(v_new[:, :, 0].astype(cache_v.dtype), mode="drop")
  cache_seg = cache_seg.at[:, slot].set(q_seg[:, 0], mode="drop")
  return cache_k, cache_v, cache_seg


CacheAttentionFn = Callable[..., tuple]
"""(q, k_new, v_new, q_seg, cache_k, cache_v, cache_seg, start, layer) -> as update_and_attend
(cache_k, cache_v: all layers)."""


class TokenFns(NamedTuple):
  """A decode step's cache functions: `attend_token` and `write_tokens`, or sharded forms of
  them (evaluation/sharded_cache.py)."""
  attend: Callable[..., jax.Array] = attend_token
  write: Callable[..., tuple] = write_tokens


# --- the cached forward ------------------------------------------------------------------------

def forward(config: LlamaConfig, params: dict, cache: KVCache, input_ids: jax.Array,
            positions: jax.Array, segment_ids: jax.Array, start, *,
            cache_attention_fn: CacheAttentionFn = update_and_attend,
            token_fns: TokenFns = TokenFns(),
            constrain: Callable[[jax.Array, tuple], jax.Array] | None = None,
            ) -> tuple[jax.Array, KVCache]:
  """T new tokens through the model (llama.forward) with the cache: (final-normed hidden
  [B,T,D], new cache).

  params: `Llama.arrays()` (or `llama.unstack_layers` of it). input_ids, positions, segment_ids
  [B,T] in natural order at slots [start, start+T). T > 1 goes through `cache_attention_fn`
  (`update_and_attend` or a sharded form of it, evaluation/sharded_cache.py) layer by layer;
  T = 1 (a decode step) through `token_fns`: every layer reads the cache, and the step's keys and
  values are written once after the last layer. `constrain(x, logical_names)` hints activation
  shardings.
  """
  if input_ids.shape[1] > 1:
    def attention(q, k, v, layer, state):
      out, *state = cache_attention_fn(q, k, v, segment_ids, *state, start, layer)
      return out, tuple(state)

    hidden, state = llama.forward(config, params, input_ids, positions, attention, tuple(cache),
                                  constrain=constrain)
    return hidden, KVCache(*state)

  def token_attention(q, k, v, layer, new):
    out = token_fns.attend(q, k, v, segment_ids, *cache, start, layer)
    return out, tuple(jax.lax.dynamic_update_index_in_dim(x, y.astype(x.dtype), layer, 0)
                      for x, y in zip(new, (k, v)))

  L, B, _, K, H = cache.k.shape
  new = (jnp.zeros((L, B, 1, K, H), cache.k.dtype),) * 2
  hidden, (k_new, v_new) = llama.forward(config, params, input_ids, positions, token_attention,
                                         new, constrain=constrain)
  # The write must follow every layer's read of the cache: the barrier makes it depend on the
  # last hidden state (which every read feeds), so XLA updates the cache in place instead of
  # copying it to keep the old version readable.
  hidden, k_new, v_new = jax.lax.optimization_barrier((hidden, k_new, v_new))
  return hidden, KVCache(*token_fns.write(*cache, k_new, v_new, segment_ids, start))
