"""Per-device memory of the real train step at 128K-4M tokens, from XLA's compiled analysis (CPU).

  python -m ultralong_jax.bench.memory                       # the planned meshes, 128 CPU devices
  python -m ultralong_jax.bench.memory --only 8b --lengths 1048576 --json runs/bench/memory.json

Every row compiles the full sharded training step (training/compile_plan.py: AdamW state, donated,
ring attention over `sequence`, heads over `tensor`) for abstract arrays on simulated CPU devices:
nothing is allocated, so the 8B model at 4M tokens on TP8 x CP16 = 128 devices compiles on a
laptop. The numbers are XLA's plan for one device.

Two attention kernels per row, because the CPU compile cannot use the GPU's:
  xla      the CPU reference kernel: it materializes [B, K, G, c, c] float32 scores per ring
           block (c = T / 2n tokens), so its memory grows as T^2 / n^2 and dominates at long T.
  standin  a memory stand-in for a flash kernel (cuDNN on H100): same inputs, outputs and
           residuals (out, lse) with O(c) work and no score matrix, i.e. the memory of everything
           except the flash kernel's own O(c) workspace. Its FLOPs and outputs mean nothing; it
           exists only so the memory plan of the rest of the step can be read on CPU.
Each row also prints training/memory.py's analytic estimate of the same step (what
`python -m ultralong_jax.estimate_memory` reports) and its distance from XLA's plan.
Per-device memory does not depend on the data axis (each replica holds the same shards), so rows
use data=1, one row of T tokens per replica (the paper's global batch 2 = two replicas).
"""

from __future__ import annotations

import sys

from ultralong_jax.parallel import host_devices

_DEVICES = 128
host_devices.simulate(_DEVICES, keep_count=True)  # before JAX initializes

import argparse  # noqa: E402
import math  # noqa: E402

import jax  # noqa: E402

from ultralong_jax.bench import train_step as bench  # noqa: E402
from ultralong_jax.training import memory  # noqa: E402
from ultralong_jax.training import compile_plan  # noqa: E402
from ultralong_jax.training.compile_plan import STANDIN  # noqa: E402

GiB = 2**30

# (model, preset, T, mesh): the configs' meshes (configs/llama31_8b_stage1.py:{1m,2m,4m}: TP8 x
# CP4/8/16; configs/llama32_1b_stage1_1m.py: CP8), each also at the lengths around it.
K = 1024
PLAN = (
    # One device (one H100): what the longest trainable 1B sequence would be, per XLA's plan.
    [("1b", "llama32_1b_1m", t, (("sequence", 1),)) for t in (8 * K, 32 * K, 128 * K, 256 * K)] +
    [("1b", "llama32_1b_1m", t, (("sequence", 8),)) for t in (128 * K, 512 * K, 1024 * K,
                                                              2048 * K, 4096 * K)] +
    [("8b", "llama31_8b_1m", 128 * K, (("sequence", 4), ("tensor", 8))),
     ("8b", "llama31_8b_1m", 1024 * K, (("sequence", 4), ("tensor", 8))),
     ("8b", "llama31_8b_2m", 2048 * K, (("sequence", 8), ("tensor", 8))),
     ("8b", "llama31_8b_4m", 4096 * K, (("sequence", 16), ("tensor", 8)))])


# Small models that compile in seconds yet make every part of the estimate matter: "small" D 512,
# F 3 D, GQA 8/4; "mid" D 1024, F 3.5 D, GQA 16/4; "wide" F = 8 D; "vocab" V = 64 D.
SHAPES = {
    "small": dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_layers=4,
                  num_heads=8, num_kv_heads=4, head_dim=64),
    "mid": dict(vocab_size=16384, hidden_size=1024, intermediate_size=3584, num_layers=4,
                num_heads=16, num_kv_heads=4, head_dim=64),
    "wide": dict(vocab_size=4096, hidden_size=256, intermediate_size=2048, num_layers=4,
                 num_heads=4, num_kv_heads=2, head_dim=64),
    "vocab": dict(vocab_size=32768, hidden_size=512, intermediate_size=1024, num_layers=2,
                  num_heads=8, num_kv_heads=4, head_dim=64),
}


def shape_config(name: str, **overrides):
  return bench.presets.tiny(**{**SHAPES[name], "max_position_embeddings": 65536, **overrides})


