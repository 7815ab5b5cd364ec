"""The "chunked" block kernel: flash-style tiled attention in plain XLA, and the (segment id,
position) order bounds that decide which tiles (here) and ring blocks (ring_attention) can see
each other.

Same contract as block_attention's "xla" kernel (layout, masks by q_pos/kv_pos, out f32 and lse,
backward from the row's global lse and delta), with lax loops over query and key chunks of
`chunk_size` tokens: temporaries are O(chunk^2 + block length) instead of O(block length^2).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ultralong_jax.modeling import attention

# Query/key chunk of the "chunked" kernel: one [B, K, G, 1024, 1024] float32 score tile is 4 B N
# MiB per device (N = its query heads: 128 MiB for Llama-3 8B's 32, 16 MiB at tensor = 8), a few of
# which are live at once; larger tiles mean fewer loop iterations (a 32K block is 32 x 32 tiles).
CHUNK_SIZE = 1024


def order(pos, length: int):
  """A block's token order [B|1, length]: its positions, or 0..length-1 without them."""
  return attention.natural_positions(length) if pos is None else pos


def _pad(x, length: int, axis: int = 1, value=0):
  """Pads axis `axis` of x (or None) to `length` with `value`."""
  if x is None or x.shape[axis] == length:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, length - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


def _slice(x, start, size: int, axis: int = 1):
  return None if x is None else jax.lax.dynamic_slice_in_dim(x, start, size, axis)


