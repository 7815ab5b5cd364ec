"""Per-device memory of a training step, estimated before anything compiles.

  python -m ultralong_jax.estimate_memory --config=configs/llama31_8b_stage1.py:1m --devices=64

`estimate(shape)` splits the bytes one device holds at the step's high-water mark into parts:

  params, optimizer   fp32 master weights and Adam's two moments, sharded over fsdp x tensor
                      (exact: every parameter's shard shape under the shardings training uses).
  batch               the step's int32 inputs (tokens, targets, positions, segments, loss mask).
  gradients           fp32 gradients (plus the accumulator with train.microbatches > 1).
  weight_temps        compute-dtype copies of the weights and the optimizer update's temporaries.
  checkpoints         what the remat policy saves per layer for the backward pass: with `full`
                      only the layer input, split over sequence x tensor; `dots_no_batch` also
                      the projections' outputs; `dots` and `none` also every attention score
                      that a kernel computes with einsums (not cuDNN's).
  layer_working_set   one layer's recomputed forward and its backward (norms, q/k/v, the MLP's
                      gate/up/down and their gradients) at this device's tokens.
  attention           the per-block kernel's buffers: a flash kernel (cuDNN on H100) keeps O(c);
                      the XLA reference kernel materializes [N, 2c, c] float32 scores per ring
                      step; the chunked kernel a [N, chunk, chunk] tile; the plain attention
                      (mesh.sequence == 1) [N, T, T].
  loss                one loss chunk's float32 logits and their gradient.

The first four are exact. The rest are linear in the sizes that drive them (tokens per device x
model widths, score elements, logits elements), with coefficients fitted to XLA's compiled memory
analysis of the real train step (training/compile_plan.py) on CPU; `COEFFICIENTS` says what each
multiplies. The loss runs before the layers' backward, so the peak holds the larger of the loss
and (working set + attention), not both. tests/training/test_memory_estimate.py compiles a spread
of configurations and holds the estimate within 20% of XLA's plan; docs/training.md has the whole
calibration table and the comparison with XLA on the 1B and 8B presets at 8K-4M tokens. What it
cannot see: a GPU flash kernel's own workspace, allocator fragmentation, NCCL buffers and the
runtime's reserve, hence USABLE.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping

import jax
from flax import nnx
from jax.sharding import AbstractMesh

from ultralong_jax.modeling.config import LlamaConfig
from ultralong_jax.parallel import block_attention, chunked_attention, ring_attention, sharding
from ultralong_jax.parallel.mesh import MESH_AXES, resolve_axis_sizes
from ultralong_jax.training.run_config import RunConfig

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GiB = 2**30

# Fitted (least squares on the relative error) to XLA's plans of the CPU compiles of
# `python -m ultralong_jax.bench.memory --calibration` and the 13 1B/8B rows of its default table.
# Units: bytes per element of the named quantity.
COEFFICIENTS = {
    "weight_temps": 4.7,        # x parameters per device (bf16 copies + update temporaries)
    "checkpoint_full": 1.0,     # (exact) x layers x tokens x D/tp x compute bytes
    "checkpoint_dots": 1.9,     # x layers x tokens x (q,k,v + 2 D + 2 F)/tp x compute bytes
    "checkpoint_none": 1.6,     # x layers x tokens x everything the layer computes (see below)
    "working_d": 22.6,          # x tokens x D
    "working_f": 19.0,          # x tokens x F/tp
    "working_qkv": 7.8,         # x tokens x (N + 2K) H / tp
    "scores": 3.2,              # x float32 score elements of the largest ring kernel call
    "plain_scores": 3.3,        # the same for the plain attention (mesh.sequence == 1)
    "saved_scores": 5.2,        # bytes x layers x score elements dots/none remat keep (ring)
    "saved_plain_scores": 3.7,  # the same for the plain attention
    "saved_chunked_scores": 7.5,  # the same for the chunked kernel's off-diagonal tiles
    "loss": 3.2,                # x float32 logits of one loss chunk
}


@dataclasses.dataclass(frozen=True)
class StepShape:
  """What decides a train step's memory. `mesh` maps axis -> size (one may be -1)."""
  model: LlamaConfig
  mesh: Mapping[str, int]
  num_devices: int
  seq_len: int
  global_batch: int
  microbatches: int = 1
  remat: str = "full"
  # Memory class of the attention: flash (cuDNN: O(c)), chunked ([chunk, chunk] tiles), xla (the
  # ring's reference kernel: [2c, c] scores a step) or plain (mesh.sequence == 1: [T, T] scores).
  kernel: str = "flash"
  kernel_chunk: int = chunked_attention.CHUNK_SIZE  # attention.chunk_size: the chunked tile
  loss_chunk: int = 4096
  layout: str = "zigzag"
  segment_ids: bool = False    # document masking / SFT packing (one more int32 input)
  param_dtype: str = "float32"
  dtype: str = "bfloat16"
  state_dtype: str = "float32"


