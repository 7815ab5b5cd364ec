"""The training config: every key documented once (here), validated in one place before compiling.

`configs/*.py` build on `base_config(stage)` and change only what differs. Run with
  python -m ultralong_jax.train --config=configs/X.py --config.optim.learning_rate=1e-5 --workdir=DIR
"""

from __future__ import annotations

import importlib.util
import json
import math
import os

import ml_collections

from ultralong_jax.data.config import data_piece, default_data_config, validate_data_config
from ultralong_jax.modeling import presets, rope
from ultralong_jax.modeling.config import DTYPES, REMAT_POLICIES, LlamaConfig
from ultralong_jax.parallel import block_attention, chunked_attention, ring_attention, splash
from ultralong_jax.parallel.mesh import MESH_AXES
from ultralong_jax.training import run_config
from ultralong_jax.training.optimizer import SCHEDULES

# Every key that takes one of a fixed set of values, and the values: checked first in validate(),
# before any file is read or anything compiles (data.* enumerations: validate_data_config).
CHOICES = {
    "model.dtype": DTYPES,
    "model.param_dtype": DTYPES,
    "model.remat_policy": REMAT_POLICIES,
    "model.ultralong": ("",) + tuple(presets.ULTRALONG_LENGTHS),
    "init.mode": ("random", "hf", "checkpoint"),
    "attention.strategy": ("ring", "allgather"),
    "attention.layout": ("zigzag", "contiguous"),
    "attention.kernel": ("auto",) + tuple(block_attention.KERNELS),
    "optim.schedule": SCHEDULES,
    "optim.state_dtype": ("float32", "bfloat16"),
    "train.nonfinite": ("skip", "stop"),
    "export.dtype": DTYPES,
}