# (shape, T, mesh, options): compile_plan.Setup fields; kernel "auto" with sequence 1 is the
# model's plain attention, "standin" a flash kernel's memory (see above).
BASE_OPTIONS = dict(kernel=STANDIN, loss_chunk=1024)
PLAIN = dict(BASE_OPTIONS, chunk_size=8192)
CALIBRATION = [
    ("small", 8192, {"sequence": 1}, dict(BASE_OPTIONS, num_layers=2, loss_chunk=4096)),
    ("small", 8192, {"sequence": 1}, dict(BASE_OPTIONS, num_layers=8, loss_chunk=4096)),
    ("small", 8192, {"sequence": 1}, BASE_OPTIONS),
    ("small", 16384, {"sequence": 1}, BASE_OPTIONS),
    ("small", 16384, {"sequence": 1}, dict(BASE_OPTIONS, num_layers=8)),
    ("small", 8192, {"sequence": 1}, dict(BASE_OPTIONS, batch=2)),
    ("small", 8192, {"sequence": 1}, dict(BASE_OPTIONS, remat="dots")),
    ("small", 8192, {"sequence": 1}, dict(BASE_OPTIONS, remat="none")),
    ("small", 8192, {"sequence": 1}, dict(BASE_OPTIONS, kernel="xla")),
    ("small", 4096, {"sequence": 1}, dict(BASE_OPTIONS, kernel="xla")),
    ("small", 16384, {"sequence": 8}, BASE_OPTIONS),
    ("small", 16384, {"sequence": 8}, dict(BASE_OPTIONS, kernel="xla")),
    ("small", 16384, {"sequence": 4, "tensor": 2}, BASE_OPTIONS),
    ("small", 16384, {"sequence": 2, "tensor": 4}, BASE_OPTIONS),
    ("small", 16384, {"sequence": 4, "fsdp": 2}, dict(BASE_OPTIONS, batch=2)),
    ("small", 16384, {"sequence": 4, "data": 2}, dict(BASE_OPTIONS, batch=2)),
    ("mid", 16384, {"sequence": 4, "tensor": 2}, BASE_OPTIONS),
    ("mid", 16384, {"sequence": 4, "tensor": 2}, dict(BASE_OPTIONS, kernel="xla")),
    ("wide", 16384, {"sequence": 1}, BASE_OPTIONS),
    ("wide", 16384, {"sequence": 1}, dict(BASE_OPTIONS, num_layers=8)),
    ("wide", 32768, {"sequence": 8}, BASE_OPTIONS),
    ("wide", 32768, {"sequence": 4, "tensor": 2}, BASE_OPTIONS),
    ("wide", 32768, {"sequence": 4, "tensor": 2}, dict(BASE_OPTIONS, kernel="xla")),
    ("vocab", 8192, {"sequence": 1}, dict(BASE_OPTIONS, loss_chunk=4096)),
    ("vocab", 8192, {"sequence": 1}, BASE_OPTIONS),
    ("vocab", 16384, {"sequence": 2, "tensor": 4}, dict(BASE_OPTIONS, loss_chunk=4096)),
    ("mid", 8192, {"sequence": 1}, BASE_OPTIONS),
    ("mid", 32768, {"sequence": 8}, dict(BASE_OPTIONS, loss_chunk=2048)),
    ("mid", 32768, {"sequence": 2, "tensor": 4}, dict(BASE_OPTIONS, loss_chunk=2048)),
    ("mid", 16384, {"sequence": 2, "fsdp": 4}, dict(BASE_OPTIONS, batch=4, loss_chunk=2048)),
    ("mid", 8192, {"fsdp": 8}, dict(BASE_OPTIONS, batch=8, loss_chunk=2048)),
    ("mid", 8192, {"sequence": 1}, dict(BASE_OPTIONS, remat="dots")),
    ("mid", 16384, {"sequence": 4, "tensor": 2}, dict(BASE_OPTIONS, remat="dots")),
    ("wide", 16384, {"sequence": 1}, dict(BASE_OPTIONS, remat="dots")),
    ("wide", 16384, {"sequence": 1}, dict(BASE_OPTIONS, remat="none")),
    ("mid", 8192, {"sequence": 1}, dict(BASE_OPTIONS, remat="none")),
    ("small", 8192, {"sequence": 2, "data": 4}, dict(BASE_OPTIONS, batch=8, microbatches=2)),
    ("small", 8192, {"sequence": 1}, dict(BASE_OPTIONS, batch=2, microbatches=2)),
    ("small", 8192, {"sequence": 1}, dict(BASE_OPTIONS, remat="qkv_attention")),
    ("small", 16384, {"sequence": 4, "tensor": 2}, dict(BASE_OPTIONS, remat="dots")),
    ("wide", 16384, {"sequence": 2, "tensor": 2, "fsdp": 2},
     dict(BASE_OPTIONS, kernel="xla", batch=2, loss_chunk=2048, remat="dots")),
    # auto with one sequence shard and T <= chunk_size: the plain attention.
    ("small", 4096, {"sequence": 1}, dict(PLAIN, kernel="auto")),
    ("small", 4096, {"sequence": 1}, dict(PLAIN, kernel="auto", remat="dots")),
    ("small", 4096, {"sequence": 1}, dict(PLAIN, kernel="auto", remat="dots_no_batch")),
    ("small", 4096, {"fsdp": 2, "tensor": 4}, dict(PLAIN, kernel="auto", batch=4,
                                                   remat="dots_no_batch")),
    ("wide", 16384, {"sequence": 2, "tensor": 2, "fsdp": 2},
     dict(BASE_OPTIONS, kernel="xla", batch=2, loss_chunk=2048, remat="dots_no_batch")),
    ("small", 16384, {"sequence": 8}, dict(BASE_OPTIONS, kernel="xla", remat="dots")),
    ("small", 16384, {"sequence": 8}, dict(BASE_OPTIONS, kernel="chunked", chunk_size=256)),
    ("small", 8192, {"sequence": 1}, dict(BASE_OPTIONS, kernel="chunked", chunk_size=512)),
    ("wide", 32768, {"sequence": 4, "tensor": 2}, dict(BASE_OPTIONS, kernel="chunked",
                                                        chunk_size=512)),
    ("mid", 32768, {"sequence": 4, "tensor": 2}, dict(BASE_OPTIONS, kernel="chunked",
                                                       chunk_size=1024)),
    ("small", 16384, {"sequence": 4, "data": 2}, dict(BASE_OPTIONS, kernel="chunked", batch=2,
                                                       remat="dots", chunk_size=512)),
    # auto with one sequence shard and T > chunk_size: a one-block ring with the chunked kernel.
    ("small", 8192, {"sequence": 1}, dict(BASE_OPTIONS, kernel="auto", chunk_size=512)),
    ("small", 8192, {"data": 2, "tensor": 4}, dict(BASE_OPTIONS, kernel="auto", batch=2,
                                                   chunk_size=1024, remat="dots_no_batch")),
    ("small", 8192, {"sequence": 1}, dict(BASE_OPTIONS, kernel="auto", chunk_size=512,
                                          remat="dots")),
    ("small", 16384, {"sequence": 2}, dict(BASE_OPTIONS, kernel="chunked", chunk_size=512,
                                           remat="dots")),
]


