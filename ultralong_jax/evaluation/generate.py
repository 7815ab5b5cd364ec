"""Text generation with a KV cache: chunked (sequence-sharded) prefill, then every new token in
one compiled loop.

Batched prompts of different lengths are LEFT-padded to a common length P (a multiple of the
prefill chunk), so every row's prompt ends at slot P - 1 and decoding writes one shared slot per
step; each row's RoPE positions count its own tokens only (0 .. len-1, then len, len+1, ...) and
padding is masked by segment ids, so a row's tokens do not depend on the other rows (the tests
check this against transformers' `generate` run prompt by prompt).

On a mesh, every prompt chunk stays split over the `sequence` axis, like the cache's slots: its
keys/values and then its queries travel around the ring (sharded_cache.ring_cache_attention_fn),
so a device's prefill working set is O((chunk + cache) / n) and a whole prompt can go through as
one chunk; decode steps attend the one new token to the sharded cache with the log-sum-exp merge
(sharded_cache.cache_attention_fn). The batch is split
over data x fsdp, so a batch that does not divide by it gets copies of its last prompt as padding
rows (`CachedModel.pad_rows`): they do the work of a real row, change no other row, and are never
returned. Sampling: greedy (temperature 0) or temperature + top-p (nucleus) sampling; stop tokens
end a row (the stop token is kept, as transformers does; later steps are not returned).

Decoding after the prefill is one jitted `lax.while_loop` (`CachedModel.decode_loop`): sampling,
the PRNG split per step, the [B, max_new_tokens] token buffer and the per-row done flags all stay
on the device, and the loop ends when every row is done, so the host waits once per call instead
of once per token. `generate(loop="host")` runs the same steps from Python, one jitted step per
token (the benchmark's baseline; same tokens for the same seed).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import threading
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ultralong_jax.evaluation import sampling, sharded_cache
from ultralong_jax.modeling import decode, llama
from ultralong_jax.parallel import sharding


# Jitted forwards of CachedModels, by (config, mesh, kv_block, ring, unrolled decode): they take the
# parameters as arguments, so a second model of one architecture on one mesh (the demo's stage 2
# after its stage 1, a checkpoint sweep) runs the programs the first one compiled instead of
# compiling them again. The newest _SHARED_MAX architectures are kept.
_SHARED: collections.OrderedDict[tuple, dict] = collections.OrderedDict()
_SHARED_MAX = 4
_LOCK = threading.Lock()  # CachedModel may be called from several threads (niah --workers)


def _shared_compiled(key: tuple) -> dict:
  with _LOCK:
    compiled = _SHARED.pop(key, None)
    _SHARED[key] = compiled = {} if compiled is None else compiled
    while len(_SHARED) > _SHARED_MAX:
      _SHARED.popitem(last=False)
    return compiled


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


@dataclasses.dataclass
class Batch:
  """Left-padded prompts: ids, positions, segment_ids [B,P] (segment 1 = token, 0 = padding)."""
  ids: np.ndarray
  positions: np.ndarray
  segment_ids: np.ndarray
  lengths: np.ndarray


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int = 0) -> Batch:
  """Left-pads token lists to `length`; raises ValueError for empty or too long prompts."""
  B = len(prompts)
  lengths = np.array([len(p) for p in prompts], np.int32)
  if B == 0 or lengths.min() == 0:
    raise ValueError("generate: every prompt needs at least one token.")
  if lengths.max() > length:
    raise ValueError(f"generate: a prompt has {lengths.max()} tokens, more than {length}.")
  ids = np.full((B, length), pad_id, np.int32)
  positions = np.zeros((B, length), np.int32)
  segment_ids = np.zeros((B, length), np.int32)
  for b, p in enumerate(prompts):
    n = len(p)
    ids[b, length - n:] = np.asarray(p, np.int32)
    positions[b, length - n:] = np.arange(n)
    segment_ids[b, length - n:] = 1
  return Batch(ids, positions, segment_ids, lengths)


class CachedModel:
  """A model ready for cached forwards on an optional mesh.

  `model`: a `modeling.llama.Llama` (e.g. from `ultralong_jax.from_pretrained`); on a mesh its
  parameters are re-sharded in place by their logical names. `kv_block` bounds the attention
  temporaries ([B, N, T/n, kv_block] scores per block); `ring=False` prefills with the chunk's
  queries gathered on every sequence device instead (the decode step's path; for comparison).
  `unrolled_decode`: decode steps (one token) run the layers as an unrolled loop over a per-layer
  copy of the layer weights (`llama.unstack_layers`; it costs their size in memory once more)
  instead of the scan over the stacked [L, ...] arrays, whose slice XLA on CPU copies before every
  matmul, per token; None (default): on CPU only. Prefill scans the stacked weights either way.
  """

  def __init__(self, model, mesh=None, *, kv_block: int = 512, ring: bool = True,
               unrolled_decode: bool | None = None):
    self.config, self.mesh = model.config, mesh
    self._warned_past = 0  # the longest prompt + new tokens warned about (past max positions)
    self.params = sharded_cache.place_params(model, mesh)
    if unrolled_decode is None:
      unrolled_decode = (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
                         ).platform == "cpu"
    # Jitted: eager indexing of mesh-sharded arrays left JAX 0.12's device_put of a later
    # single-device array to another mesh failing (an assertion in dispatch.py).
    self.decode_params = (jax.jit(llama.unstack_layers)(self.params) if unrolled_decode
                          else self.params)
    self.n = sharded_cache.sequence_size(mesh)
    self.rows = sharded_cache.batch_size(mesh)
    self.kv_block = kv_block
    self._cache_attention = sharded_cache.cache_attention_fn(mesh, kv_block=kv_block)
    self._token_fns = sharded_cache.token_fns(mesh, kv_block=kv_block)
    self._ring_attention = (sharded_cache.ring_cache_attention_fn(mesh, kv_block=kv_block)
                            if ring else None)
    self._constrain = sharding.constrain_fn(mesh) if mesh is not None else None
    self._compiled = _shared_compiled((self.config, mesh, kv_block, ring, unrolled_decode))

  def chunk_multiple(self) -> int:
    """Prefill chunks are multiples of this (the sequence size: the ring splits them evenly)."""
    return self.n

  def pad_rows(self, rows: Sequence) -> list:
    """`rows` followed by copies of the last one up to a multiple of the mesh's data x fsdp (the
    cache's batch dimension is split over them); callers drop results past len(rows)."""
    return list(rows) + list(rows[-1:]) * (-len(rows) % self.rows)

  def cache_slots(self, needed_slots: int) -> int:
    """Slots of a cache holding `needed_slots`: padded so each device's share is a multiple of
    kv_block (or one block)."""
    local = -(-needed_slots // self.n)
    return _round_up(local, min(self.kv_block, local)) * self.n

  def new_cache(self, batch: int, needed_slots: int) -> decode.KVCache:
    """An empty cache of `cache_slots(needed_slots)` slots, placed on the mesh."""
    cache = decode.init_cache(self.config, batch, self.cache_slots(needed_slots))
    return sharded_cache.place_cache(cache, self.mesh)

  def _fn(self, head: str, ring: bool, length: int):
    key = (head, ring, length)
    with _LOCK:
      if key in self._compiled:
        return self._compiled[key]
    forward = functools.partial(
        decode.forward, self.config, constrain=self._constrain, token_fns=self._token_fns,
        cache_attention_fn=self._ring_attention if ring else self._cache_attention)

    def run(params, cache, ids, positions, segment_ids, start, targets):
      hidden, cache = forward(params, cache, ids, positions, segment_ids, start)
      if head == "last":
        return llama.logits(params["lm_head"], hidden[:, -1:])[:, 0], cache
      logp = jax.nn.log_softmax(llama.logits(params["lm_head"], hidden), axis=-1)
      target_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
      if head == "nll":  # per-token negative log-likelihood of `targets` [B,T] (float32)
        return -target_logp, cache
      # "logprob": log p(target) [B,T] and whether the target is the argmax (greedy) token.
      return (target_logp, jnp.argmax(logp, axis=-1) == targets), cache

    with _LOCK:
      return self._compiled.setdefault(key, jax.jit(run, donate_argnums=(1,)))

  def step(self, cache, ids, positions, segment_ids, start: int, *, head="last", targets=None):
    """T tokens at slots [start, start+T) -> (out, cache); out by `head`: "last": last-token
    logits [B,V]; "nll": NLL of `targets` [B,T]; "logprob": (log p(targets) [B,T], targets are
    the argmax [B,T])."""
    T = ids.shape[1]
    ring = self._ring_attention is not None and T > 1 and T % self.n == 0
    targets = jnp.zeros_like(ids) if targets is None else targets
    fn = self._fn(head, ring, T)
    return fn(self.decode_params if T == 1 else self.params, cache, jnp.asarray(ids),
              jnp.asarray(positions), jnp.asarray(segment_ids), jnp.asarray(start, jnp.int32),
              jnp.asarray(targets))

  def prefill(self, batch: Batch, cache, chunk: int):
    """All prompt chunks through the cache; returns (last-token logits [B,V], cache)."""
    P = batch.ids.shape[1]
    logits = None
    for start in range(0, P, chunk):
      s = slice(start, start + chunk)
      logits, cache = self.step(cache, batch.ids[:, s], batch.positions[:, s],
                                batch.segment_ids[:, s], start)
    return logits, cache

  def score(self, rows: Sequence[Sequence[int]], length: int, *, chunk: int = 8192
            ) -> tuple[np.ndarray, np.ndarray]:
    """Next-token log-probabilities of token rows, teacher-forced, in prefill chunks.

    Row b's inputs are rows[b][:-1] and its targets rows[b][1:], at positions 0 .. len - 2,
    right-padded (segment 0) to `length` rounded up to the chunk, which callers bucket so that few
    shapes compile. Returns (logp [B, length] float32, greedy [B, length] bool): logp[b, t] =
    log p(rows[b][t+1] | rows[b][:t+1]) and whether that token is the argmax; zero / False past
    len(rows[b]) - 1. B is len(rows) (padding rows for the mesh are dropped).
    """
    too_long = [i for i, r in enumerate(rows) if not 2 <= len(r) <= length + 1]
    if not rows or too_long:
      raise ValueError(f"score: rows {too_long} need 2 .. length + 1 = {length + 1} tokens.")
    padded_rows = self.pad_rows(rows)
    B = len(padded_rows)
    chunk = _round_up(min(chunk, length), self.chunk_multiple())
    padded = _round_up(length, chunk)
    inputs = np.zeros((B, padded), np.int32)
    targets = np.zeros((B, padded), np.int32)
    segment_ids = np.zeros((B, padded), np.int32)
    for b, row in enumerate(padded_rows):
      n = len(row) - 1
      inputs[b, :n], targets[b, :n], segment_ids[b, :n] = row[:-1], row[1:], 1
    # Padding after every real token changes none of their outputs (causal attention).
    positions = np.broadcast_to(np.arange(padded, dtype=np.int32), (B, padded))
    cache = self.new_cache(B, padded)
    logp, greedy = [], []
    for start in range(0, padded, chunk):
      s = slice(start, start + chunk)
      (lp, hit), cache = self.step(cache, inputs[:, s], positions[:, s], segment_ids[:, s], start,
                                   head="logprob", targets=targets[:, s])
      logp.append(np.asarray(lp))
      greedy.append(np.asarray(hit))
    real = segment_ids[:len(rows), :length] > 0
    logp = np.where(real, np.concatenate(logp, axis=1)[:len(rows), :length], 0.0)
    greedy = np.concatenate(greedy, axis=1)[:len(rows), :length] & real
    return logp, greedy

  def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
               temperature: float = 0.0, top_p: float = 1.0, stop_tokens: Sequence[int] = (),
               seed: int = 0, prefill_chunk: int = 8192, pad_id: int = 0,
               prompt_slots: int = 0, loop: str = "device") -> list[list[int]]:
    """New tokens for each prompt (token id lists), at most `max_new_tokens` each.

    Prompts are left-padded to at least `prompt_slots` slots: callers running many batches pass a
    bucket length, so that batches of different longest prompts share compiled shapes. `loop`:
    "device" decodes all new tokens in one compiled loop (`decode_loop`); "host" runs one jitted
    step per token from Python (the baseline of `python -m ultralong_jax.bench.decode`); both give
    the same tokens for the same seed."""
    if loop not in ("device", "host"):
      raise ValueError(f'generate: loop must be "device" or "host", got {loop!r}.')
    if max_new_tokens < 1:
      raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}.")
    if temperature < 0 or not 0 < top_p <= 1:
      raise ValueError(f"generate: need temperature >= 0 and 0 < top_p <= 1, got "
                       f"temperature={temperature}, top_p={top_p}.")
    if not prompts:
      raise ValueError("generate: no prompts given.")
    longest = max(max(len(p) for p in prompts), prompt_slots)
    chunk = _round_up(min(prefill_chunk, max(longest, 1)), self.chunk_multiple())
    batch = left_pad(self.pad_rows(prompts), _round_up(max(longest, 1), chunk), pad_id)
    B, P = batch.ids.shape
    if P + max_new_tokens > max(self.config.max_position_embeddings, self._warned_past):
      # Not an error: extrapolation is a thing to measure; but say so (once per new maximum, not
      # once per cell of a grid).
      self._warned_past = P + max_new_tokens
      logging.warning("generate: %d slots exceed the model's max_position_embeddings %d.",
                      P + max_new_tokens, self.config.max_position_embeddings)
    cache = self.new_cache(B, P + max_new_tokens)
    logits, cache = self.prefill(batch, cache, chunk)
    stops = np.asarray(list(stop_tokens) or [-1], np.int32)  # -1: no token id, never a stop
    done = np.arange(B) >= len(prompts)  # padding rows: never collected, never wait for a stop
    if loop == "host":
      return self._decode_on_host(logits, cache, batch.lengths, done, stops, P, seed,
                                  max_new_tokens, temperature, top_p)[:len(prompts)]
    fn = self.decode_loop(max_new_tokens, temperature, top_p)
    tokens, counts, _, _ = fn(self.decode_params, cache, logits, jnp.asarray(batch.lengths),
                              jnp.asarray(done), jnp.asarray(stops), jax.random.PRNGKey(seed),
                              jnp.asarray(P, jnp.int32))
    tokens, counts = np.asarray(tokens), np.asarray(counts)
    return [tokens[b, :counts[b]].tolist() for b in range(len(prompts))]

  def decode_loop(self, max_new_tokens: int, temperature: float, top_p: float):
    """The whole decode after prefill as one jitted `lax.while_loop` (compiled once per shape):

      fn(params, cache, logits [B,V], positions [B], done [B] bool, stops [n] int32, key, start)
        -> (tokens [B, max_new_tokens] int32, counts [B] int32, steps, cache)

    `params`: `self.decode_params` (or `self.params`).
    `logits`: the prompts' last-token logits; `positions`: each row's first new RoPE position (its
    prompt length); `done`: rows that start finished (padding rows); `start`: the slot of the first
    new token. Each step splits `key` (as the host loop does), samples, writes the tokens into
    column `step`, counts them for rows not yet done, marks rows that drew a stop token as done,
    and feeds the tokens back through the cache unless every row is done or the buffer is full.
    Row b's tokens are tokens[b, :counts[b]] (a stop token included); `steps` counts the columns
    written. The cache is donated and returned.
    """
    key = ("decode_loop", max_new_tokens, temperature, top_p)
    with _LOCK:
      if key in self._compiled:
        return self._compiled[key]
    forward = functools.partial(decode.forward, self.config, token_fns=self._token_fns,
                                constrain=self._constrain)

    def run(params, cache, logits, positions, done, stops, rng, start):
      B = logits.shape[0]
      ones = jnp.ones((B, 1), jnp.int32)

      def pick(logits, rng, step, tokens, counts, done):
        rng, sub = jax.random.split(rng)
        new = sampling.sample(logits, sub, temperature, top_p)
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, new, step, axis=1)
        counts = counts + (~done).astype(jnp.int32)
        return new, rng, tokens, counts, done | jnp.isin(new, stops)

      tokens = jnp.zeros((B, max_new_tokens), jnp.int32)
      last, rng, tokens, counts, done = pick(logits, rng, 0, tokens, jnp.zeros((B,), jnp.int32),
                                             done)

      def body(state):
        step, last, rng, cache, positions, tokens, counts, done = state
        hidden, cache = forward(params, cache, last[:, None], positions[:, None], ones,
                                start + step - 1)
        logits = llama.logits(params["lm_head"], hidden)[:, 0]
        last, rng, tokens, counts, done = pick(logits, rng, step, tokens, counts, done)
        return step + 1, last, rng, cache, positions + 1, tokens, counts, done

      def cond(state):
        return (state[0] < max_new_tokens) & ~jnp.all(state[-1])

      steps, _, _, cache, _, tokens, counts, _ = jax.lax.while_loop(
          cond, body, (jnp.int32(1), last, rng, cache, positions, tokens, counts, done))
      return tokens, counts, steps, cache

    with _LOCK:
      return self._compiled.setdefault(key, jax.jit(run, donate_argnums=(1,)))

  def _decode_on_host(self, logits, cache, positions, done, stops, start: int, seed: int,
                      max_new_tokens: int, temperature: float, top_p: float) -> list[list[int]]:
    """`decode_loop`'s tokens by one `step` per token from Python, stop tokens checked on the
    host: rows [B] of new tokens (padding rows' stay empty)."""
    key = jax.random.PRNGKey(seed)
    positions, done = positions.copy(), done.copy()
    out = [[] for _ in done]
    ones = np.ones((len(done), 1), np.int32)
    for step in range(max_new_tokens):
      key, sub = jax.random.split(key)
      tokens = np.asarray(sampling.sample_jit(logits, sub, temperature, top_p))
      for b in np.flatnonzero(~done):
        out[b].append(int(tokens[b]))
      done |= np.isin(tokens, stops)
      if done.all() or step == max_new_tokens - 1:
        break
      logits, cache = self.step(cache, tokens[:, None], positions[:, None], ones, start + step)
      positions += 1
    return out