def check_choices(c: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first enumerated key (CHOICES) whose value is not allowed."""
  for key, allowed in CHOICES.items():
    section, name = key.split(".")
    value = c[section][name]
    if value not in allowed:
      shown = ", ".join(repr(a) for a in allowed)
      raise ValueError(f"{key}={value!r} is not one of {shown}; e.g. --config.{key}={allowed[0]!r}.")
  kernel = c.attention.kernel
  segments = data_piece(c.data).uses_segment_ids
  if segments and kernel != "auto" and not block_attention.KERNELS[kernel].segment_ids:
    takes = sorted(k for k, v in block_attention.KERNELS.items() if v.segment_ids)
    why = "stage 2 packs chats" if c.stage == 2 else "data.document_mask is on"
    raise ValueError(f"attention.kernel={kernel!r} cannot mask by segment ids, which this run needs "
                     f"({why}); use 'auto' or one of {takes}.")


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """The ConfigDict of `spec`, "path/to/config.py[:arg]", as `--config=spec` gives it to the train
  CLI: the file's `get_config(arg)`, or `get_config()` without an arg."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ValueError(f"config {spec!r}: no file {path!r} (give path/to/config.py[:arg]).")
  module_spec = importlib.util.spec_from_file_location(
      os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def base_config(stage: int) -> ml_collections.ConfigDict:
  """Defaults for recipe stage 1 (continued pretraining at 1M-4M) or 2 (chat SFT).

  stage: 1 or 2 (also data.stage).
  model.preset: a name from ultralong_jax.modeling.presets: the network's shape for init.mode
    random (hf / checkpoint take the shape from the checkpoint's config).
  model.dtype / model.param_dtype: compute and parameter dtypes (bf16 compute, fp32 master).
  model.remat_policy: none | full | dots | dots_no_batch | qkv_attention.
  model.ultralong: "" or 1m | 2m | 4m: extend the model's RoPE to that length the paper's way
    (rope.long_context_rope_scaling): llama3 by parts where the model uses it (Llama 3.x: factor
    128/256/512 over 8K), else yarn α=1 β=4 with factor = length / native context.
  model.rope_scaling_json: "" or a HF rope_scaling dict as JSON (overrides the preset's; ablations
    such as yarn); max_position_embeddings then defaults to factor x original.
  model.max_position_embeddings: 0 = the preset's / as implied by the RoPE override.
  model.overrides_json: "" or JSON of other LlamaConfig fields (e.g. '{"num_layers": 4}').
  init.mode: random | hf | checkpoint — random weights, a HF Llama directory (stage 1 starts from
    Llama-3.1-8B-Instruct), or a project/stage checkpoint (stage 2 starts from stage 1).
  init.path: directory for hf / checkpoint.
  mesh.{data,fsdp,sequence,tensor}: mesh axis sizes, one may be -1 ("the rest").
  attention.strategy: ring | allgather (sequence-parallel attention when mesh.sequence > 1).
  attention.layout: zigzag | contiguous (causal load balance; applied once to the batch).
  attention.kernel: auto | xla | chunked | cudnn | cudnn_packed | splash (and the CPU twins
    dpa_xla, dpa_xla_packed) — the ring's per-block kernel (auto: splash on TPU when ring blocks
    are multiples of 128 tokens; on GPU cuDNN, cudnn_packed with segment ids; else chunked for
    blocks longer than chunk_size, else xla).
  attention.chunk_size: query/key tile of the chunked kernel (memory O(chunk^2) per tile); for
    splash the largest tile (capped at 512), a multiple of 128.
  data: see ultralong_jax.data.config.default_data_config.
  optim.learning_rate / warmup_steps / schedule (constant|cosine|linear|wsd) / final_lr_fraction;
    optim.cooldown_steps: wsd's linear cooldown to final_lr_fraction over the last steps.
  optim.b1, b2, eps, weight_decay: AdamW; grad_clip_norm: global-norm clip (0 = off).
  optim.state_dtype: float32 | bfloat16 (Adam's first moment in bf16).
  train.steps: optimizer steps; train.microbatches: gradient accumulation per step (the global
    batch is split into this many microbatches); train.loss_chunk_size: tokens per loss chunk
    (never [T, V] logits); train.z_loss_weight: 0 = off; train.seed: parameter init seed.
  train.log_every: steps between metric lines.
  train.run_name: what the progress bar and the loss plot call this run ("" = "stage 1" /
    "stage 2"; the demo's short-context pretraining is "base").
  train.nonfinite: skip | stop — a step whose loss or gradient is NaN/Inf never updates the
    weights (checked on device); skip counts it and goes on, stop ends the run at the next log
    step with a message naming the step and the last good checkpoint.
  train.max_nonfinite_steps: with skip, stop anyway once more steps than this were skipped
    (a run that keeps diverging is not recovering; 0 = no limit).
  train.hang_timeout_s: the hang watchdog's limit on one step (seconds; 0 = 10 x the median
    step time, at least 600 s); past it the process prints every thread's stack and exits 75
    so the launcher restarts it (training/watchdog.py, docs/launch.md).
  train.hang_startup_s: the watchdog's allowance before the first step completes (build,
    restore, compile) and around checkpoint writes.
  checkpoint.every_steps: save interval (0 = only at the end); checkpoint.keep: newest K kept;
  checkpoint.async_save: write in the background while training continues.
  checkpoint.fallback_on_corrupt: when the newest checkpoint cannot be restored, move it aside
    to checkpoints_corrupt/ and resume from the previous one (False: stop with an error naming it).
  checkpoint.retries: a failed checkpoint write (full disk or quota, lost permission) is retried
    this many times, with the step at hand, before the run stops with an error naming the
    directory; checkpoint.retry_backoff_s: the wait before the first retry, doubled each time.
  preflight.check_paths: before compiling, check that data paths / chat files / tokenizer exist
    and are readable, and the tokenizer's vocabulary fits the model's embedding.
  preflight.check_memory: before compiling, estimate bytes per device and stop if they exceed
    the device's memory (skipped where the memory is unknown, e.g. CPU).
  export.hf: write a HF directory (save_pretrained) at the end; export.dtype: its weights' dtype.
  metrics.peak_tflops: per-device peak for MFU (0 = from the device table).
  """
  if stage not in (1, 2):
    raise ValueError(f"stage={stage!r}; use 1 (continued pretraining) or 2 (SFT).")
  c = ml_collections.ConfigDict()
  c.stage = stage
  c.model = ml_collections.ConfigDict(dict(
      preset="llama31_8b", dtype="bfloat16", param_dtype="float32", remat_policy="dots",
      ultralong="1m" if stage == 1 else "", rope_scaling_json="", max_position_embeddings=0,
      overrides_json=""))
  c.init = ml_collections.ConfigDict(dict(mode="hf", path=""))
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, sequence=1, tensor=1))
  c.attention = ml_collections.ConfigDict(dict(strategy="ring", layout="zigzag", kernel="auto",
                                                 chunk_size=chunked_attention.CHUNK_SIZE))
  c.data = default_data_config(stage)
  c.optim = ml_collections.ConfigDict(dict(
      learning_rate=3e-5 if stage == 1 else 5e-6, warmup_steps=0, schedule="constant",
      final_lr_fraction=0.0, cooldown_steps=0, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0,
      grad_clip_norm=1.0, state_dtype="float32"))
  c.train = ml_collections.ConfigDict(dict(
      steps=480 if stage == 1 else 1000, microbatches=1, loss_chunk_size=4096, z_loss_weight=0.0,
      seed=0, log_every=1, nonfinite="skip", max_nonfinite_steps=20, run_name="",
      hang_timeout_s=0.0, hang_startup_s=3600.0))
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=50, keep=3, async_save=True,
                                                fallback_on_corrupt=False, retries=3,
                                                retry_backoff_s=10.0))
  c.preflight = ml_collections.ConfigDict(dict(check_paths=True, check_memory=True))
  c.export = ml_collections.ConfigDict(dict(hf=True, dtype="bfloat16"))
  c.metrics = ml_collections.ConfigDict(dict(peak_tflops=0.0))
  return c