def mesh_label(mesh: Mapping[str, int], sep: str = " × ") -> str:
  """{"data": 2, "sequence": 4, "tensor": 8} -> "DP2 × CP4 × TP8" (axes of size 1 left out)."""
  short = {"data": "DP", "fsdp": "FSDP", "sequence": "CP", "tensor": "TP"}
  return sep.join(f"{short[a]}{s}" for a, s in dict(mesh).items() if s > 1) or "1 device"


def _abstract_mesh(sizes: Mapping[str, int]) -> AbstractMesh:
  return AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES)


def params_per_device(model: LlamaConfig, sizes: Mapping[str, int]) -> int:
  """Parameters one device holds: each parameter's shard under the shardings training gives it
  (parallel/sharding.state_shardings: axes that do not divide a dimension leave it replicated)."""
  params = _abstract_params(model)
  shardings = nnx.to_pure_dict(sharding.state_shardings(_abstract_mesh(sizes), params))
  shards = jax.tree.map(lambda s, x: math.prod(s.shard_shape(x.shape)), shardings,
                        nnx.to_pure_dict(params))
  return sum(jax.tree.leaves(shards))


@functools.lru_cache(maxsize=16)
def _abstract_params(model: LlamaConfig) -> nnx.State:
  """The model's parameters as ShapeDtypeStructs with their logical names; built once per model
  config (suggest() estimates dozens of meshes of one model)."""
  from ultralong_jax.modeling import llama  # pylint: disable=import-outside-toplevel
  return nnx.state(llama.abstract_model(model), nnx.Param)


def _checkpoint_width(model: LlamaConfig, remat: str) -> float:
  """Elements per token per layer that the remat policy saves (before dividing by tp)."""
  d, f = model.hidden_size, model.intermediate_size
  qkv = (model.num_heads + 2 * model.num_kv_heads) * model.head_dim
  if remat == "full":
    return COEFFICIENTS["checkpoint_full"] * d
  if remat == "qkv_attention":  # q, k, v and the attention output (before o_proj)
    return COEFFICIENTS["checkpoint_dots"] * (qkv + model.num_heads * model.head_dim)
  projections = qkv + 2 * d + 2 * f  # q/k/v, o_proj, gate, up, down outputs
  if remat in ("dots", "dots_no_batch"):
    return COEFFICIENTS["checkpoint_dots"] * projections
  # none: the projections plus norms, rotated q/k, attention output and the MLP activation.
  return COEFFICIENTS["checkpoint_none"] * (projections + 2 * d + qkv + model.num_heads *
                                            model.head_dim + f)


def saved_score_elements(shape: StepShape, sizes: Mapping[str, int], rows: int) -> int:
  """Score elements per layer that `dots` / `none` remat keep for the backward pass. Attention's
  score einsums are batched dots, and remat saves the policy's values computed anywhere in the
  forward, the ring's custom-gradient forward included: every tile of the XLA and chunked kernels
  (but not cuDNN's, a custom call), and the plain attention's [T, T]."""
  if shape.remat not in ("dots", "none") or shape.kernel == "flash":
    return 0
  n, t_loc = sizes["sequence"], shape.seq_len // sizes["sequence"]
  heads = _heads_per_device(shape.model, sizes)
  if shape.kernel == "plain":  # the whole [T, T] square
    per_row = t_loc * t_loc
  elif shape.kernel == "chunked":
    # The off-diagonal ring steps' tiles; the diagonal block's causal tile loop keeps nothing
    # (measured: a one-block ring under `dots` plans like `dots_no_batch`).
    per_row = t_loc * (shape.seq_len - t_loc) // 2
  else:  # xla: a causal ring pass computes about half of [T/n, T]
    per_row = t_loc * shape.seq_len // 2
  return rows * heads * per_row


def _heads_per_device(model: LlamaConfig, sizes: Mapping[str, int]) -> int:
  tp = sizes["tensor"]
  return model.num_heads // tp if model.num_heads % tp == 0 else model.num_heads


