"""Flax NNX Llama-architecture decoder with stacked, scanned layers: the families of
`config.FAMILIES` (Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3), which differ only in optional
per-layer parameters (q/k/v biases, q/k norms).

Shapes: B batch, T length, D width, F MLP width, V vocab, L layers, N query heads, K kv heads,
H head dim. Parameters carry logical axis names (`out_sharding` metadata; the one table mapping
them to mesh axes lives in `ultralong_jax.parallel.sharding`):

  embed        [V, D]        (vocab, embed)
  layers.*     [L, ...]      (layers, ...)   e.g. wq [L, D, N, H] (layers, embed, heads, head_dim);
                                            bq [L, N, H], q_norm [L, H] where the family has them
  final_norm   [D]           (embed,)
  lm_head      [D, V]        (embed, vocab)  absent when embeddings are tied

The layer stack is one `jax.lax.scan` over the [L, ...] parameters, so compile time does not grow
with depth; each step may be rematerialized by `config.remat_policy`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from ultralong_jax.modeling import attention as attention_lib
from ultralong_jax.modeling import layers, rope
from ultralong_jax.modeling.config import LlamaConfig


def _param(rngs: nnx.Rngs, init, shape, names, dtype) -> nnx.Param:
  # eager_sharding=False: sharding is applied from the logical names by parallel/sharding.py's
  # rules, not at creation under whatever mesh happens to be current.
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names, eager_sharding=False)


def layer_param_shapes(config: LlamaConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
  """Per-layer parameter name -> (shape without L, logical axis names without `layers`)."""
  D, F, N, K, H = (config.hidden_size, config.intermediate_size, config.num_heads,
                   config.num_kv_heads, config.head_dim)
  shapes = {
      "attn_norm": ((D,), ("embed",)),
      "wq": ((D, N, H), ("embed", "heads", "head_dim")),
      "wk": ((D, K, H), ("embed", "kv_heads", "head_dim")),
      "wv": ((D, K, H), ("embed", "kv_heads", "head_dim")),
      "wo": ((N, H, D), ("heads", "head_dim", "embed")),
      "mlp_norm": ((D,), ("embed",)),
      "w_gate": ((D, F), ("embed", "mlp")),
      "w_up": ((D, F), ("embed", "mlp")),
      "w_down": ((F, D), ("mlp", "embed")),
  }
  if config.qkv_bias:
    shapes.update({
        "bq": ((N, H), ("heads", "head_dim")),
        "bk": ((K, H), ("kv_heads", "head_dim")),
        "bv": ((K, H), ("kv_heads", "head_dim")),
    })
  if config.attention_bias:
    shapes["bo"] = ((D,), ("embed",))
  if config.qk_norm:
    shapes.update({
        "q_norm": ((H,), ("head_dim",)),
        "k_norm": ((H,), ("head_dim",)),
    })
  if config.mlp_bias:
    shapes.update({
        "b_gate": ((F,), ("mlp",)),
        "b_up": ((F,), ("mlp",)),
        "b_down": ((D,), ("embed",)),
    })
  return shapes


class DecoderStack(nnx.Module):
  """All L decoder layers, each parameter stacked on a leading `layers` axis."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    L, dtype = config.num_layers, jnp.dtype(config.param_dtype)
    normal = jax.nn.initializers.normal(config.initializer_range)
    for name, (shape, names) in layer_param_shapes(config).items():
      is_norm = name.endswith("norm")
      init = jax.nn.initializers.ones if is_norm else (
          jax.nn.initializers.zeros if name.startswith("b") else normal)
      setattr(self, name, _param(rngs, init, (L, *shape), ("layers", *names), dtype))
    self.names = tuple(layer_param_shapes(config))

  def stacked(self) -> dict[str, jax.Array]:
    return {name: getattr(self, name)[...] for name in self.names}


StackAttention = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]
"""attention(q, k, v, layer, state) -> (out, state): layers.Attention with the layer index (traced
int32) and the state the previous layer returned made explicit (see `forward`)."""


def forward(config: LlamaConfig, params: Mapping[str, Any], input_ids: jax.Array,
            positions: jax.Array, attention: StackAttention, state: Any = None, *,
            constrain: Callable[[jax.Array, tuple], jax.Array] | None = None,
            ) -> tuple[jax.Array, Any]:
  """The model without its head, as a pure function of `params` (`Llama.arrays()`, or
  `unstack_layers` of it).

  input_ids, positions [B,T] -> (final-normed hidden states [B,T,D] in the compute dtype, state).
  Every layer runs layers.decoder_layer with `attention` bound to its index and to the state the
  previous layer returned (`state` for the first): None in training, the KV cache when decoding
  (modeling/decode.py). `constrain(x, logical_names)` hints activation shardings.
  """
  constrain = constrain or (lambda x, names: x)
  residual = ("batch", "residual_length", "embed")
  eps = config.rms_norm_eps
  h = jnp.take(params["embed"], input_ids, axis=0).astype(jnp.dtype(config.dtype))
  cos, sin = rope.rope_tables(config, positions)  # once per forward, shared by all layers

  def body(carry, p):
    h, state, layer = carry
    h, state = layers.decoder_layer(p, h, cos, sin,
                                    lambda q, k, v: attention(q, k, v, layer, state), eps=eps)
    return (constrain(h, residual), state, layer + 1), None

  policy = layers.remat_policy(config.remat_policy)
  if policy is not None:
    # prevent_cse=False is safe (and faster) inside scan, per the jax.checkpoint docs.
    body = jax.checkpoint(body, policy=policy, prevent_cse=False)
  carry = (constrain(h, residual), state, jnp.int32(0))
  if isinstance(params["layers"], (list, tuple)):
    # One dict per layer (`unstack_layers`): a Python loop, so every matmul reads its layer's
    # weights where they are; XLA on CPU copies a layer's slice of the stacked arrays before
    # each matmul (measured in docs/evaluation.md#decoding-speed).
    for p in params["layers"]:
      carry, _ = body(carry, p)
  else:
    carry, _ = jax.lax.scan(body, carry, params["layers"])
  h, state, _ = carry
  return layers.rms_norm(h, params["final_norm"], eps), state