def model_config(c: ml_collections.ConfigDict) -> LlamaConfig:
  """The LlamaConfig a training config describes: the shape from model.preset (random init) or
  from the checkpoint being loaded (init.mode hf / checkpoint), then RoPE and numerics overrides."""
  m = c.model
  overrides = _json(m.overrides_json, "model.overrides_json")
  overrides.update(dtype=m.dtype, param_dtype=m.param_dtype, remat_policy=m.remat_policy)
  try:
    if c.init.mode in ("hf", "checkpoint"):
      from ultralong_jax.convert import api  # pylint: disable=import-outside-toplevel
      config = api.load_config(c.init.path, **overrides)
    else:
      config = presets.get_preset(m.preset, **overrides)
  except (TypeError, ValueError, FileNotFoundError) as e:
    where = f"init.path ({c.init.mode})" if c.init.mode != "random" else "model.preset/overrides"
    raise ValueError(f"{where}: {e}") from None
  return apply_rope_override(config, c)


def apply_rope_override(config: LlamaConfig, c: ml_collections.ConfigDict) -> LlamaConfig:
  m = c.model
  scaling = None
  if m.ultralong and m.rope_scaling_json:
    raise ValueError("model.ultralong and model.rope_scaling_json both set; use one.")
  if m.ultralong:
    if m.ultralong not in presets.ULTRALONG_LENGTHS:
      raise ValueError(f"model.ultralong={m.ultralong!r}; use one of "
                       f"{sorted(presets.ULTRALONG_LENGTHS)} or ''.")
    try:
      scaling = rope.long_context_rope_scaling(config.rope_scaling, config.max_position_embeddings,
                                               presets.ULTRALONG_LENGTHS[m.ultralong])
    except ValueError as e:
      raise ValueError(f"model.ultralong={m.ultralong!r}: {e}") from None
  elif m.rope_scaling_json:
    scaling = _json(m.rope_scaling_json, "model.rope_scaling_json")
  changes = {}
  if scaling is not None:
    changes["rope_scaling"] = scaling
    if "original_max_position_embeddings" in scaling and "factor" in scaling:
      changes["max_position_embeddings"] = round(
          scaling["factor"] * scaling["original_max_position_embeddings"])
  if m.max_position_embeddings:
    changes["max_position_embeddings"] = m.max_position_embeddings
  try:
    return config.replace(**changes) if changes else config
  except ValueError as e:
    raise ValueError(f"model.rope_scaling: {e}") from None


def _json(text: str, key: str) -> dict:
  if not text:
    return {}
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{key} is not valid JSON ({e.msg}): {text!r}") from None
  if not isinstance(value, dict):
    raise ValueError(f"{key} must be a JSON object, got {text!r}.")
  return value


def resolve(c: ml_collections.ConfigDict, num_devices: int, process_count: int = 1, *,
            data: bool = True) -> run_config.RunConfig:
  """`c` validated (`validate`) and turned into the typed pieces the modules below take."""
  model = validate(c, num_devices, process_count, data=data)
  return run_config.RunConfig.of(c, model, num_devices)