def score_elements(shape: StepShape, sizes: Mapping[str, int], rows: int) -> int:
  """Float32 elements of the largest score block one kernel call materializes (xla/chunked)."""
  n, t_loc = sizes["sequence"], shape.seq_len // sizes["sequence"]
  heads = _heads_per_device(shape.model, sizes)
  # One device: one causal call over T. Zigzag ring: each device holds two c = T/2n chunks and a
  # ring step attends 2c queries to c keys (or c to 2c): 2 c^2 scores; contiguous: c = T/n.
  if n == 1:
    q_len, k_len = t_loc, t_loc
  elif shape.layout == "zigzag":
    q_len, k_len = t_loc, t_loc // 2
  else:
    q_len, k_len = t_loc, t_loc
  if shape.kernel == "chunked":  # [chunk, chunk] tiles of queries x keys
    q_len, k_len = min(q_len, shape.kernel_chunk), min(k_len, shape.kernel_chunk)
  return rows * heads * q_len * k_len


def estimate(shape: StepShape) -> dict[str, float]:
  """Bytes per device by part (see the module docstring) plus "total"."""
  m = shape.model
  sizes = resolve_axis_sizes(dict(shape.mesh), shape.num_devices)
  tp, n = sizes["tensor"], sizes["sequence"]
  p_dev = params_per_device(m, sizes)
  rows = max(shape.global_batch // (sizes["data"] * sizes["fsdp"]), 1)
  rows_mb = max(rows // max(shape.microbatches, 1), 1)
  t_loc = shape.seq_len // n
  tokens = rows_mb * t_loc
  cbytes = _BYTES[shape.dtype]
  qkv = (m.num_heads + 2 * m.num_kv_heads) * m.head_dim
  c = COEFFICIENTS
  parts = {
      "params": p_dev * _BYTES[shape.param_dtype],
      "optimizer": p_dev * (_BYTES[shape.state_dtype] + 4),
      # inputs, targets, positions, loss mask (+ segment ids): jit drops unused inputs.
      "batch": (5 if shape.segment_ids else 4) * 4 * rows * t_loc,
      "gradients": p_dev * 4 * (2 if shape.microbatches > 1 else 1),
      "weight_temps": c["weight_temps"] * p_dev,
      "checkpoints": m.num_layers * tokens * _checkpoint_width(m, shape.remat) / tp * cbytes,
      # The layer's input is gathered whole over tensor (its norm and q/k/v/gate/up inputs are
      # [tokens, D] on every tensor rank); heads and the MLP width are split over tensor.
      "layer_working_set": tokens * (c["working_d"] * m.hidden_size +
                                     (c["working_f"] * m.intermediate_size +
                                      c["working_qkv"] * qkv) / tp),
      "attention": 0.0,
      "loss": c["loss"] * 4 * rows_mb * (min(shape.loss_chunk, shape.seq_len) // n) *
              -(-m.vocab_size // tp),
  }
  if shape.kernel in ("xla", "chunked", "plain"):
    copies = c["plain_scores"] if shape.kernel == "plain" else c["scores"]
    parts["attention"] = copies * 4 * score_elements(shape, sizes, rows_mb)
  saved = {"plain": c["saved_plain_scores"], "chunked": c["saved_chunked_scores"]}.get(
      shape.kernel, c["saved_scores"])
  parts["checkpoints"] += m.num_layers * saved * saved_score_elements(shape, sizes, rows_mb)
  # The loss runs before the layers' backward starts; XLA reuses its buffers for the layers' and
  # the attention's temporaries, so the peak holds the larger of the two phases, not both.
  phase = max(parts["layer_working_set"] + parts["attention"], parts["loss"])
  parts["total"] = sum(v for k, v in parts.items()
                       if k not in ("layer_working_set", "attention", "loss")) + phase
  return parts


# Accelerator memory per device (GiB) and the platform that decides the attention kernel.
DEVICES = {
    "h100": ("gpu", 79.6), "h200": ("gpu", 139.8), "a100": ("gpu", 79.2),
    "v5p": ("tpu", 95.7), "v6e": ("tpu", 31.3), "v5e": ("tpu", 15.7), "cpu": ("cpu", 0.0),
}
# The share of device memory a plan may use: the estimate does not see the GPU flash kernel's
# workspace, NCCL buffers, fragmentation or the runtime's reserve.
USABLE = 0.9
COMFORTABLE = 0.75  # suggest() prefers meshes below this share
# How far the estimate may be from XLA's plan (tests/training/test_memory_estimate.py holds it).
TOLERANCE = 0.2


def kernel_class(kernel: str, platform: str, has_segment_ids: bool, seq_len: int, sequence: int,
                 layout: str = "zigzag", chunk: int = chunked_attention.CHUNK_SIZE) -> str:
  """The memory class (flash | chunked | xla | plain, StepShape.kernel) of `attention.kernel` on
  `platform`: the BlockKernel.memory of the kernel block_attention.select_kernel picks for a
  block of T / 2n tokens under zigzag (T / n contiguous), and, as ring_attention.make_attention_fn
  does, the plain attention where one sequence shard would get a kernel that materializes the
  scores."""
  block = ring_attention.training_block_length(seq_len, sequence, layout)
  kernel = block_attention.select_kernel(kernel, has_segment_ids=has_segment_ids,
                                         platform=platform, block_length=block, chunk_size=chunk)
  memory_class = block_attention.get_kernel(kernel, chunk_size=chunk).memory
  return "plain" if memory_class == "xla" and sequence == 1 else memory_class


def shape_from_config(run: RunConfig, platform: str) -> StepShape:
  """The StepShape of a resolved training config (config.resolve) on its devices of `platform`."""
  a, sizes = run.attention, run.mesh.sizes
  kernel = kernel_class(a.kernel, platform, run.uses_segment_ids, run.seq_len, sizes["sequence"],
                        a.layout, a.chunk_size)
  return StepShape(
      model=run.model, mesh=sizes, num_devices=run.mesh.num_devices, seq_len=run.seq_len,
      global_batch=run.global_batch_size, microbatches=run.train.microbatches,
      remat=run.model.remat_policy, kernel=kernel, kernel_chunk=a.chunk_size,
      loss_chunk=run.train.loss_chunk_size, layout=a.layout, segment_ids=run.uses_segment_ids,
      param_dtype=run.model.param_dtype, dtype=run.model.dtype, state_dtype=run.optim.state_dtype)


def candidate_meshes(num_devices: int, global_batch: int, seq_len: int, model: LlamaConfig,
                     max_tensor: int = 8) -> list[dict[str, int]]:
  """Every data x fsdp x sequence x tensor factorization of `num_devices` that the train step
  accepts: data x fsdp divides the global batch, tensor <= max_tensor divides the kv heads, the
  zigzag layout splits the sequence into 2 x sequence chunks."""
  meshes = []
  for tensor in (t for t in (1, 2, 4, 8, 16) if t <= max_tensor):
    if model.num_kv_heads % tensor or num_devices % tensor:
      continue
    for replicas in (r for r in range(1, global_batch + 1) if global_batch % r == 0):
      if (num_devices // tensor) % replicas:
        continue
      sequence = num_devices // (tensor * replicas)
      if seq_len % (2 * sequence):
        continue
      for fsdp in (f for f in range(1, replicas + 1) if replicas % f == 0):
        meshes.append({"data": replicas // fsdp, "fsdp": fsdp, "sequence": sequence,
                       "tensor": tensor})
  return meshes


def suggest(shape: StepShape, device: str, max_tensor: int = 8) -> list[tuple[dict, dict]]:
  """(mesh, estimate) for every candidate mesh of `shape` on `device`, best first.

  Each device takes its rows one at a time (train.microbatches = rows per device). Order: meshes
  that fit within COMFORTABLE of the memory, then those within USABLE, then the rest by size;
  within a group the least tensor parallelism first (its all-reduces of [T/CP, D] activations sit
  on the critical path twice a layer, while the ring's K/V hops overlap with compute), then more
  data replicas (no weight all-gathers), then less memory. A heuristic: measure before a long run.
  """
  capacity = DEVICES[device][1] * GiB
  rows = []
  for mesh in candidate_meshes(shape.num_devices, shape.global_batch, shape.seq_len, shape.model,
                               max_tensor):
    per_device = shape.global_batch // (mesh["data"] * mesh["fsdp"])
    est = estimate(dataclasses.replace(shape, mesh=mesh, microbatches=per_device))
    rows.append((mesh, est))

  def key(row):
    mesh, est = row
    if est["total"] > USABLE * capacity:
      return (2, 0, 0, est["total"])
    return (int(est["total"] > COMFORTABLE * capacity), mesh["tensor"], -mesh["data"],
            est["total"])

  return sorted(rows, key=key)