def unstack_layers(params: Mapping[str, Any]) -> dict[str, Any]:
  """`params` (as `Llama.arrays()`) with the stacked [L, ...] layer arrays split into a tuple of
  L per-layer dicts, which `forward` runs as an unrolled loop (a copy of the layer weights)."""
  stacked = params["layers"]
  L = len(next(iter(stacked.values())))
  return {**params, "layers": tuple({name: x[i] for name, x in stacked.items()}
                                    for i in range(L))}


def logits(lm_head: jax.Array, hidden: jax.Array) -> jax.Array:
  """hidden [B,T,D] -> logits [B,T,V] in float32 (matmul in the hidden states' dtype);
  lm_head [D, V]."""
  return jnp.einsum("BTD,DV->BTV", hidden, lm_head.astype(hidden.dtype),
                    preferred_element_type=jnp.float32)


class Llama(nnx.Module):
  """`model(input_ids [B,T], positions=None, segment_ids=None) -> logits [B,T,V]` (float32).

  `positions` are global token positions [B,T] (default 0..T-1); with `segment_ids` [B,T]
  (tokens attend only within equal ids) they define the attention mask (modeling/attention.py).
  `attention_fn(q, k, v, *, positions, segment_ids, causal, scale)` replaces the single-device
  attention (e.g. ring attention over a mesh).
  """

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs,
               attention_fn: Callable[..., jax.Array] | None = None,
               constrain_fn: Callable[[jax.Array, tuple], jax.Array] | None = None):
    self.config = config
    self.attention_fn = attention_fn or attention_lib.dot_product_attention
    # Activation sharding hints by logical names (parallel.sharding.constrain_fn(mesh)); none on
    # one device.
    self.constrain_fn = constrain_fn
    dtype = jnp.dtype(config.param_dtype)
    normal = jax.nn.initializers.normal(config.initializer_range)
    V, D = config.vocab_size, config.hidden_size
    self.embed = _param(rngs, normal, (V, D), ("vocab", "embed"), dtype)
    self.layers = DecoderStack(config, rngs=rngs)
    self.final_norm = _param(rngs, jax.nn.initializers.ones, (D,), ("embed",), dtype)
    if not config.tie_word_embeddings:
      self.lm_head = _param(rngs, normal, (D, V), ("embed", "vocab"), dtype)

  def __call__(self, input_ids: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
    return self.logits(self.hidden_states(input_ids, positions, segment_ids))

  def arrays(self) -> dict[str, Any]:
    """The arrays `forward` and `logits` take (no copies): embed, layers (stacked), final_norm,
    lm_head [D, V]."""
    return {"embed": self.embed[...], "layers": self.layers.stacked(),
            "final_norm": self.final_norm[...], "lm_head": self.lm_head_weight()}

  def hidden_states(self, input_ids: jax.Array, positions: jax.Array | None = None,
                    segment_ids: jax.Array | None = None) -> jax.Array:
    """input_ids [B,T] -> final-normed hidden states [B,T,D] in the compute dtype (no LM head)."""
    B, T = input_ids.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    attention_fn = self.attention_fn

    def attention(q, k, v, layer, state):
      del layer  # every layer attends the same way; nothing is carried
      return attention_fn(q, k, v, positions=positions, segment_ids=segment_ids, causal=True,
                          scale=q.shape[-1] ** -0.5), state

    hidden, _ = forward(self.config, self.arrays(), input_ids, positions, attention,
                        constrain=self.constrain_fn)
    return hidden

  def lm_head_weight(self) -> jax.Array:
    """[D, V] output projection (the transposed embedding when tied)."""
    if self.config.tie_word_embeddings:
      return self.embed[...].T
    return self.lm_head[...]

  def logits(self, hidden: jax.Array) -> jax.Array:
    """hidden [B,T,D] -> logits [B,T,V] in float32 (matmul in the compute dtype)."""
    return logits(self.lm_head_weight(), hidden)


def init_model(config: LlamaConfig, seed: int = 0,
               attention_fn: Callable[..., jax.Array] | None = None,
               constrain_fn: Callable[[jax.Array, tuple], jax.Array] | None = None) -> Llama:
  """A randomly initialized model (HF's init: normal(initializer_range), norms at 1)."""
  return Llama(config, rngs=nnx.Rngs(params=seed), attention_fn=attention_fn,
               constrain_fn=constrain_fn)


def abstract_model(config: LlamaConfig,
                   attention_fn: Callable[..., jax.Array] | None = None,
                   constrain_fn: Callable[[jax.Array, tuple], jax.Array] | None = None) -> Llama:
  """The model with ShapeDtypeStruct leaves: nothing allocated (for loading and memory analysis)."""
  return nnx.eval_shape(lambda: init_model(config, attention_fn=attention_fn,
                                           constrain_fn=constrain_fn))