def generate(model, prompts: Sequence[Sequence[int]], *, mesh=None, **options) -> list[list[int]]:
  """One-off `CachedModel(model, mesh).generate(prompts, **options)`."""
  kv_block = options.pop("kv_block", 512)
  return CachedModel(model, mesh, kv_block=kv_block).generate(prompts, **options)


def chat_prompt(tokenizer, messages: Sequence[dict], *, date_preamble: bool = True) -> list[int]:
  """Llama 3.1 chat prompt ids ending with the assistant header (add_generation_prompt=True)."""
  from ultralong_jax.data.chat_template import Llama31ChatTemplate  # pylint: disable=g-import-not-at-top
  ids, _ = Llama31ChatTemplate(tokenizer, date_preamble=date_preamble).render(messages)
  header = [tokenizer.token_id("<|start_header_id|>"), *tokenizer.encode("assistant"),
            tokenizer.token_id("<|end_header_id|>"), *tokenizer.encode("\n\n")]
  return [int(i) for i in ids] + header


def stop_ids(tokenizer) -> list[int]:
  """Llama 3.1's end-of-turn and end-of-text ids that the tokenizer has."""
  ids = []
  for token in ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"):
    try:
      ids.append(tokenizer.token_id(token))
    except KeyError:
      pass
  return ids

