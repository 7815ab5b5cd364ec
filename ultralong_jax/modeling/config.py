"""LlamaConfig: the model's family, shape, RoPE settings and numerics, and its Hugging Face
config.json form.

One decoder (modeling/layers.py) serves four Hugging Face families; what differs between them is a
row of `FAMILIES`: the transformers class an export loads as, q/k/v biases (Qwen2) and per-head
RMSNorm of q and k before RoPE (Qwen3). Everything else (GQA, head_dim independent of width, tied
embeddings, RoPE scaling) is an ordinary config field shared by all of them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, Mapping

from ultralong_jax.modeling import rope


@dataclasses.dataclass(frozen=True)
class Family:
  """What a Hugging Face `model_type` fixes about the architecture."""
  architecture: str     # the transformers class an export is loaded as
  qkv_bias: bool        # biases on q/k/v only (Qwen2), independent of `attention_bias`
  qk_norm: bool         # RMSNorm over head_dim of q and k before RoPE (Qwen3)
  has_sliding_window: bool  # config.json carries `sliding_window` (refused when active)
  extra_hf_keys: tuple[str, ...]  # bias options of config.json that this family's class reads


FAMILIES = {
    # transformers modeling_llama: Llama 2, 3, 3.1, 3.2, 3.3.
    "llama": Family("LlamaForCausalLM", qkv_bias=False, qk_norm=False, has_sliding_window=False,
                    extra_hf_keys=("attention_bias", "mlp_bias")),
    # modeling_mistral: Llama's layout with an optional sliding window (null from v0.2 on).
    "mistral": Family("MistralForCausalLM", qkv_bias=False, qk_norm=False,
                      has_sliding_window=True, extra_hf_keys=()),
    # modeling_qwen2: q_proj/k_proj/v_proj with bias=True, o_proj and the MLP without.
    "qwen2": Family("Qwen2ForCausalLM", qkv_bias=True, qk_norm=False, has_sliding_window=True,
                    extra_hf_keys=()),
    # modeling_qwen3: q_norm/k_norm (Qwen3RMSNorm over head_dim); biases only with attention_bias.
    "qwen3": Family("Qwen3ForCausalLM", qkv_bias=False, qk_norm=True, has_sliding_window=True,
                    extra_hf_keys=("attention_bias",)),
}

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "qkv_attention")
DTYPES = ("float32", "bfloat16", "float16")

# config.json keys we read, or that carry no information for a Llama forward pass; anything else is
# reported in a warning, never silently ignored.
_HF_KEYS = {
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "use_cache",
    "attention_dropout", "pretraining_tp", "initializer_range", "_name_or_path", "output_attentions",
    "output_hidden_states", "return_dict", "tie_word_embeddings", "bos_token_id", "eos_token_id",
    "pad_token_id", "hidden_act", "attention_bias", "mlp_bias", "head_dim", "rope_theta",
    "rope_scaling", "rope_parameters", "max_position_embeddings", "rms_norm_eps", "vocab_size",
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "problem_type", "id2label", "label2id", "chunk_size_feed_forward",
    "is_encoder_decoder", "tokenizer_class", "layer_types", "generation_config",
    "sliding_window", "use_sliding_window", "max_window_layers",
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Shape letters: V vocab, D hidden_size, F intermediate_size, L num_layers, N num_heads,
  K num_kv_heads, H head_dim (need not equal D / N). `model_type` is the family (a FAMILIES key)."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int | None = None
  rms_norm_eps: float = 1e-5
  rope_theta: float = 500000.0
  rope_scaling: Mapping[str, Any] | None = None
  max_position_embeddings: int = 131072
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False
  initializer_range: float = 0.02
  bos_token_id: int | None = 128000
  eos_token_id: int | list[int] | None = 128001
  pad_token_id: int | None = None
  model_type: str = "llama"
  # Numerics: parameters are stored in param_dtype, matmuls run in dtype (fp32 master / bf16 compute).
  param_dtype: str = "float32"
  dtype: str = "float32"
  # Rematerialization of each scanned layer in the backward pass: see REMAT_POLICIES.
  remat_policy: str = "none"

  def __post_init__(self):
    if self.head_dim is None:
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
    object.__setattr__(self, "rope_scaling", rope.normalize_rope_scaling(self.rope_scaling))
    self.validate()

  def __hash__(self):
    # rope_scaling is a dict; hash the canonical JSON so the config can be static jit/NNX metadata.
    return hash(self.to_json())

  @property
  def family(self) -> Family:
    return FAMILIES[self.model_type]

  @property
  def qkv_bias(self) -> bool:
    """Biases on q, k and v (Qwen2 always; any family with attention_bias)."""
    return self.family.qkv_bias or self.attention_bias

  @property
  def qk_norm(self) -> bool:
    return self.family.qk_norm

  def validate(self) -> None:
    if self.model_type not in FAMILIES:
      raise ValueError(f"model.model_type={self.model_type!r} is not a supported family; use one "
                       f"of {sorted(FAMILIES)}.")
    for name in ("attention_bias", "mlp_bias"):
      if getattr(self, name) and name not in self.family.extra_hf_keys:
        raise ValueError(f"model.{name}=True: {self.family.architecture} has no such option; "
                         f"only {[f for f, v in FAMILIES.items() if name in v.extra_hf_keys]} do.")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim", "max_position_embeddings"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"model.{name} must be a positive integer, got {value!r}.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"model.num_heads ({self.num_heads}) must be a multiple of model.num_kv_heads "
          f"({self.num_kv_heads}) for grouped-query attention.")
    if self.head_dim % 2:
      raise ValueError(f"model.head_dim must be even for RoPE, got {self.head_dim}.")
    for name in ("param_dtype", "dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f"model.{name}={getattr(self, name)!r}; use one of {DTYPES}.")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"model.remat_policy={self.remat_policy!r}; use one of {REMAT_POLICIES}.")

  def replace(self, **changes) -> "LlamaConfig":
    return dataclasses.replace(self, **changes)

  @property
  def num_params(self) -> int:
    """Parameter count (embedding counted once when tied)."""
    D, F, H, L = self.hidden_size, self.intermediate_size, self.head_dim, self.num_layers
    N, K = self.num_heads, self.num_kv_heads
    attn = D * H * (2 * N + 2 * K)
    biases = (N + 2 * K) * H * self.qkv_bias + D * self.attention_bias + (F + D) * self.mlp_bias
    layer = attn + 3 * D * F + 2 * D + biases + 2 * H * self.qk_norm
    head = 0 if self.tie_word_embeddings else self.vocab_size * D
    return self.vocab_size * D + L * layer + D + head

  # --- Hugging Face config.json ---------------------------------------------------------------

  @classmethod
  def from_hf_dict(cls, hf: Mapping[str, Any], source: str = "config.json", **overrides) -> "LlamaConfig":
    """Reads both config.json forms: the hub's (`rope_theta` + `rope_scaling`, as Llama-3.1 ships)
    and transformers 5's (`rope_parameters`, holding rope_theta too). `model_type` picks the
    family (FAMILIES); overrides (e.g. a longer max_position_embeddings) apply before validation."""
    model_type = hf.get("model_type", "llama")
    if model_type not in FAMILIES:
      raise ValueError(
          f"{source}: model_type={model_type!r} is not supported; supported families: "
          f"{sorted(FAMILIES)} ({', '.join(f.architecture for f in FAMILIES.values())}).")
    family = FAMILIES[model_type]
    act = hf.get("hidden_act", "silu")
    if act != "silu":
      raise ValueError(f"{source}: hidden_act={act!r}; {family.architecture} uses 'silu'.")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in hf]
    if missing:
      raise ValueError(f"{source} is missing required field(s) {missing}.")
    unknown = sorted(set(hf) - _HF_KEYS)
    if unknown:
      logging.warning("%s: ignoring field(s) a %s forward pass does not use: %s", source,
                      family.architecture, unknown)
    for key in ("attention_bias", "mlp_bias"):
      if hf.get(key) and key not in family.extra_hf_keys:
        raise ValueError(f"{source}: {key}=true, which {family.architecture} does not read; "
                         "the weights would not match the transformers class.")
    rope_scaling = hf.get("rope_scaling") or hf.get("rope_parameters")
    rope_theta = hf.get("rope_theta")
    if rope_theta is None and rope_scaling:
      rope_theta = rope_scaling.get("rope_theta")
    if rope_scaling is not None and (rope_scaling.get("rope_type", rope_scaling.get("type")) in
                                     (None, "default")):
      rope_scaling = None
    kwargs = dict(
        model_type=model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
        rope_scaling=rope_scaling,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        attention_bias=hf.get("attention_bias", False),
        mlp_bias=hf.get("mlp_bias", False),
        initializer_range=hf.get("initializer_range", 0.02),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
    )
    kwargs.update(overrides)
    try:
      config = cls(**kwargs)
    except ValueError as e:
      raise ValueError(f"{source}: {e}") from None
    # A window at least as long as the checkpoint's own context never took effect in its
    # training; the project trains (and exports, as sliding_window: null) full attention.
    window = _active_sliding_window(hf, family)
    native = hf.get("max_position_embeddings", 2048)
    if window is not None and window < native:
      raise ValueError(
          f"{source}: sliding_window={window} is active and shorter than the model's context "
          f"(max_position_embeddings={native}); only full causal attention "
          "is implemented. Use a checkpoint trained without a window (e.g. Mistral-7B v0.2/v0.3, "
          "whose config.json has sliding_window: null), or set sliding_window to null (or "
          "use_sliding_window: false for Qwen) if full attention is what you intend.")
    return config

  def to_hf_dict(self, torch_dtype: str | None = None) -> dict[str, Any]:
    """config.json in the hub's form for the family (rope_theta + rope_scaling, which transformers
    4.x and 5.x both read), loaded by transformers as `family.architecture`."""
    hf = {
        "architectures": [self.family.architecture],
        "model_type": self.model_type,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta,
        "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
        "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_word_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": self.initializer_range,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": self.eos_token_id,
        "use_cache": True,
        "torch_dtype": torch_dtype or self.param_dtype,
    }
    if self.model_type == "llama":
      hf.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias, pretraining_tp=1)
    if self.model_type == "qwen3":
      hf["attention_bias"] = self.attention_bias
    if self.family.has_sliding_window:
      # Only full attention is implemented (from_hf_dict refuses an active window).
      hf["sliding_window"] = None
    if self.model_type in ("qwen2", "qwen3"):
      hf.update(use_sliding_window=False, max_window_layers=self.num_layers)
    if self.pad_token_id is not None:
      hf["pad_token_id"] = self.pad_token_id
    return hf

  # --- the project's own JSON (all fields, numerics included) -------------------------------

  def to_json(self) -> str:
    d = dataclasses.asdict(self)
    d["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
    return json.dumps(d, indent=2, sort_keys=True)

  @classmethod
  def from_json(cls, text: str, source: str = "model_config.json", **overrides) -> "LlamaConfig":
    d = json.loads(text)
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"{source}: unknown field(s) {sorted(unknown)}.")
    d.update(overrides)
    try:
      return cls(**d)
    except (TypeError, ValueError) as e:
      raise ValueError(f"{source}: {e}") from None


def _active_sliding_window(hf: Mapping[str, Any], family: Family) -> int | None:
  """The attention window a transformers model built from `hf` would use, or None (full).

  Mistral applies `sliding_window` whenever it is set; Qwen2/3 only with `use_sliding_window`
  and then to layers >= max_window_layers (transformers' `layer_types`)."""
  if not family.has_sliding_window or hf.get("sliding_window") is None:
    return None
  if family is not FAMILIES["mistral"]:
    if not hf.get("use_sliding_window", False):
      return None
    layer_types = hf.get("layer_types")
    if layer_types is not None and "sliding_attention" not in layer_types:
      return None
    if layer_types is None and hf.get("max_window_layers", 28) >= hf["num_hidden_layers"]:
      return None
  return int(hf["sliding_window"])