class _Tiling(NamedTuple):
  """Chunks of a T x S block: nq x nk tiles of cq x ck (lengths zero-padded to nq cq, nk ck)."""
  t: int
  s: int
  cq: int
  ck: int
  nq: int
  nk: int

  @classmethod
  def of(cls, t: int, s: int, chunk: int):
    # A length that the chunk does not divide is padded to the next multiple (the padded queries
    # and keys are masked out), not split into smaller chunks: a prime length stays tiled.
    cq, ck = min(chunk, t), min(chunk, s)
    return cls(t, s, cq, ck, -(-t // cq), -(-s // ck))

  @property
  def padded(self) -> bool:
    return self.nq * self.cq != self.t or self.nk * self.ck != self.s

  def positions(self, q_pos, kv_pos, q_seg, kv_seg):
    """(q_pos, kv_pos) padded to the tiled lengths, and the order bounds (`bounds`) of each query
    chunk's last token [nq] and key chunk's first token [nk]: tile (i, j) is computed only when
    `sees(first_key[j], last_query[i])`."""
    top = jnp.iinfo(jnp.int32).max
    q_pos = _pad(order(q_pos, self.t), self.nq * self.cq)
    # Padded keys come last in the order, so a padded chunk is skipped like a late one.
    kv_pos = _pad(order(kv_pos, self.s), self.nk * self.ck, value=top)
    kv_seg = _pad(kv_seg, self.nk * self.ck, value=top)
    last_query = bounds(q_pos, _pad(q_seg, self.nq * self.cq), self.nq, last=True)
    return q_pos, kv_pos, last_query, bounds(kv_pos, kv_seg, self.nk, last=False)

  def mask(self, qs, ks, q_pos, kv_pos, q_seg, kv_seg, causal: bool):
    """Boolean [B|1, 1, 1, cq, ck] mask (True = attend) of the tile at offsets (qs, ks), or None."""
    mask = attention.mask(q_pos, kv_pos, q_seg, kv_seg, causal)
    if self.padded:
      real = ((qs + jnp.arange(self.cq)[:, None] < self.t)
              & (ks + jnp.arange(self.ck)[None, :] < self.s))[None, None, None]
      mask = real if mask is None else mask & real
    return mask


def bounds(pos, seg, parts: int, *, last: bool):
  """The first (or last) token of each of `parts` equal parts of the length axis in (segment id,
  position) order, over the batch: (seg [parts], pos [parts]); pos [B|1, L], seg [B, L] or None.

  A query sees a key only in its own segment at a position not after its own, so when the first
  key of a part comes after the last query of another in this order (`sees` is False), no query
  there sees any key here. For packed rows (ids increasing along the row) this is as tight as the
  index order; for any ids it never skips a visible pair.
  """
  rows = pos.shape[0] if seg is None else seg.shape[0]
  split = lambda x: jnp.broadcast_to(x, (rows, x.shape[1])).reshape(rows, parts, -1).swapaxes(
      0, 1).reshape(parts, -1)
  pos = split(pos)
  seg = jnp.zeros_like(pos) if seg is None else split(seg)
  pick, fill = (jnp.max, jnp.iinfo(jnp.int32).min) if last else (jnp.min, jnp.iinfo(jnp.int32).max)
  first_seg = pick(seg, axis=1)
  return first_seg, pick(jnp.where(seg == first_seg[:, None], pos, fill), axis=1)


def sees(first_key, last_query):
  """Whether keys starting at `first_key` can be seen by queries ending at `last_query` (both
  (seg, pos) from `bounds`; any shapes that broadcast)."""
  (key_seg, key_pos), (query_seg, query_pos) = first_key, last_query
  return (key_seg < query_seg) | ((key_seg == query_seg) & (key_pos <= query_pos))


def _at(pair, index):
  return tuple(x[index] for x in pair)


def _visible_range(visible, n: int):
  """(lo, hi): the chunks lo..hi-1 span every True of `visible` [n] (hi = lo when none is).

  The tiled loops run over this range with a dynamic trip count rather than a per-tile cond (a
  cond would carry the dq accumulator through both branches, and XLA then holds copies of it):
  for tokens sorted by (segment id, position), as packed and laid-out rows are, the visible
  chunks are contiguous and the range skips exactly the invisible ones; for any other order the
  range may include invisible tiles, which the mask zeroes.
  """
  idx = jnp.arange(n)
  hi = jnp.max(jnp.where(visible, idx + 1, 0))
  return jnp.minimum(jnp.min(jnp.where(visible, idx, n)), hi), hi


def chunked_forward(q, k, v, q_seg, kv_seg, *, causal: bool, scale: float,
                    chunk_size: int = CHUNK_SIZE, q_pos=None, kv_pos=None):
  """xla_forward tiled: online softmax over key chunks for each query chunk.

  Live scores are one [B, K, G, cq, ck] tile (flash attention, Dao et al. 2022, Algorithm 1,
  with the running max / sum of Milakov & Gimelshein 2018). Causal tiles with no visible key
  (by the positions' order) are skipped (`_visible_range`). Returns out f32 [B, T, K, G, H],
  lse [B, K, G, T].
  """
  b, t, kh, g, h = q.shape
  tiles = _Tiling.of(t, k.shape[1], chunk_size)
  q_pos, kv_pos, last_query, first_key = tiles.positions(q_pos, kv_pos, q_seg, kv_seg)
  q, q_seg = (_pad(x, tiles.nq * tiles.cq) for x in (q, q_seg))
  k, v, kv_seg = (_pad(x, tiles.nk * tiles.ck) for x in (k, v, kv_seg))

  def query_chunk(i):
    qs = i * tiles.cq
    q_i, q_seg_i, q_pos_i = (_slice(x, qs, tiles.cq) for x in (q, q_seg, q_pos))

    def key_chunk(j, carry):
      m, l, acc = carry  # running max, sum [B, K, G, cq]; unnormalized output [B, K, G, cq, H]
      ks = j * tiles.ck
      v_j = _slice(v, ks, tiles.ck)
      s = jnp.einsum("BTKGH,BSKH->BKGTS", q_i, _slice(k, ks, tiles.ck),
                     preferred_element_type=jnp.float32) * scale
      mask = tiles.mask(qs, ks, q_pos_i, _slice(kv_pos, ks, tiles.ck), q_seg_i,
                        _slice(kv_seg, ks, tiles.ck), causal)
      if mask is not None:
        s = jnp.where(mask, s, attention.NEG_INF)
      m_new = jnp.maximum(m, s.max(axis=-1))
      # A row masked so far has m = NEG_INF and sums exp(0) over masked keys; the first visible
      # key makes its correction exp(NEG_INF - m_new) = 0, which drops them.
      correction = jnp.exp(m - m_new)
      p = jnp.exp(s - m_new[..., None])
      acc = acc * correction[..., None] + jnp.einsum(
          "BKGTS,BSKH->BKGTH", p.astype(v.dtype), v_j, preferred_element_type=jnp.float32)
      return m_new, l * correction + p.sum(axis=-1), acc

    # Carries start from q_i (not constants) so that under shard_map's check_vma they vary over
    # the same mesh axes as the loop body's results.
    zero = jnp.zeros_like(q_i[..., 0], jnp.float32).transpose(0, 2, 3, 1)    # [B, K, G, cq]
    init = (zero + attention.NEG_INF, zero,
            jnp.zeros_like(q_i, jnp.float32).transpose(0, 2, 3, 1, 4))
    lo, hi = (_visible_range(sees(first_key, _at(last_query, i)), tiles.nk) if causal
              else (0, tiles.nk))
    m, l, acc = jax.lax.fori_loop(lo, hi, key_chunk, init)
    seen = m > attention.NEG_INF
    out = jnp.where(seen[..., None], acc / l[..., None], 0.0)
    return out.transpose(0, 3, 1, 2, 4), jnp.where(seen, m + jnp.log(l), attention.NEG_INF)

  # Stacked per query chunk: out [nq, B, cq, K, G, H], lse [nq, B, K, G, cq].
  out, lse = jax.lax.map(query_chunk, jnp.arange(tiles.nq))
  out = jnp.moveaxis(out, 0, 1).reshape(b, tiles.nq * tiles.cq, kh, g, h)[:, :t]
  lse = lse.transpose(1, 2, 3, 0, 4).reshape(b, kh, g, tiles.nq * tiles.cq)[..., :t]
  return out, lse


def chunked_backward(q, k, v, q_seg, kv_seg, out, lse, dout, delta, *, causal: bool, scale: float,
                     chunk_size: int = CHUNK_SIZE, q_pos=None, kv_pos=None):
  """xla_backward tiled (flash-attention 2, Dao 2023, Algorithm 2) with the row's global lse/delta.

  For each key chunk, a loop over the query chunks that see it accumulates dK, dV of that chunk
  and adds each tile's dQ into a [B, T, K, G, H] float32 accumulator: live scores are one tile.
  Padded queries have dout = 0 and delta = 0, so they add nothing.
  """
  del out  # only needed through delta
  t, s_len = q.shape[1], k.shape[1]
  tiles = _Tiling.of(t, s_len, chunk_size)
  tq, sk = tiles.nq * tiles.cq, tiles.nk * tiles.ck
  q_pos, kv_pos, last_query, first_key = tiles.positions(q_pos, kv_pos, q_seg, kv_seg)
  q, q_seg, dout = (_pad(x, tq) for x in (q, q_seg, dout))
  lse, delta = (_pad(x, tq, axis=3) for x in (lse, delta))
  k, v, kv_seg = (_pad(x, sk) for x in (k, v, kv_seg))

  def key_chunk(dq, j):
    ks = j * tiles.ck
    k_j, v_j, kv_seg_j, kv_pos_j = (_slice(x, ks, tiles.ck) for x in (k, v, kv_seg, kv_pos))

    def query_chunk(i, carry):
      dq, dk_j, dv_j = carry
      qs = i * tiles.cq
      q_i, dout_i, q_seg_i, q_pos_i = (_slice(x, qs, tiles.cq) for x in (q, dout, q_seg, q_pos))
      lse_i, delta_i = (_slice(x, qs, tiles.cq, axis=3)[..., None] for x in (lse, delta))
      s = jnp.einsum("BTKGH,BSKH->BKGTS", q_i, k_j, preferred_element_type=jnp.float32) * scale
      mask = tiles.mask(qs, ks, q_pos_i, kv_pos_j, q_seg_i, kv_seg_j, causal)
      # exp(-inf) = 0 exactly for masked keys, whatever lse is (even NEG_INF).
      p = jnp.exp(s - lse_i if mask is None else jnp.where(mask, s - lse_i, -jnp.inf))
      dv_j = dv_j + jnp.einsum("BKGTS,BTKGH->BSKH", p.astype(dout.dtype), dout_i,
                               preferred_element_type=jnp.float32)
      dp = jnp.einsum("BTKGH,BSKH->BKGTS", dout_i, v_j, preferred_element_type=jnp.float32)
      ds = p * (dp - delta_i) * scale
      dq_i = _slice(dq, qs, tiles.cq) + jnp.einsum(
          "BKGTS,BSKH->BTKGH", ds.astype(k.dtype), k_j, preferred_element_type=jnp.float32)
      dk_j = dk_j + jnp.einsum("BKGTS,BTKGH->BSKH", ds.astype(q.dtype), q_i,
                               preferred_element_type=jnp.float32)
      return jax.lax.dynamic_update_slice_in_dim(dq, dq_i, qs, 1), dk_j, dv_j

    zero = jnp.zeros_like(k_j, jnp.float32)  # varies like k_j under check_vma (see forward)
    lo, hi = (_visible_range(sees(_at(first_key, j), last_query), tiles.nq) if causal
              else (0, tiles.nq))
    dq, dk_j, dv_j = jax.lax.fori_loop(lo, hi, query_chunk, (dq, zero, zero))
    return dq, (dk_j, dv_j)

  dq, (dk, dv) = jax.lax.scan(key_chunk, jnp.zeros_like(q, jnp.float32), jnp.arange(tiles.nk))
  dk, dv = (jnp.moveaxis(x, 0, 1).reshape((x.shape[1], sk) + x.shape[3:])[:, :s_len]
            for x in (dk, dv))
  return dq[:, :t], dk, dv