def calibration_case(name: str, seq_len: int, mesh: dict, options: dict):
  """(bench Setup, memory.StepShape) of one calibration row."""
  options = dict(options)
  layers = options.pop("num_layers", 0)
  remat = options.get("remat", "full")
  config = shape_config(name, remat_policy=remat, **({"num_layers": layers} if layers else {}))
  setup = bench.Setup(model=config, seq_len=seq_len, mesh=tuple(mesh.items()),
                      **{"batch": 1, **options})
  return setup, step_shape(setup, config)


def calibration(rows=None) -> list[dict]:
  """Compiles every CALIBRATION row; prints XLA's peak next to the estimate."""
  print("| model | T | mesh | kernel | remat | batch x microbatches | loss chunk | XLA peak MiB "
        "| estimate MiB | error |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  results = []
  for name, t, mesh, options in rows or CALIBRATION:
    setup, shape = calibration_case(name, t, mesh, options)
    r = bench.run(setup, abstract=True)
    est = memory.estimate(shape)["total"]
    r.update(model=name, estimate_bytes=est, error=est / r["peak_estimate_bytes"] - 1)
    results.append(r)
    layers = f" L{shape.model.num_layers}" if shape.model.num_layers != 4 else ""
    print(f"| {name}{layers} | {t:,} | {_mesh_label(tuple(mesh.items()))} | {setup.kernel} | "
          f"{setup.remat} | {setup.batch} x {setup.microbatches} | {setup.loss_chunk} | "
          f"{r['peak_estimate_bytes'] / 2**20:,.0f} | {est / 2**20:,.0f} | {r['error']:+.1%} |",
          flush=True)
  worst = max(abs(r["error"]) for r in results)
  print(f"\nworst |error| {worst:.1%} over {len(results)} compiles")
  return results


def measure(model: str, preset: str, seq_len: int, mesh, kernel: str, *, num_layers: int = 0,
            remat: str = "full") -> dict:
  """One abstract compile -> the bench.train_step result dict plus the row's labels."""
  setup = bench.Setup(preset=preset, seq_len=seq_len, mesh=mesh, remat=remat, kernel=kernel,
                      batch=1, num_layers=num_layers)
  r = bench.run(setup, abstract=True)
  r["model"] = model
  r["estimate_bytes"] = estimate(setup)["total"]
  return r


def estimate(setup: "bench.Setup") -> dict[str, float]:
  """training/memory.py's analytic estimate of the same step (no compile)."""
  overrides = {"num_layers": setup.num_layers} if setup.num_layers else {}
  config = bench.presets.get_preset(setup.preset, remat_policy=setup.remat, **overrides)
  return memory.estimate(step_shape(setup, config))


def step_shape(setup: "bench.Setup", config) -> "memory.StepShape":
  """The memory.StepShape of a benchmark Setup (the standin is a flash kernel's memory; auto is
  what make_attention_fn picks on CPU)."""
  sizes = dict(setup.mesh)
  if setup.kernel == "auto":
    kernel = memory.kernel_class("auto", "cpu", False, setup.seq_len, sizes.get("sequence", 1),
                                 chunk=setup.chunk_size)
  else:  # an explicit kernel runs as a ring even with one sequence shard (compile_plan.build)
    kernel = compile_plan.block_kernel(setup.kernel, setup.chunk_size).memory
  return memory.StepShape(
      model=config, mesh=sizes, num_devices=math.prod(sizes.values()), seq_len=setup.seq_len,
      global_batch=setup.batch or 1, microbatches=setup.microbatches, remat=setup.remat,
      kernel=kernel, loss_chunk=setup.loss_chunk, kernel_chunk=setup.chunk_size)


def _mesh_label(mesh) -> str:
  return memory.mesh_label(dict(mesh), sep=" x ")


def _row(r: dict) -> str:
  s = r["setup"]
  mesh = _mesh_label(s["mesh"])
  state = r["argument_bytes"] / GiB
  return (f"| {r['model']} | {s['seq_len'] // K:,}K | {mesh} | {s['kernel']} | {r['num_layers']} | "
          f"{state:.1f} | {r['temp_bytes'] / GiB:.1f} | {r['peak_estimate_bytes'] / GiB:.1f} | "
          f"{r['estimate_bytes'] / GiB:.1f} ({r['estimate_bytes'] / r['peak_estimate_bytes'] - 1:+.0%}) | "
          f"{r['compile_s']:.0f} |")


HEADER = ("| model | T | mesh | kernel | L | args GiB/dev | temp GiB/dev | peak GiB/dev | "
          "estimate GiB/dev (vs peak) | compile s |")


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--only", default="", help="1b or 8b (default both)")
  parser.add_argument("--lengths", default="", help="comma-separated T to keep (default all)")
  parser.add_argument("--kernels", default=f"{STANDIN},xla")
  parser.add_argument("--layers", type=int, default=0, help="override layer count (0: preset's)")
  parser.add_argument("--json", default="")
  parser.add_argument("--calibration", action="store_true",
                      help="compile the small calibration grid on 8 devices instead: XLA's plan "
                      "vs training/memory.py's estimate")
  args = parser.parse_args(argv)
  if args.calibration:
    results = calibration()
    if args.json:
      bench.write_json(args.json, results)
    return results
  keep = {int(t) for t in args.lengths.split(",") if t}
  plan = [p for p in PLAN if (not args.only or p[0] == args.only) and (not keep or p[2] in keep)]
  need = max(math.prod(s for _, s in m) for *_, m in plan)
  if need > jax.device_count():
    sys.exit(f"needs {need} devices; set XLA_FLAGS=--xla_force_host_platform_device_count={need}")
  print(f"# {jax.devices()[0].platform} x{jax.device_count()}, jax {jax.__version__}, "
        "full remat, bf16 compute / fp32 params + AdamW, one row per replica")
  print(HEADER)
  print("|" + "---|" * (HEADER.count("|") - 1))
  results = []
  for model, preset, t, mesh in plan:
    for kernel in args.kernels.split(","):
      if kernel == "xla" and _score_elements(preset, t, mesh) > 2**31:
        # XLA's CPU compiler died (SIGFPE) on 2^36-element score blocks; skip above 2^31, where
        # the reference kernel's memory is meaningless for a GPU anyway (hence the stand-in).
        print(f"| {model} | {t // K:,}K | {_mesh_label(mesh)} | xla | skipped: score block "
              "> 2^31 elements |")
        continue
      r = measure(model, preset, t, mesh, kernel, num_layers=args.layers)
      results.append(r)
      print(_row(r), flush=True)
  if args.json:
    bench.write_json(args.json, results)
  return results


def _score_elements(preset: str, seq_len: int, mesh) -> int:
  """Elements of one [B=1, N/tp, c, c] ring score block: c = T / (2 n) (zigzag chunk), or T on
  one device (bench.train_step runs a one-block ring there in the contiguous layout)."""
  sizes = dict(mesh)
  heads = bench.presets.get_preset(preset).num_heads // sizes.get("tensor", 1)
  n = sizes.get("sequence", 1)
  c = seq_len // (2 * n) if n > 1 else seq_len
  return heads * c * c


if __name__ == "__main__":
  main()
