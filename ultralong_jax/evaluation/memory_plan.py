"""Per-device memory of evaluation (prefill + decode with the KV cache), estimated before launching.

  python -m ultralong_jax.estimate_memory --eval --preset llama31_8b_1m --context 1048576 \
      --mesh sequence=1,tensor=8 --device h100
  python -m ultralong_jax.estimate_memory --eval --niah       # the NIAH 1M/2M/4M mesh table

`estimate(shape)` splits what one device holds into parts (evaluation/generate.CachedModel's
layout: parameters split over tensor by the training sharding table, the cache's slots over
`sequence`, its kv heads over `tensor`, every prefill chunk split over `sequence`):

  params          the weights in the evaluation dtype (exact: each parameter's shard).
  kv_cache        keys and values of every layer, [L, B, S/n, K/tp, H] twice, plus the segment
                  ids (exact, with CachedModel.new_cache's slot padding). `kv_cache_layer` is one
                  layer's share.
  prefill         one prefill step's temporaries at t = chunk / n tokens per device: the cache
                  attention's float32 [B, N/tp, t, kv_block] score tile (about twice: scores and
                  their exponentials), one layer's activations ([t, D], [t, F/tp]), and what
                  XLA's plan also holds: half of one layer's K/V and a few slices of one layer's
                  parameters (the scan's).
  decode          one decode step's temporaries: two of one layer's parameters (the scan's
                  slices of the stacked weights) and the embedding and head; the cache is read in
                  place and written once per step (decode.attend_token / write_tokens), so only
                  [B, kv_block] blocks of it and the step's new keys/values add to this.

The peak is params + kv_cache + max(prefill, decode): the cache is donated and updated in place.
The temporaries' coefficients are fitted to XLA's compiled memory analysis of CachedModel's own
prefill and decode steps on CPU (`xla_plan`; tests/evaluation/test_memory_plan.py holds the estimate within
TOLERANCE of it over sequence = 1, 2, 4, 8). What it cannot see: allocator fragmentation, NCCL
buffers and the runtime's reserve, hence training.memory.USABLE.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from ultralong_jax.modeling.config import LlamaConfig
from ultralong_jax.parallel.mesh import resolve_axis_sizes
from ultralong_jax.training import memory as train_memory

GiB = 2**30
TOLERANCE = train_memory.TOLERANCE  # how far the estimate may be from XLA's plan (20%)
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Multipliers of the named quantity (in its own bytes), fitted (least squares on the relative
# error) to XLA's plans of CachedModel's steps on CPU: 5 small models (D 128-512, F/D 2-4, 2-6
# layers, kv_block 128-512, 8K-16K prompts in one pass or 2K-4K chunks) x meshes sequence 1, 2, 4,
# 8 and sequence 2 x tensor 2 (CALIBRATION; `python -m ultralong_jax.estimate_memory --eval --calibrate`
# prints each plan next to the estimate). The prefill fit is within 8% of all 25 plans, the decode
# fit within 4%.
COEFFICIENTS = {
    "scores": 2.1,           # prefill: the float32 [B, N/tp, t, kv_block] score tile (s and p)
    "prefill_cache": 0.5,    # prefill: one layer's [B, S/n, K/tp, H] K and V
    "prefill_layer": 3.9,    # prefill: one layer's parameters (the scan's slices of them)
    "act_d": 1.75,           # prefill: [t, D] activations in the compute dtype
    "act_f": 1.15,           # prefill: [t, F/tp] MLP activations in the compute dtype
    "decode_layer": 2.06,    # decode: one layer's parameters
    "decode_io": 0.96,       # decode: the embedding and the LM head
    "decode_block": 0.36,    # decode: one [B, kv_block, K/tp, H] block of K and V
}
# (D, F, N, K, H, V, L, prompt tokens, prefill chunk, kv_block) of the fitted models, bf16.
CALIBRATION = (
    (128, 256, 8, 4, 16, 512, 2, 16384, 16384, 512),
    (128, 512, 8, 2, 16, 512, 4, 16384, 16384, 128),
    (256, 512, 8, 2, 32, 1024, 3, 16384, 4096, 256),
    (512, 1024, 8, 4, 64, 2048, 2, 8192, 8192, 512),
    (256, 896, 8, 4, 32, 4096, 6, 8192, 2048, 256),
)
CALIBRATION_MESHES = ("sequence=1", "sequence=2", "sequence=4", "sequence=8",
                      "sequence=2,tensor=2")


@dataclasses.dataclass(frozen=True)
class EvalShape:
  """What decides evaluation memory. `mesh` maps axis -> size (omitted axes 1)."""
  model: LlamaConfig
  mesh: Mapping[str, int]
  context: int                 # prompt tokens
  new_tokens: int = 64         # decoded tokens (NIAH answers: a few dozen)
  batch: int = 1               # prompts at once (rows per data x fsdp replica: batch / replicas)
  prefill_chunk: int = 8192    # prompt tokens per prefill step (the eval CLIs' --prefill-chunk)
  kv_block: int = 512          # cache slots per attention block (--kv-block)
  dtype: str = "bfloat16"      # parameters, activations and the cache (--dtype)


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def cache_slots_per_device(shape: EvalShape, sequence: int) -> int:
  """Slots one device holds, as CachedModel.generate allocates them: the prompt padded to the
  chunk, plus the new tokens, split over `sequence`, rounded to a multiple of kv_block."""
  chunk = _round_up(min(shape.prefill_chunk, shape.context), sequence)
  slots = _round_up(shape.context, chunk) + shape.new_tokens
  local = -(-slots // sequence)
  return _round_up(local, min(shape.kv_block, local))


def estimate(shape: EvalShape) -> dict[str, float]:
  """Bytes per device by part (see the module docstring) plus "total"."""
  m = shape.model
  sizes = resolve_axis_sizes(dict(shape.mesh), math.prod(dict(shape.mesh).values()))
  n, tp = sizes["sequence"], sizes["tensor"]
  rows = max(shape.batch // (sizes["data"] * sizes["fsdp"]), 1)
  b = _BYTES[shape.dtype]
  kv_heads = m.num_kv_heads // tp if m.num_kv_heads % tp == 0 else m.num_kv_heads
  heads = m.num_heads // tp if m.num_heads % tp == 0 else m.num_heads
  slots = cache_slots_per_device(shape, n)
  layer_cache = 2 * rows * slots * kv_heads * m.head_dim * b
  chunk = _round_up(min(shape.prefill_chunk, shape.context), n)
  c = COEFFICIENTS

  params = train_memory.params_per_device(m, sizes) * b
  vocab_split = tp if m.vocab_size % tp == 0 else 1
  io = (1 if m.tie_word_embeddings else 2) * m.vocab_size // vocab_split * m.hidden_size * b
  layer = (params - io) / m.num_layers  # one layer's parameters on this device
  t = chunk // n  # one prefill step's tokens per device (per row)
  cache = m.num_layers * layer_cache + rows * slots * 4
  parts = {
      "params": params,
      "kv_cache_layer": layer_cache,
      "kv_cache": cache,
      "prefill": (c["scores"] * 4 * rows * heads * t * min(shape.kv_block, slots)
                  + c["prefill_cache"] * layer_cache + c["prefill_layer"] * layer
                  + rows * t * b * (c["act_d"] * m.hidden_size
                                    + c["act_f"] * m.intermediate_size / tp)),
      "decode": (c["decode_layer"] * layer + c["decode_io"] * io
                 + c["decode_block"] * 2 * rows * min(shape.kv_block, slots) * kv_heads
                 * m.head_dim * b),
  }
  parts["total"] = parts["params"] + parts["kv_cache"] + max(parts["prefill"], parts["decode"])
  return parts


def fits(est: dict, device: str) -> bool:
  return est["total"] <= train_memory.USABLE * train_memory.DEVICES[device][1] * GiB


def candidate_meshes(model: LlamaConfig, max_devices: int = 1024,
                     max_tensor: int = 8) -> list[dict[str, int]]:
  """sequence x tensor meshes (tensor dividing the kv heads, at most `max_tensor`: one node's
  NVLink / a TPU's ICI neighbours), fewest devices first, then less tensor parallelism."""
  meshes = []
  for tensor in (t for t in (1, 2, 4, 8, 16) if t <= max_tensor and model.num_kv_heads % t == 0):
    sequence = 1
    while sequence * tensor <= max_devices:
      meshes.append({"sequence": sequence, "tensor": tensor})
      sequence *= 2
  return sorted(meshes, key=lambda s: (s["sequence"] * s["tensor"], s["tensor"]))


def smallest_mesh(shape: EvalShape, device: str) -> tuple[dict[str, int], dict] | None:
  """The first candidate mesh (fewest devices) on which `shape` fits `device`, and its estimate."""
  for mesh in candidate_meshes(shape.model):
    est = estimate(dataclasses.replace(shape, mesh=mesh))
    if fits(est, device):
      return mesh, est
  return None


# --- XLA's plan of the real prefill / decode step ----------------------------------------------

def xla_plan(runner, context: int, *, chunk: int | None = None, new_tokens: int = 64,
             batch: int = 1, decode_step: bool = True) -> dict[str, float]:
  """XLA's per-device plan of `runner`'s (a CachedModel) prefill step at `chunk` tokens (default:
  the whole prompt in one pass) and its decode step, compiled for abstract inputs (nothing new is
  allocated; the parameters are the runner's own). Returns bytes: params (arguments other than
  the cache), kv_cache, prefill and decode (temporaries; decode only with `decode_step`), peak
  (arguments + outputs - aliased + temporaries of the prefill step, per device)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  batch = len(runner.pad_rows([0] * batch))
  chunk = _round_up(min(chunk or context, context), runner.chunk_multiple())
  cache = _cache_with_shardings(runner, batch,
                                runner.cache_slots(_round_up(context, chunk) + new_tokens))

  def analyse(tokens: int, ring: bool):
    ids = jax.ShapeDtypeStruct((batch, tokens), jnp.int32)
    fn = runner._fn("last", ring, tokens)  # pylint: disable=protected-access
    compiled = fn.lower(runner.params, cache, ids, ids, ids, jax.ShapeDtypeStruct((), jnp.int32),
                        ids).compile()
    return compiled.memory_analysis()

  ring = runner._ring_attention is not None  # pylint: disable=protected-access
  pre = analyse(chunk, ring)
  cache_bytes = sum(math.prod(s.sharding.shard_shape(s.shape)) * s.dtype.itemsize
                    for s in jax.tree.leaves(cache))
  param_bytes = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(runner.params))
  return {"params": param_bytes, "kv_cache": cache_bytes, "prefill": pre.temp_size_in_bytes,
          "decode": analyse(1, False).temp_size_in_bytes if decode_step else None,
          "peak": (pre.argument_size_in_bytes + pre.output_size_in_bytes -
                   pre.alias_size_in_bytes + pre.temp_size_in_bytes)}


def _cache_with_shardings(runner, batch: int, slots: int):
  """The abstract cache of `slots` slots with the shardings CachedModel.new_cache places it by."""
  import jax  # pylint: disable=import-outside-toplevel
  from ultralong_jax.modeling import decode  # pylint: disable=import-outside-toplevel
  abstract = jax.eval_shape(lambda: decode.init_cache(runner.config, batch, slots))
  if runner.mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                        abstract)
  from jax.sharding import NamedSharding  # pylint: disable=import-outside-toplevel
  from ultralong_jax.parallel import sharding  # pylint: disable=import-outside-toplevel
  kv = NamedSharding(runner.mesh, sharding.logical_to_spec(decode.CACHE_AXES, runner.mesh))
  seg = sharding.named_sharding(runner.mesh, ("batch", "length"))
  return decode.KVCache(*(jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh)
                          for s, sh in zip(abstract, (kv, kv, seg))))


# --- the estimate_memory --eval report ---------------------------------------------------------

def parse_mesh_sizes(text: str, flag: str = "--mesh") -> dict[str, int]:
  """'sequence=4,tensor=2' -> {"data": 1, "fsdp": 1, "sequence": 4, "tensor": 2}; errors name
  the flag. No devices are needed (this is a plan)."""
  sizes = {}
  for part in text.split(","):
    name, _, value = part.partition("=")
    try:
      sizes[name.strip()] = int(value)
    except ValueError:
      raise ValueError(f"{flag}={text!r}: expected axis=size pairs like 'sequence=4,tensor=2'."
                       ) from None
  if any(s < 1 for s in sizes.values()):
    raise ValueError(f"{flag}={text!r}: sizes must be >= 1 (a plan has no 'rest of the devices').")
  try:
    return resolve_axis_sizes(sizes, math.prod(sizes.values()))
  except ValueError as e:
    raise ValueError(f"{flag}={text!r}: {e}") from None


def check_shape(shape: EvalShape) -> None:
  """Raises a ValueError naming the flag when the mesh cannot hold this model / batch."""
  m, sizes = shape.model, shape.mesh
  if m.num_kv_heads % sizes["tensor"] or m.num_heads % sizes["tensor"]:
    raise ValueError(f"--mesh: tensor={sizes['tensor']} does not divide the model's "
                     f"{m.num_heads} heads / {m.num_kv_heads} kv heads.")
  replicas = sizes["data"] * sizes["fsdp"]
  if shape.batch % replicas:
    raise ValueError(f"--batch={shape.batch} is not a multiple of data x fsdp = {replicas}.")
  for flag, value in (("--context", shape.context), ("--prefill_chunk", shape.prefill_chunk),
                      ("--kv_block", shape.kv_block), ("--batch", shape.batch)):
    if value < 1:
      raise ValueError(f"{flag} must be >= 1, got {value}.")


def report(shape: EvalShape, device: str) -> str:
  """The per-device table of one evaluation shape on one mesh."""
  est = estimate(shape)
  capacity = train_memory.DEVICES[device][1] * GiB
  n = shape.mesh["sequence"]
  chunk = _round_up(min(shape.prefill_chunk, shape.context), n)
  lines = [f"  {'part':<34} {'GiB/device':>10}",
           f"  {'parameters':<34} {est['params'] / GiB:>10.2f}",
           f"  {'KV cache, one layer':<34} {est['kv_cache_layer'] / GiB:>10.3f}",
           f"  {f'KV cache, {shape.model.num_layers} layers':<34} {est['kv_cache'] / GiB:>10.2f}",
           f"  {f'prefill working set ({chunk // n:,} tok)':<34} {est['prefill'] / GiB:>10.2f}",
           f"  {'decode working set':<34} {est['decode'] / GiB:>10.2f}",
           f"  {'total':<34} {est['total'] / GiB:>10.2f}   (parameters + cache + the larger "
           "working set)"]
  if capacity:
    verdict = "fits" if fits(est, device) else "does NOT fit"
    lines.append(f"  {device}: {capacity / GiB:.1f} GiB, {train_memory.USABLE:.0%} usable -> "
                 f"{verdict} ({est['total'] / capacity:.0%} of the device)")
  return "\n".join(lines)


def mesh_label(mesh: Mapping[str, int]) -> str:
  return train_memory.mesh_label(mesh)


NIAH_LENGTHS = ("1m", "2m", "4m")  # modeling.presets.ULTRALONG_LENGTHS names
NIAH_DEVICES = ("h100", "v5p")


def niah_table(chunks: tuple[int | None, ...] = (8192, None), new_tokens: int = 64) -> list[dict]:
  """Prints (markdown) and returns the smallest sequence x tensor mesh on which NIAH at 1M / 2M /
  4M fits for Llama-3.1-8B (UltraLong RoPE) in bfloat16, one prompt at a time, on H100 80GB and
  TPU v5p, for 8K prefill chunks and for the whole prompt in one sharded pass (chunk None)."""
  from ultralong_jax.modeling import presets  # pylint: disable=import-outside-toplevel
  print("| context | device | prefill chunk | smallest mesh | devices | parameters | KV cache "
        "(layer / all) | prefill working set | decode working set | total GiB/device | of HBM |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  rows = []
  for length in NIAH_LENGTHS:
    t = presets.ULTRALONG_LENGTHS[length]
    model = presets.get_preset(f"llama31_8b_{length}", dtype="bfloat16", param_dtype="bfloat16")
    for device in NIAH_DEVICES:
      for chunk in chunks:
        shape = EvalShape(model=model, mesh={}, context=t, new_tokens=new_tokens,
                          prefill_chunk=chunk or t)
        found = smallest_mesh(shape, device)
        label = f"{chunk // 1024}K" if chunk else "whole prompt"
        if found is None:
          print(f"| {t >> 20}M | {device} | {label} | none up to 1024 devices | | | | | | | |")
          continue
        mesh, est = found
        frac = est["total"] / (train_memory.DEVICES[device][1] * GiB)
        print(f"| {t >> 20}M | {device} | {label} | {mesh_label(mesh)} | "
              f"{mesh['sequence'] * mesh['tensor']} | {est['params'] / GiB:.1f} | "
              f"{est['kv_cache_layer'] / GiB:.2f} / {est['kv_cache'] / GiB:.1f} | "
              f"{est['prefill'] / GiB:.1f} | {est['decode'] / GiB:.1f} | "
              f"**{est['total'] / GiB:.1f}** | {frac:.0%} |",
              flush=True)
        rows.append({"context": t, "device": device, "prefill_chunk": chunk or t, "mesh": mesh,
                     "estimate": est})
  return rows


def prefill_peak(est: dict) -> float:
  """The prefill step's high-water mark: parameters + cache + its working set (what XLA's
  arguments + outputs - aliased + temporaries of that step count)."""
  return est["params"] + est["kv_cache"] + est["prefill"]


def xla_table(shapes: list[EvalShape]) -> list[dict]:
  """Compiles CachedModel's prefill and decode steps for each shape (its model initialized on the
  host: small models only) on the first devices and prints (markdown) XLA's per-device plan next
  to the estimate. The prefill peak's share beyond the parameters (which every device holds
  whole over `sequence`) is compared with the first row's, times its sequence size: 1 when that
  share falls as 1 / sequence."""
  import jax  # pylint: disable=import-outside-toplevel
  from ultralong_jax.evaluation import generate  # pylint: disable=import-outside-toplevel
  from ultralong_jax.modeling import llama  # pylint: disable=import-outside-toplevel
  from ultralong_jax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  M = 2**20
  print("| mesh | XLA prefill peak MiB | estimate | (peak - params) x n / first row's | "
        "XLA prefill working set | estimate | XLA decode working set | estimate |")
  print("|---|---|---|---|---|---|---|---|")
  rows, model, first = [], None, None
  for shape in shapes:
    if model is None:
      model = llama.init_model(shape.model)
    n = math.prod(shape.mesh.values())
    runner = generate.CachedModel(model, mesh_lib.make_mesh(shape.mesh, devices=jax.devices()[:n]),
                                  kv_block=shape.kv_block)
    xla = xla_plan(runner, shape.context, chunk=shape.prefill_chunk, new_tokens=shape.new_tokens,
                   batch=shape.batch)
    est = estimate(shape)
    sharded = (xla["peak"] - xla["params"]) * shape.mesh["sequence"]
    first = first or sharded
    print(f"| {mesh_label(shape.mesh)} | {xla['peak'] / M:.1f} | {prefill_peak(est) / M:.1f} "
          f"({prefill_peak(est) / xla['peak'] - 1:+.0%}) | {sharded / first:.2f} | "
          f"{xla['prefill'] / M:.1f} | {est['prefill'] / M:.1f} "
          f"({est['prefill'] / xla['prefill'] - 1:+.0%}) | {xla['decode'] / M:.1f} | "
          f"{est['decode'] / M:.1f} ({est['decode'] / xla['decode'] - 1:+.0%}) |", flush=True)
    rows.append({"mesh": shape.mesh, "xla": xla, "estimate": est})
  return rows


def calibrate() -> list[dict]:
  """XLA's plans of the CALIBRATION models on CALIBRATION_MESHES next to the estimate (markdown):
  the data COEFFICIENTS were fitted to. Needs 8 devices (simulated CPU ones)."""
  rows = []
  for d, f, heads, kv_heads, h, v, layers, context, chunk, kv_block in CALIBRATION:
    model = LlamaConfig(vocab_size=v, hidden_size=d, intermediate_size=f, num_layers=layers,
                        num_heads=heads, num_kv_heads=kv_heads, head_dim=h,
                        max_position_embeddings=context + 1024, dtype="bfloat16",
                        param_dtype="bfloat16")
    print(f"\nD {d}, F {f}, N {heads}, K {kv_heads}, H {h}, V {v}, L {layers}; {context:,} "
          f"tokens, prefill chunk {chunk:,}, kv_block {kv_block}")
    rows += xla_table([EvalShape(model, parse_mesh_sizes(mesh), context, prefill_chunk=chunk,
                                 kv_block=kv_block) for mesh in CALIBRATION_MESHES])
  worst = {part: max(abs(r["estimate"][part] / r["xla"][part] - 1) for r in rows)
           for part in ("prefill", "decode")}
  print(f"\nlargest errors: prefill {worst['prefill']:.1%}, decode {worst['decode']:.1%}")
  return rows