def validate(c: ml_collections.ConfigDict, num_devices: int, process_count: int = 1, *,
             data: bool = True) -> LlamaConfig:
  """Checks the whole config against the device count before anything compiles.

  data=False leaves out what only feeding the run needs (data sources, tokenizer, separator,
  data.vocab_size): what the memory estimate validates. Raises ValueError naming the key and what
  would work. Returns the model config.
  """
  run_config.check_keys(c)
  if c.stage not in (1, 2) or c.data.stage != c.stage:
    raise ValueError(f"stage={c.stage} and data.stage={c.data.stage} must agree and be 1 or 2.")
  check_choices(c)
  if data:
    validate_data_config(c.data)
  if c.init.mode != "random" and not c.init.path:
    raise ValueError(f"init.mode={c.init.mode} needs init.path (a directory).")
  model = model_config(c)
  try:
    mesh = run_config.MeshConfig.of(c, num_devices)
  except ValueError as e:
    raise ValueError(f"mesh.{{{','.join(MESH_AXES)}}}: {e}") from None
  sizes = mesh.sizes
  L, B = c.data.seq_len, c.data.global_batch_size
  batch_shards = mesh.batch_shards
  if B % (batch_shards * c.train.microbatches):
    raise ValueError(
        f"data.global_batch_size={B} must be divisible by mesh.data x mesh.fsdp "
        f"({batch_shards}) x train.microbatches ({c.train.microbatches}); e.g. set "
        f"data.global_batch_size={batch_shards * c.train.microbatches * max(1, B // (batch_shards * c.train.microbatches))}.")
  if B % process_count:
    raise ValueError(f"data.global_batch_size={B} must be divisible by the {process_count} "
                     "processes (each feeds its own rows).")
  n = sizes["sequence"]
  if n > 1:
    unit = 2 * n if c.attention.layout == "zigzag" else n
    if L % unit:
      raise ValueError(f"data.seq_len={L} must be divisible by {unit} (2 x mesh.sequence for the "
                       f"zigzag layout); e.g. {L - L % unit}.")
  if c.attention.chunk_size < 1:
    raise ValueError(f"attention.chunk_size={c.attention.chunk_size}: use a positive number of "
                     "tokens (e.g. 1024).")
  if c.attention.kernel == "splash":
    # Splash tiles the ring block its kernel sees in multiples of 128 tokens.
    block = ring_attention.training_block_length(L, n, c.attention.layout)
    splash.check_lengths(block, c.attention.chunk_size)
  t = sizes["tensor"]
  for key, value in (("num_heads", model.num_heads), ("num_kv_heads", model.num_kv_heads)):
    if value % t:
      raise ValueError(f"model {key}={value} is not divisible by mesh.tensor={t}; use a tensor "
                       f"size dividing {math.gcd(model.num_heads, model.num_kv_heads)}.")
  # The loss runs over strided chunks of C = min(chunk, L) tokens (training/loss.py): C must
  # divide L, and be a multiple of the sequence axis so each chunk holds an equal share of every
  # device's tokens (no chunk gathers across devices).
  chunk = min(c.train.loss_chunk_size, L)
  if c.train.loss_chunk_size <= 0 or L % chunk or chunk % n:
    raise ValueError(f"train.loss_chunk_size={c.train.loss_chunk_size}: the loss chunk "
                     f"min(chunk, data.seq_len)={chunk} must divide data.seq_len={L} and be a "
                     f"multiple of mesh.sequence={n}; use a power of two >= {n}.")
  if L > model.max_position_embeddings:
    raise ValueError(f"data.seq_len={L} exceeds the model's max_position_embeddings="
                     f"{model.max_position_embeddings}; set model.ultralong or "
                     "model.max_position_embeddings.")
  if data and c.data.vocab_size != model.vocab_size:
    raise ValueError(f"data.vocab_size={c.data.vocab_size} != the model's vocab_size="
                     f"{model.vocab_size}; token ids must index the embedding.")
  if c.train.steps <= 0 or c.train.microbatches <= 0:
    raise ValueError("train.steps and train.microbatches must be positive.")
  warmup, cooldown = c.optim.warmup_steps, c.optim.cooldown_steps
  if c.optim.schedule == "wsd" and not 0 < cooldown <= c.train.steps - warmup:
    raise ValueError(f"optim.cooldown_steps={cooldown}: schedule wsd cools down over the last "
                     f"steps; use 1..{c.train.steps - warmup} (train.steps - optim.warmup_steps).")
  if c.optim.schedule != "wsd" and cooldown:
    raise ValueError(f"optim.cooldown_steps={cooldown} applies to optim.schedule=wsd only "
                     f"(schedule is {c.optim.schedule!r}); set it to 0 or use wsd.")
  if c.train.max_nonfinite_steps < 0:
    raise ValueError(f"train.max_nonfinite_steps={c.train.max_nonfinite_steps}; use >= 0 "
                     "(0 = no limit).")
  for key in ("train.hang_timeout_s", "train.hang_startup_s", "checkpoint.retries",
              "checkpoint.retry_backoff_s"):
    section, name = key.split(".")
    if c[section][name] < 0:
      raise ValueError(f"{key}={c[section][name]}; use >= 0.")
  return model
