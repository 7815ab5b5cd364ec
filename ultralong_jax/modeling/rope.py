"""Rotary position embeddings with Hugging Face `rope_scaling` semantics, computed in jnp.

The inverse frequencies must match transformers bit for bit, not just closely: at position 1M an
error of one float32 ulp in an inverse frequency near 1 rotates the query by ~0.06 rad. So every
formula below mirrors the operation order and float32 arithmetic of the transformers function named
beside it (`transformers.modeling_rope_utils`, v4.48-v5.x).

Shapes: B batch, T length, N heads, H head dim (H/2 frequencies).

UltraLong (arXiv 2504.06214, Sec. 3.1) extends Llama-3.1 with `rope_type: llama3`, factor
128 / 256 / 512, low_freq_factor 1, high_freq_factor 4, original_max_position_embeddings 8192,
rope_theta 500000 (see `ultralong_rope_scaling`).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")

# Keys each rope type accepts besides `rope_type` (transformers' `_validate_*_rope_parameters`).
# `rope_theta` may sit inside the dict (transformers 5 `rope_parameters`) and `type` is the legacy
# spelling of `rope_type`.
_REQUIRED = {
    "default": set(),
    "linear": {"factor"},
    "dynamic": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
    "yarn": {"factor"},
}
_OPTIONAL = {
    "default": set(),
    "linear": set(),
    "dynamic": set(),
    "llama3": set(),
    "yarn": {"original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
             "mscale", "mscale_all_dim", "truncate"},
}
_ALWAYS_OK = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}


def ultralong_rope_scaling(factor: int) -> dict[str, Any]:
  """The paper's llama3-style scaling for a 8K-pretrained Llama-3.1 at `factor`x length."""
  if factor not in (128, 256, 512):
    raise ValueError(f"UltraLong uses factor 128 (1M), 256 (2M) or 512 (4M); got {factor}.")
  return {
      "rope_type": "llama3",
      "factor": float(factor),
      "low_freq_factor": 1.0,
      "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192,
  }


