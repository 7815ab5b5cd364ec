"""Train-step benchmark: compile time, step time, tokens/s, TFLOP/s, MFU and memory per device.

  python -m ultralong_jax.bench.train_step --preset tiny --seq-len 1024 --mesh sequence=4,data=2
  python -m ultralong_jax.bench.train_step --preset llama32_1b --seq-len 8192 --kernel cudnn \
      --remat dots --mesh data=1 --steps 10                  # one H100
  python -m ultralong_jax.bench.train_step --preset llama31_8b_1m --seq-len 1048576 \
      --mesh sequence=4,tensor=8 --remat full --batch 1 --abstract   # compile only (32 devices)

It builds the step exactly as training does (`training.train_step`: sharded params + AdamW state,
donated, explicit shardings; ring attention over `sequence` when that axis is > 1), compiles it
with abstract arrays (ShapeDtypeStruct + sharding: nothing allocated) and reads XLA's per-device
memory and cost analysis. Unless --abstract, it then allocates random weights and a random batch
and times `--steps` synchronized steps after `--warmup` steps; the median is reported.

--kernel: auto (block_attention.select_kernel: cuDNN on GPU, else chunked for blocks longer than
--chunk-size, else xla), any name of block_attention.KERNELS, or standin: a
memory stand-in for a flash kernel with the same inputs, outputs and residuals (out, lse) but O(T)
work and no [c, c] score block, so that XLA's memory plan of everything else in the step can be
read on CPU (where the reference kernel's materialized scores would dominate). Its FLOPs and
outputs mean nothing; never time it. An explicit kernel is used even with sequence=1 (a one-block
ring), since the model's plain attention path has no flash kernel.

FLOPs are the model's (training.metrics.train_flops_per_token: 6 per matmul parameter per token
plus causal attention, no remat recomputation), so MFU = model TFLOP/s / device peak (H100 989
dense bf16); XLA's own count (which includes recomputation) is reported next to it.
"""

from __future__ import annotations

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  # Simulated devices on a CPU-only machine; ignored by GPU/TPU backends.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from ultralong_jax.modeling import llama, presets  # noqa: E402
from ultralong_jax.parallel import block_attention, mesh as mesh_lib, sharding  # noqa: E402
from ultralong_jax.parallel.ring_attention import make_attention_fn, ring_attention  # noqa: E402
from ultralong_jax.training import checkpointing, metrics, optimizer, train_step  # noqa: E402
from ultralong_jax.training.config import base_config  # noqa: E402

MiB = 2**20
STANDIN = "standin"  # --kernel standin: a flash kernel's memory without its math (see below)


@dataclasses.dataclass(frozen=True)
class Setup:
  """One benchmark point. `mesh` maps axis -> size (omitted axes 1, one may be -1)."""
  preset: str = "tiny"
  seq_len: int = 1024
  mesh: tuple[tuple[str, int], ...] = (("data", -1),)
  remat: str = "full"
  kernel: str = "auto"
  strategy: str = "ring"
  batch: int = 0          # global rows; 0 = one row per data x fsdp shard
  num_layers: int = 0     # 0 = the preset's; fewer for extrapolation (see bench/memory.py)
  loss_chunk: int = 4096
  dtype: str = "bfloat16"
  microbatches: int = 1
  chunk_size: int = 1024  # the chunked kernel's tile
  model: Any = None       # a LlamaConfig to use instead of `preset` (num_layers still applies)


@dataclasses.dataclass
class Built:
  config: Any               # LlamaConfig
  mesh: Any
  step: Any                 # the jitted step
  abstract_state: dict      # ShapeDtypeStructs with shardings
  abstract_batch: dict
  batch: int
  tx: Any


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


def register_standin() -> None:
  """Adds the stand-in to the ring's kernel table (idempotent; benchmark-only)."""
  block_attention.KERNELS.setdefault(STANDIN, block_attention.BlockKernel(
      _standin_forward, _standin_backward, segment_ids=False))


def parse_mesh(text: str) -> tuple[tuple[str, int], ...]:
  """"data=2,sequence=4" -> (("data", 2), ("sequence", 4))."""
  pairs = [p.split("=") for p in text.split(",") if p]
  return tuple((k.strip(), int(v)) for k, v in pairs)


def _ring(q, k, v, *, mesh, positions=None, segment_ids=None, causal=True, scale=None,
          **options):
  """The model's attention_fn signature over ring_attention (see build)."""
  del positions
  # One device: the contiguous layout makes the one-block ring a single fused causal kernel call
  # (zigzag would split it into three sub-blocks and two merges).
  layout = "zigzag" if mesh.shape["sequence"] > 1 else "contiguous"
  return ring_attention(q, k, v, mesh=mesh, segment_ids=segment_ids, causal=causal, scale=scale,
                        layout=layout, **options)


def build(setup: Setup, devices=None) -> Built:
  """The sharded, donated train step of `setup` and abstract (unallocated) inputs for it."""
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
  if setup.kernel == STANDIN:
    register_standin()
  if setup.kernel == "auto":
    attention_fn = make_attention_fn(mesh, strategy=setup.strategy, layout="zigzag",
                                     chunk_size=setup.chunk_size)
  else:
    # An explicit kernel goes through ring_attention even with sequence=1 (a one-block ring),
    # because the model's plain attention path always materializes [T, T] scores.
    attention_fn = functools.partial(_ring, mesh=mesh, strategy=setup.strategy,
                                     kernel=setup.kernel, chunk_size=setup.chunk_size)
  graphdef, abstract = nnx.split(llama.abstract_model(
      config, attention_fn=attention_fn, constrain_fn=sharding.constrain_fn(mesh)))
  abstract_params = nnx.to_pure_dict(abstract)
  optim_cfg = base_config(1).optim
  tx, schedule = optimizer.make_optimizer(optim_cfg, 1000)
  params_sharding = train_step.param_shardings(mesh, llama.abstract_model(config))
  state_sharding = train_step.state_shardings(mesh, tx, params_sharding, abstract_params)
  batch = setup.batch or sizes["data"] * sizes["fsdp"]
  batch_sharding = train_step.batch_sharding(mesh, setup.seq_len, batch)
  per_device_len = setup.seq_len // sizes["sequence"]
  options = train_step.StepOptions(loss_chunk_size=min(setup.loss_chunk, setup.seq_len),
                                   microbatches=setup.microbatches)
  step = train_step.jit_train_step(train_step.make_train_step(graphdef, tx, schedule, options),
                                   mesh, state_sharding, batch_sharding)
  abstract_state = checkpointing.abstract_with_shardings(
      jax.eval_shape(lambda p: train_step.init_state(p, tx), abstract_params), state_sharding)
  abstract_batch = {k: jax.ShapeDtypeStruct((batch, setup.seq_len), jnp.int32, sharding=s)
                    for k, s in batch_sharding.items()}
  return Built(config, mesh, step, abstract_state, abstract_batch, batch, tx)


def compile_abstract(built: Built):
  """(compiled executable, seconds to lower + compile); nothing is allocated."""
  start = time.perf_counter()
  with jax.set_mesh(built.mesh):
    compiled = built.step.lower(built.abstract_state, built.abstract_batch).compile()
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


_SHAPE = re.compile(r"\b[a-z]+\d*\[([\d,]*)\]")


def all_gather_shapes(hlo_text: str) -> list[tuple[tuple[int, ...], int | None]]:
  """(result shape, gathered dimension) of every all-gather in compiled HLO text (sync, async
  and combined forms; the dimension is None if the instruction does not name one)."""
  gathers = []
  for line in hlo_text.splitlines():
    match = re.search(r"=\s*(.*?)\s(all-gather(?:-start)?)\(", line)
    if match:
      dim = re.search(r"dimensions=\{(\d+)\}", line)
      gathers += [(tuple(int(d) for d in dims.split(",") if d), int(dim.group(1)) if dim else None)
                  for dims in _SHAPE.findall(match.group(1))]
  return gathers


def full_length_all_gathers(hlo_text: str, seq_len: int) -> list[tuple[int, ...]]:
  """Result shapes of all-gathers that assemble a dimension of the full sequence length: a
  sequence-sharded activation rebuilt whole on every device (what context parallelism must
  avoid). Gathers along other dimensions (e.g. heads over `tensor`) do not count."""
  return [shape for shape, dim in all_gather_shapes(hlo_text)
          if (shape[dim] == seq_len if dim is not None else seq_len in shape)]


def _random_inputs(built: Built, seed: int = 0):
  """Random weights (created sharded inside a jit) and a random token batch."""
  config, tx = built.config, built.tx
  shardings = jax.tree.map(lambda a: a.sharding, built.abstract_state)

  def make_state():
    params = nnx.to_pure_dict(nnx.state(llama.init_model(config, seed), nnx.Param))
    return train_step.init_state(params, tx)

  state = jax.jit(make_state, out_shardings=shardings)()
  key = jax.random.key(seed)
  batch = {}
  for name, a in built.abstract_batch.items():
    if name in ("inputs", "targets"):
      x = jax.random.randint(jax.random.fold_in(key, len(batch)), a.shape, 0, config.vocab_size)
    elif name == "positions":
      x = jnp.broadcast_to(jnp.arange(a.shape[1], dtype=jnp.int32), a.shape)
    else:  # segment_ids, loss_mask
      x = jnp.ones(a.shape, jnp.int32)
    batch[name] = jax.device_put(x.astype(jnp.int32), a.sharding)
  return state, batch


def time_steps(built: Built, compiled, steps: int, warmup: int) -> list[float]:
  """Seconds of each of `steps` steps after `warmup`, each synchronized (block_until_ready)."""
  state, batch = _random_inputs(built)
  times = []
  with jax.set_mesh(built.mesh):
    for i in range(warmup + steps):
      start = time.perf_counter()
      state, step_metrics = compiled(state, batch)
      jax.block_until_ready((state, step_metrics))
      if i >= warmup:
        times.append(time.perf_counter() - start)
  if not math.isfinite(float(step_metrics["loss"])):
    raise RuntimeError("benchmark step produced a non-finite loss")
  return times


def device_memory_stats() -> dict[str, int] | None:
  """Peak bytes the runtime saw on device 0 (GPU/TPU); None where unsupported (CPU)."""
  stats = jax.devices()[0].memory_stats()
  if not stats:
    return None
  return {k: stats[k] for k in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit") if k in stats}


def run(setup: Setup, *, steps: int = 5, warmup: int = 2, abstract: bool = False,
        peak: float = 0.0, devices=None) -> dict[str, Any]:
  """One benchmark point -> a JSON-able dict (see `FIELDS` in the docs / tests)."""
  built = build(setup, devices)
  compiled, compile_s = compile_abstract(built)
  n_dev = built.mesh.size
  tokens = built.batch * setup.seq_len
  flops_per_token = metrics.train_flops_per_token(built.config, setup.seq_len)
  device = built.mesh.devices.flat[0]
  result = {
      "setup": dataclasses.asdict(setup), "mesh_shape": dict(built.mesh.shape),
      "devices": n_dev, "device_kind": device.device_kind, "platform": device.platform,
      "jax": jax.__version__, "num_layers": built.config.num_layers,
      "params": built.config.num_params, "global_batch": built.batch, "tokens_per_step": tokens,
      "compile_s": compile_s, "model_flops_per_token": flops_per_token,
      "model_tflop_per_step_per_device": flops_per_token * tokens / n_dev / 1e12,
      **analyse(compiled),
  }
  hlo = compiled.as_text()
  result["hlo_chars"] = len(hlo)
  result["full_length_all_gathers"] = [list(s) for s in full_length_all_gathers(hlo, setup.seq_len)]
  peak = peak or metrics.peak_tflops(device) or 0.0
  result["peak_tflops"] = peak or None
  if not abstract:
    times = time_steps(built, compiled, steps, warmup)
    median = statistics.median(times)
    tflops = flops_per_token * tokens / n_dev / median / 1e12
    result.update(step_times_s=times, step_s=median, tokens_per_s_per_device=tokens / n_dev / median,
                  tflops_per_device=tflops, mfu=tflops / peak if peak else None,
                  memory_stats=device_memory_stats())
  return result


def format_row(r: dict[str, Any]) -> str:
  mesh = ",".join(f"{a}={s}" for a, s in r["mesh_shape"].items() if s > 1) or "1 device"
  s = r["setup"]
  cells = [s["preset"], f"{r['num_layers']}", f"{s['seq_len']:,}", mesh, s["remat"], s["kernel"],
           f"{r['compile_s']:.1f}", f"{r['peak_estimate_bytes'] / MiB:,.0f}",
           f"{r['temp_bytes'] / MiB:,.0f}"]
  if "step_s" in r:
    mfu = f"{100 * r['mfu']:.1f}" if r["mfu"] is not None else "-"
    cells += [f"{r['step_s'] * 1e3:,.1f}", f"{r['tokens_per_s_per_device']:,.0f}",
              f"{r['tflops_per_device']:.4g}", mfu]
  return "| " + " | ".join(cells) + " |"


HEADER = ("| preset | L | T | mesh | remat | kernel | compile s | peak MiB/dev | temp MiB/dev |")
TIMED = " step ms | tokens/s/dev | TFLOP/s/dev | MFU % |"


def main(argv=None) -> list[dict[str, Any]]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="tiny", choices=sorted(presets.PRESETS))
  parser.add_argument("--seq-len", default="1024", help="comma-separated lengths")
  parser.add_argument("--mesh", default="data=-1", help="e.g. data=2,sequence=4,tensor=1")
  parser.add_argument("--remat", default="full",
                      choices=["none", "full", "dots", "dots_no_batch", "qkv_attention"])
  parser.add_argument("--kernel", default="auto",
                      help="auto | standin | a name of block_attention.KERNELS")
  parser.add_argument("--chunk-size", type=int, default=1024, help="the chunked kernel's tile")
  parser.add_argument("--microbatches", type=int, default=1)
  parser.add_argument("--strategy", default="ring", choices=["ring", "allgather"])
  parser.add_argument("--batch", type=int, default=0, help="global rows (0: one per data shard)")
  parser.add_argument("--layers", type=int, default=0, help="override the preset's layer count")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--abstract", action="store_true", help="compile and analyse only")
  parser.add_argument("--peak", type=float, default=0.0, help="peak TFLOP/s (default: by device)")
  parser.add_argument("--json", default="", help="write results here (default: print only)")
  args = parser.parse_args(argv)
  print(f"# {jax.devices()[0].platform} x{jax.device_count()} ({jax.devices()[0].device_kind}), "
        f"jax {jax.__version__}")
  print(HEADER + ("" if args.abstract else TIMED))
  print("|" + "---|" * ((HEADER + ("" if args.abstract else TIMED)).count("|") - 1))
  results = []
  for t in (int(x) for x in args.seq_len.split(",")):
    setup = Setup(preset=args.preset, seq_len=t, mesh=parse_mesh(args.mesh), remat=args.remat,
                  kernel=args.kernel, strategy=args.strategy, batch=args.batch,
                  num_layers=args.layers, chunk_size=args.chunk_size,
                  microbatches=args.microbatches)
    r = run(setup, steps=args.steps, warmup=args.warmup, abstract=args.abstract, peak=args.peak)
    results.append(r)
    print(format_row(r), flush=True)
  if args.json:
    write_json(args.json, results)
  return results


def write_json(path: str, results: list[dict]) -> None:
  """The benchmarks' JSON output (a list of result rows), creating the directory."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(results, f, indent=2)
  print(f"# wrote {path}")


if __name__ == "__main__":
  main()
