"""The math of one decoder layer (Llama, Mistral, Qwen2, Qwen3), as pure functions of arrays.

Shapes: B batch, T length, D width, F MLP width, N query heads, K kv heads, H head dim.
Parameters of one layer arrive as a dict (a slice of the stacked [L, ...] parameters).
Formulas follow transformers' `modeling_llama` (LlamaRMSNorm, LlamaMLP, LlamaAttention) and
`modeling_qwen3` for the q/k norms.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from ultralong_jax.modeling import rope


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """LlamaRMSNorm: normalize in float32, cast back to x's dtype, then scale."""
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return scale.astype(x.dtype) * x32.astype(x.dtype)


def _dense(x: jax.Array, w: jax.Array, spec: str, bias: jax.Array | None = None) -> jax.Array:
  y = jnp.einsum(spec, x, w.astype(x.dtype), preferred_element_type=jnp.float32)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y.astype(x.dtype)


def attention_qkv(
    p: Mapping[str, jax.Array], x: jax.Array, cos: jax.Array, sin: jax.Array, eps: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """x [B,T,D] -> q [B,T,N,H], k, v [B,T,K,H]; q and k rotated by cos/sin [B,T,H].

  Optional parameters select the family: bq/bk/bv (Qwen2), q_norm/k_norm [H] (Qwen3's per-head
  RMSNorm before RoPE, `Qwen3Attention.forward`, with the layer's eps)."""
  q = _dense(x, p["wq"], "BTD,DNH->BTNH", p.get("bq"))
  k = _dense(x, p["wk"], "BTD,DKH->BTKH", p.get("bk"))
  v = _dense(x, p["wv"], "BTD,DKH->BTKH", p.get("bv"))
  if "q_norm" in p:
    q, k = rms_norm(q, p["q_norm"], eps), rms_norm(k, p["k_norm"], eps)
  q = checkpoint_name(rope.apply_rope(q, cos, sin), "query")
  k = checkpoint_name(rope.apply_rope(k, cos, sin), "key")
  return q, k, checkpoint_name(v, "value")


def attention_output(p: Mapping[str, jax.Array], out: jax.Array) -> jax.Array:
  """Attention output [B,T,N,H] -> [B,T,D] through wo."""
  out = checkpoint_name(out, "attention_out")
  return _dense(out, p["wo"], "BTNH,NHD->BTD", p.get("bo"))


def swiglu_mlp(p: Mapping[str, jax.Array], x: jax.Array) -> jax.Array:
  """LlamaMLP: down(silu(gate(x)) * up(x)), x [B,T,D] -> [B,T,D] through width F."""
  gate = _dense(x, p["w_gate"], "BTD,DF->BTF", p.get("b_gate"))
  up = _dense(x, p["w_up"], "BTD,DF->BTF", p.get("b_up"))
  return _dense(jax.nn.silu(gate) * up, p["w_down"], "BTF,FD->BTD", p.get("b_down"))


Attention = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any]]
"""attention(q [B,T,N,H], k [B,T,K,H], v [B,T,K,H]) -> (out [B,T,N,H], state): a closure over the
call's positions, segment ids and (when decoding) the KV cache, whose new contents it returns as
`state` (None when there is nothing to carry). modeling/llama.py builds the plain and ring ones,
modeling/decode.py the cached ones."""


def decoder_layer(
    p: Mapping[str, jax.Array], h: jax.Array, cos: jax.Array, sin: jax.Array,
    attention: Attention, *, eps: float,
) -> tuple[jax.Array, Any]:
  """The one Llama decoder layer (training, prefill and decoding): pre-norm residual blocks
  h + attn(norm(h)), then + mlp(norm(h)). h [B,T,D]; cos/sin [B,T,H] rotate q and k.
  Returns (h, the state `attention` returned)."""
  q, k, v = attention_qkv(p, rms_norm(h, p["attn_norm"], eps), cos, sin, eps)
  out, state = attention(q, k, v)
  h = h + attention_output(p, out)
  return h + swiglu_mlp(p, rms_norm(h, p["mlp_norm"], eps)), state


def remat_policy(name: str):
  """Maps a config name to `jax.checkpoint` settings: None (no remat) or a policy callable."""
  policies = jax.checkpoint_policies
  return {
      "none": None,
      "full": policies.nothing_saveable,
      "dots": policies.checkpoint_dots,
      "dots_no_batch": policies.dots_with_no_batch_dims_saveable,
      # Keep what is costly to recompute at long length (q, k, v and the attention output), redo
      # the cheap MLP: at 1M tokens attention dominates the FLOPs.
      "qkv_attention": policies.save_only_these_names("query", "key", "value", "attention_out"),
  }[name]