def long_context_rope_scaling(rope_scaling: Mapping[str, Any] | None,
                              max_position_embeddings: int, target_length: int) -> dict[str, Any]:
  """The paper's RoPE extension of a base model to `target_length` tokens, for any family.

  A model that uses llama3 RoPE (Llama 3.x) keeps it, by parts with α=1, β=4 and factor =
  target / its original_max_position_embeddings (Llama-3.1 at 1M: 128 over 8K, exactly
  `ultralong_rope_scaling(128)`). Any other model (Llama 2, Mistral, Qwen2/2.5, Qwen3) gets
  `yarn` with the same ramp (beta_slow=α=1 and beta_fast=β=4 rotations over the original
  context: dimensions turning fewer than once are interpolated by the factor, more than 4 times
  kept) and factor = target / native context, where the native context is a yarn config's
  original_max_position_embeddings, else max_position_embeddings. yarn also scales attention
  logits by its temperature 0.1·ln(factor) + 1 (YaRN Sec. 3.4), which the llama3 rule lacks.
  """
  params = normalize_rope_scaling(rope_scaling) or {"rope_type": "default"}
  if params["rope_type"] == "llama3":
    original = params["original_max_position_embeddings"]
    return {"rope_type": "llama3", "factor": target_length / original, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": original}
  original = params.get("original_max_position_embeddings") or max_position_embeddings
  if params["rope_type"] not in ("default", "yarn") and "factor" in params:
    raise ValueError(
        f"rope_scaling.rope_type={params['rope_type']!r}: the model is already extended by "
        "another rule; give model.rope_scaling_json explicitly instead of a target length.")
  if target_length <= original:
    raise ValueError(f"target length {target_length} is not longer than the model's native "
                     f"context {original}.")
  return {"rope_type": "yarn", "factor": target_length / original, "beta_fast": 4.0,
          "beta_slow": 1.0, "original_max_position_embeddings": original}


def normalize_rope_scaling(rope_scaling: Mapping[str, Any] | None) -> dict[str, Any] | None:
  """Validates a HF `rope_scaling` / `rope_parameters` dict and returns it in canonical form.

  Canonical: `rope_type` set (legacy `type` folded in), no `rope_theta` (the model config holds it),
  `None` for plain RoPE. Raises ValueError naming the offending field.
  """
  if rope_scaling is None:
    return None
  params = dict(rope_scaling)
  legacy = params.pop("type", None)
  rope_type = params.pop("rope_type", legacy) or "default"
  params.pop("rope_theta", None)
  if rope_type not in ROPE_TYPES:
    raise ValueError(
        f"rope_scaling.rope_type={rope_type!r} is not supported; use one of {ROPE_TYPES} "
        "(longrope and other types are not Llama-3 scalings).")
  prf = params.pop("partial_rotary_factor", 1.0)
  if prf != 1.0:
    raise ValueError(
        f"rope_scaling.partial_rotary_factor={prf}: Llama rotates the whole head; only 1.0 is valid.")
  missing = _REQUIRED[rope_type] - params.keys()
  if missing:
    raise ValueError(
        f"rope_scaling for rope_type={rope_type!r} is missing field(s) {sorted(missing)}.")
  unknown = params.keys() - _REQUIRED[rope_type] - _OPTIONAL[rope_type] - _ALWAYS_OK
  if unknown:
    raise ValueError(
        f"rope_scaling has field(s) {sorted(unknown)} that rope_type={rope_type!r} does not use; "
        f"it accepts {sorted(_REQUIRED[rope_type] | _OPTIONAL[rope_type])}.")
  factor = params.get("factor")
  if factor is not None and (not isinstance(factor, (int, float)) or factor < 1.0):
    raise ValueError(f"rope_scaling.factor must be a number >= 1, got {factor!r}.")
  if rope_type == "llama3":
    if params["high_freq_factor"] <= params["low_freq_factor"]:
      raise ValueError(
          "rope_scaling.high_freq_factor must be greater than rope_scaling.low_freq_factor, got "
          f"{params['high_freq_factor']} <= {params['low_freq_factor']}.")
    if params["original_max_position_embeddings"] <= 0:
      raise ValueError("rope_scaling.original_max_position_embeddings must be positive.")
  if rope_type == "yarn":
    beta_fast, beta_slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1
    if beta_fast < beta_slow:
      raise ValueError(
          f"rope_scaling.beta_fast ({beta_fast}) must be >= rope_scaling.beta_slow ({beta_slow}).")
    attention_factor = params.get("attention_factor")
    if attention_factor is not None and attention_factor <= 0:
      raise ValueError(f"rope_scaling.attention_factor must be > 0, got {attention_factor}.")
  return {"rope_type": rope_type, **params}


def _div(a, b) -> jax.Array:
  """IEEE float32 a / b, as torch computes `tensor / scalar`.

  XLA rewrites division by a constant into multiplication by its reciprocal (not correctly
  rounded); dividing two materialized arrays, evaluated op by op, is exact.
  """
  a, b = jnp.broadcast_arrays(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
  return jax.lax.div(a, b)


def _rdiv(scalar: float, t: jax.Array) -> jax.Array:
  """`scalar / tensor` as torch computes it: `tensor.reciprocal() * scalar` (Tensor.__rtruediv__)."""
  return _div(1.0, t) * jnp.float32(scalar)


def _default_inv_freq(base: float, dim: int) -> jax.Array:
  # transformers `_compute_default_rope_parameters`: exponent arange/dim in float32, then pow.
  exponent = _div(jnp.arange(0, dim, 2, dtype=jnp.int32).astype(jnp.float32), dim)
  return _rdiv(1.0, jnp.float32(base) ** exponent)


def rope_parameters(
    head_dim: int,
    rope_theta: float,
    rope_scaling: Mapping[str, Any] | None,
    max_position_embeddings: int,
    seq_len: jax.Array | int | None = None,
) -> tuple[jax.Array, float]:
  """Inverse frequencies [H/2] (float32) and the cos/sin `attention_scaling` for a rope config.

  `seq_len` (max position + 1) matters only for `dynamic`, whose base grows with the sequence;
  it may be traced. Mirrors transformers' `ROPE_INIT_FUNCTIONS[rope_type](config, seq_len=...)`.
  """
  params = normalize_rope_scaling(rope_scaling) or {"rope_type": "default"}
  if params["rope_type"] == "dynamic" and seq_len is not None:
    return _dynamic_inv_freq(head_dim, rope_theta, params, max_position_embeddings, seq_len), 1.0
  # Everything else depends on the config only: evaluate it op by op even inside a jit trace, so
  # XLA's fusion (FMA contraction, constant-division rewrites) cannot perturb the last bits.
  with jax.ensure_compile_time_eval():
    return _static_parameters(head_dim, rope_theta, params, max_position_embeddings)


def _static_parameters(dim, rope_theta, params, max_position_embeddings):
  rope_type = params["rope_type"]
  if rope_type == "default":
    return _default_inv_freq(rope_theta, dim), 1.0

  if rope_type == "linear":
    # `_compute_linear_scaling_rope_parameters`: scaling positions == scaling frequencies.
    return _div(_default_inv_freq(rope_theta, dim), params["factor"]), 1.0

  if rope_type == "dynamic":  # without a sequence length: the init-time (unscaled) frequencies
    return _default_inv_freq(rope_theta, dim), 1.0

  if rope_type == "llama3":
    return _llama3_inv_freq(rope_theta, dim, params), 1.0

  return _yarn_parameters(rope_theta, dim, params, max_position_embeddings)


def _dynamic_inv_freq(dim, rope_theta, params, max_position_embeddings, seq_len) -> jax.Array:
  """`_compute_dynamic_ntk_parameters` as re-run by `dynamic_rope_update` once the sequence grows
  past max_position_embeddings; stateless here: the base follows max(seq_len, max_pos). seq_len
  may be traced, so this part runs inside the jit (a few ulp from transformers at most)."""
  factor = params["factor"]
  seq = jnp.maximum(jnp.asarray(seq_len, jnp.int32), max_position_embeddings)
  seq_f = seq.astype(jnp.float32)
  base = rope_theta * (_div(factor * seq_f, max_position_embeddings) - (factor - 1)) ** (
      dim / (dim - 2))
  exponent = _div(jnp.arange(0, dim, 2, dtype=jnp.int32).astype(jnp.float32), dim)
  grown = _rdiv(1.0, base.astype(jnp.float32) ** exponent)
  # At seq <= max_pos the formula gives exactly rope_theta in real arithmetic; take the plain
  # frequencies there so float32 rounding of `base` cannot perturb them.
  with jax.ensure_compile_time_eval():
    plain = _default_inv_freq(rope_theta, dim)
  return jnp.where(seq > max_position_embeddings, grown, plain)


def _llama3_inv_freq(base: float, dim: int, params: Mapping[str, Any]) -> jax.Array:
  """transformers `_compute_llama3_parameters` (Llama 3.1's "YaRN by parts" with ramp α, β)."""
  inv_freq = _default_inv_freq(base, dim)
  factor = params["factor"]
  low_freq_factor = params["low_freq_factor"]
  high_freq_factor = params["high_freq_factor"]
  old_context_len = params["original_max_position_embeddings"]
  low_freq_wavelen = old_context_len / low_freq_factor
  high_freq_wavelen = old_context_len / high_freq_factor
  wavelen = _rdiv(2 * math.pi, inv_freq)
  inv_freq_llama = jnp.where(wavelen > low_freq_wavelen, _div(inv_freq, factor), inv_freq)
  smooth_factor = _div(_rdiv(old_context_len, wavelen) - low_freq_factor,
                       high_freq_factor - low_freq_factor)
  smoothed = _div((1 - smooth_factor) * inv_freq_llama, factor) + smooth_factor * inv_freq_llama
  is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
  return jnp.where(is_medium, smoothed, inv_freq_llama)


def _yarn_parameters(
    base: float, dim: int, params: Mapping[str, Any], max_position_embeddings: int
) -> tuple[jax.Array, float]:
  """transformers `_compute_yarn_parameters` (YaRN, arXiv 2309.00071, Sec. 3.2-3.4)."""
  original = params.get("original_max_position_embeddings") or max_position_embeddings
  factor = params.get("factor")
  if factor is None:
    factor = max_position_embeddings / original
  attention_factor = params.get("attention_factor")
  mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")

  def get_mscale(scale, m=1):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

  if attention_factor is None:
    if mscale and mscale_all_dim:
      attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
    else:
      attention_factor = get_mscale(factor)
  beta_fast = params.get("beta_fast") or 32
  beta_slow = params.get("beta_slow") or 1
  truncate = params.get("truncate", True)

  def correction_dim(num_rotations):
    return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

  low, high = correction_dim(beta_fast), correction_dim(beta_slow)
  if truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001  # transformers' guard against a zero-width ramp

  pos_freqs = jnp.float32(base) ** _div(jnp.arange(0, dim, 2).astype(jnp.float32), dim)
  inv_freq_extrapolation = _rdiv(1.0, pos_freqs)
  inv_freq_interpolation = _rdiv(1.0, jnp.float32(factor) * pos_freqs)
  ramp = jnp.clip(_div(jnp.arange(dim // 2, dtype=jnp.float32) - low, high - low), 0, 1)
  extrapolation_factor = 1 - ramp
  inv_freq = (inv_freq_interpolation * (1 - extrapolation_factor)
              + inv_freq_extrapolation * extrapolation_factor)
  return inv_freq, float(attention_factor)


def rope_cos_sin(
    positions: jax.Array, inv_freq: jax.Array, attention_scaling: float = 1.0
) -> tuple[jax.Array, jax.Array]:
  """cos, sin [B, T, H] (float32) for integer global `positions` [B, T].

  The angle is the exact float32 product position * inv_freq, as in transformers'
  `LlamaRotaryEmbedding.forward`; frequencies are duplicated over the two halves of the head.
  """
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles) * attention_scaling, jnp.sin(angles) * attention_scaling


def rope_tables(config, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos, sin [B, T, H] for a model config (head_dim, rope_theta, rope_scaling,
  max_position_embeddings) at `positions` [B, T]. `dynamic` needs the sequence length, which
  transformers takes as max(position_ids) + 1."""
  scaling = config.rope_scaling or {}
  seq_len = jnp.max(positions) + 1 if scaling.get("rope_type") == "dynamic" else None
  inv_freq, attention_scaling = rope_parameters(
      config.head_dim, config.rope_theta, config.rope_scaling, config.max_position_embeddings,
      seq_len=seq_len)
  return rope_cos_sin(positions, inv_freq, attention_scaling)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates x [B, T, N, H] by cos/sin [B, T, H] (transformers' `apply_rotary_pos_emb`).

  Uses the half-split ("rotate_half") pairing, which the HF Llama checkpoints' q/k weights are
  permuted for, so converted weights need no re-ordering.
  """
  cos = cos[:, :, None, :].astype(x.dtype)
  sin = sin[:, :, None, :].astype(x.dtype)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin
