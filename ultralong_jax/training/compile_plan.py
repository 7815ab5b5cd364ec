"""XLA's plan of a sharded train step, read without running it: compile for abstract arrays
(ShapeDtypeStruct + sharding: nothing allocated) and read the per-device memory and cost analysis.

  setup = Setup(preset="llama31_8b_1m", seq_len=1 << 20, mesh=(("sequence", 4), ("tensor", 8)),
                kernel=STANDIN, batch=1)
  plan(setup)["peak_estimate_bytes"]   # on 32 (simulated) devices

`build` turns a Setup into `train_step.build`'s arguments (the builder training uses: sharded
params + AdamW state, donated, explicit shardings; ring attention over `sequence` when that axis
is > 1). The memory
estimate's `--xla` and the benchmarks (bench/train_step.py, bench/memory.py) call it.

Kernel "standin" (STANDIN) is STANDIN_KERNEL, a memory stand-in for a flash kernel with the same
inputs, outputs and residuals (out, lse) but O(T) work and no [c, c] score block, passed to
ring_attention as its block kernel: XLA's memory plan of everything else in the step can then be
read on CPU (where the reference kernel's materialized scores would dominate). Its FLOPs and
outputs mean nothing; never time it or train with it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp

from ultralong_jax.modeling import presets
from ultralong_jax.parallel import block_attention, chunked_attention, mesh as mesh_lib
from ultralong_jax.parallel.ring_attention import make_attention_fn, ring_attention
from ultralong_jax.training import train_step
from ultralong_jax.training.config import base_config
from ultralong_jax.training.run_config import OptimConfig

STANDIN = "standin"  # Setup.kernel naming STANDIN_KERNEL: a flash kernel's memory without its math


def _standin_forward(q, k, v, q_seg, kv_seg, *, causal, scale):
  """q [B,T,K,G,H], k/v [B,S,K,H] -> out f32 [B,T,K,G,H], lse [B,K,G,T]: O(T) memory only."""
  del q_seg, kv_seg, causal
  v_mean = jnp.mean(v.astype(jnp.float32), axis=1)[:, None, :, None, :]    # [B,1,K,1,H]
  k_mean = jnp.mean(k.astype(jnp.float32), axis=1)                          # [B,K,H]
  lse = jnp.einsum("BTKGH,BKH->BKGT", q.astype(jnp.float32), k_mean) * scale
  return q.astype(jnp.float32) * v_mean, lse


def _standin_backward(q, k, v, q_seg, kv_seg, out, lse, dout, delta, *, causal, scale):
  """Gradients with the right shapes and dependencies (dq [B,T,K,G,H], dk/dv [B,S,K,H] f32)."""
  del q_seg, kv_seg, out, causal
  w = (lse - delta).transpose(0, 3, 1, 2)[..., None]                        # [B,T,K,G,1]
  dq = dout.astype(jnp.float32) * w * scale
  pooled = jnp.sum(dq * q.astype(jnp.float32), axis=(1, 3))[:, None]       # [B,1,K,H]
  return dq, k.astype(jnp.float32) * pooled, v.astype(jnp.float32) * pooled


STANDIN_KERNEL = block_attention.BlockKernel(_standin_forward, _standin_backward,
                                             segment_ids=False, memory="flash")
# The kernel whose compile on CPU shows the plan of each training.memory kernel class: flash by
# the stand-in (no GPU kernel compiles on CPU), plain by "auto" (with mesh.sequence == 1).
KERNEL_OF_CLASS = {"flash": STANDIN, "chunked": "chunked", "xla": "xla", "plain": "auto"}


def block_kernel(kernel: str, chunk_size: int = chunked_attention.CHUNK_SIZE
                 ) -> block_attention.BlockKernel:
  """The BlockKernel a Setup.kernel other than "auto" names (STANDIN or a KERNELS name)."""
  return STANDIN_KERNEL if kernel == STANDIN else block_attention.get_kernel(
      kernel, chunk_size=chunk_size)


@dataclasses.dataclass(frozen=True)
class Setup:
  """One step shape. `mesh` maps axis -> size (omitted axes 1, one may be -1)."""
  preset: str = "tiny"
  seq_len: int = 1024
  mesh: tuple[tuple[str, int], ...] = (("data", -1),)
  remat: str = "full"
  kernel: str = "auto"    # auto | a name of block_attention.KERNELS | STANDIN
  strategy: str = "ring"
  batch: int = 0          # global rows; 0 = one row per data x fsdp shard
  num_layers: int = 0     # 0 = the preset's; fewer for extrapolation (see bench/memory.py)
  loss_chunk: int = 4096
  dtype: str = "bfloat16"
  microbatches: int = 1
  chunk_size: int = chunked_attention.CHUNK_SIZE  # the chunked kernel's tile
  model: Any = None       # a LlamaConfig to use instead of `preset` (num_layers still applies)


def _ring(q, k, v, *, mesh, positions=None, segment_ids=None, causal=True, scale=None,
          **options):
  """The model's attention_fn signature over ring_attention (see build); as in
  make_attention_fn, kernels that mask by positions get them, the fused ones take the layout's
  order."""
  if not block_attention.get_kernel(options["kernel"], chunk_size=options["chunk_size"]).positions:
    positions = None
  # One device: the contiguous layout makes the one-block ring a single fused causal kernel call
  # (zigzag would split it into three sub-blocks and two merges).
  layout = "zigzag" if mesh.shape["sequence"] > 1 else "contiguous"
  return ring_attention(q, k, v, mesh=mesh, positions=positions, segment_ids=segment_ids,
                        causal=causal, scale=scale, layout=layout, **options)


def build(setup: Setup, devices=None) -> train_step.TrainStep:
  """The sharded, donated train step of `setup` (its unallocated inputs: `abstract_state()`,
  `abstract_batch()`)."""
  devices = list(devices if devices is not None else jax.devices())
  fixed = math.prod(s for _, s in setup.mesh)
  if fixed > 0 and fixed < len(devices):  # no -1: a mesh smaller than the machine uses a prefix
    devices = devices[:fixed]
  sizes = mesh_lib.resolve_axis_sizes(dict(setup.mesh), len(devices))
  overrides = dict(dtype=setup.dtype, param_dtype="float32", remat_policy=setup.remat)
  if setup.num_layers:
    overrides["num_layers"] = setup.num_layers
  config = (setup.model.replace(**overrides) if setup.model is not None else
            presets.get_preset(setup.preset, **overrides))
  if setup.seq_len > config.max_position_embeddings:  # shape-only: RoPE tables take any position
    config = config.replace(max_position_embeddings=setup.seq_len)
  mesh = mesh_lib.make_mesh(sizes, devices=devices)
  if setup.kernel == "auto":
    attention_fn = make_attention_fn(mesh, strategy=setup.strategy, layout="zigzag",
                                     chunk_size=setup.chunk_size)
  else:
    # An explicit kernel goes through ring_attention even with sequence=1 (a one-block ring),
    # because the model's plain attention path always materializes [T, T] scores.
    kernel = STANDIN_KERNEL if setup.kernel == STANDIN else setup.kernel
    attention_fn = functools.partial(_ring, mesh=mesh, strategy=setup.strategy,
                                     kernel=kernel, chunk_size=setup.chunk_size)
  batch = setup.batch or sizes["data"] * sizes["fsdp"]
  options = train_step.StepOptions(loss_chunk_size=min(setup.loss_chunk, setup.seq_len),
                                   microbatches=setup.microbatches)
  return train_step.build(config, mesh, OptimConfig.of(base_config(1)), 1000,
                          seq_len=setup.seq_len, batch_size=batch, options=options,
                          attention_fn=attention_fn)


def compile_abstract(built: train_step.TrainStep):
  """(compiled executable, seconds to lower + compile); nothing is allocated."""
  start = time.perf_counter()
  with jax.set_mesh(built.mesh):
    compiled = built.step.lower(built.abstract_state(), built.abstract_batch()).compile()
  return compiled, time.perf_counter() - start


def analyse(compiled) -> dict[str, float]:
  """Per-device bytes and FLOPs from XLA's compiled memory and cost analysis.

  peak_estimate = arguments + outputs - aliased (donated state reuses its buffers) + temporaries:
  what one device holds at the step's high-water mark, as XLA's buffer assignment plans it.
  """
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  out = {
      "argument_bytes": mem.argument_size_in_bytes,
      "output_bytes": mem.output_size_in_bytes,
      "alias_bytes": mem.alias_size_in_bytes,
      "temp_bytes": mem.temp_size_in_bytes,
      "code_bytes": mem.generated_code_size_in_bytes,
      "xla_flops": float(cost.get("flops", 0.0)) if cost else 0.0,
  }
  out["peak_estimate_bytes"] = (out["argument_bytes"] + out["output_bytes"] -
                                out["alias_bytes"] + out["temp_bytes"])
  return out


def plan(setup: Setup, devices=None) -> dict[str, Any]:
  """XLA's per-device plan of `setup`'s step: `analyse`'s fields plus compile_s, devices and
  platform (of the mesh the step compiled for)."""
  built = build(setup, devices)
  compiled, compile_s = compile_abstract(built)
  return {**analyse(compiled), "compile_s": compile_s, "devices": built.mesh.size,
          "platform": built.mesh.devices.flat[0].platform}
