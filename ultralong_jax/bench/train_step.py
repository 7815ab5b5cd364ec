"""Train-step benchmark: compile time, step time, tokens/s, TFLOP/s, MFU and memory per device.

  python -m ultralong_jax.bench.train_step --preset tiny --seq-len 1024 --mesh sequence=4,data=2
  python -m ultralong_jax.bench.train_step --preset llama32_1b --seq-len 8192 --kernel cudnn \
      --remat dots --mesh data=1 --steps 10                  # one H100
  python -m ultralong_jax.bench.train_step --preset llama31_8b_1m --seq-len 1048576 \
      --mesh sequence=4,tensor=8 --remat full --batch 1 --abstract   # compile only (32 devices)

The step and its abstract compile come from training/compile_plan.py (the same step the memory
estimate's --xla reads): sharded params + AdamW state, donated, explicit shardings; ring attention
over `sequence` when that axis is > 1; XLA's per-device memory and cost analysis. Unless
--abstract, it then allocates random weights and a random batch and times `--steps` synchronized
steps after `--warmup` steps; the median is reported.

--kernel: auto (block_attention.select_kernel: cuDNN on GPU, else chunked for blocks longer than
--chunk-size, else xla), any name of block_attention.KERNELS, or standin: compile_plan's memory
stand-in for a flash kernel, for reading XLA's memory plan on CPU. Its FLOPs and outputs mean
nothing; never time it. An explicit kernel is used even with sequence=1 (a one-block ring),
since the model's plain attention path has no flash kernel.

FLOPs are the model's (training.metrics.train_flops_per_token: 6 per matmul parameter per token
plus causal attention, no remat recomputation), so MFU = model TFLOP/s / device peak (H100 989
dense bf16); XLA's own count (which includes recomputation) is reported next to it.
"""

from __future__ import annotations

import os

from ultralong_jax.parallel import host_devices

host_devices.simulate(8, keep_count=True)  # before JAX initializes; GPU/TPU backends ignore it

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from ultralong_jax.modeling import presets  # noqa: E402
from ultralong_jax.parallel import chunked_attention  # noqa: E402
from ultralong_jax.training import metrics, train_step  # noqa: E402
from ultralong_jax.training.compile_plan import (  # noqa: E402  (the step, as training builds it)
    STANDIN, Setup, analyse, build, compile_abstract)

__all__ = ["STANDIN", "Setup", "analyse", "build", "compile_abstract", "run", "main"]

MiB = 2**20


def parse_mesh(text: str) -> tuple[tuple[str, int], ...]:
  """"data=2,sequence=4" -> (("data", 2), ("sequence", 4))."""
  pairs = [p.split("=") for p in text.split(",") if p]
  return tuple((k.strip(), int(v)) for k, v in pairs)


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


def _random_inputs(built: train_step.TrainStep, seed: int = 0):
  """Random weights (created sharded inside a jit) and a random token batch."""
  state = built.init_state(built.random_params(seed))
  key = jax.random.key(seed)
  batch = {}
  for name, a in built.abstract_batch().items():
    if name in ("inputs", "targets"):
      x = jax.random.randint(jax.random.fold_in(key, len(batch)), a.shape, 0,
                             built.model_config.vocab_size)
    elif name == "positions":
      x = jnp.broadcast_to(jnp.arange(a.shape[1], dtype=jnp.int32), a.shape)
    else:  # segment_ids, loss_mask
      x = jnp.ones(a.shape, jnp.int32)
    batch[name] = jax.device_put(x.astype(jnp.int32), a.sharding)
  return state, batch


def time_steps(built: train_step.TrainStep, compiled, steps: int, warmup: int) -> list[float]:
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
  tokens = built.batch_size * setup.seq_len
  flops_per_token = metrics.train_flops_per_token(built.model_config, setup.seq_len)
  device = built.mesh.devices.flat[0]
  result = {
      "setup": dataclasses.asdict(setup), "mesh_shape": dict(built.mesh.shape),
      "devices": n_dev, "device_kind": device.device_kind, "platform": device.platform,
      "jax": jax.__version__, "num_layers": built.model_config.num_layers,
      "params": built.model_config.num_params, "global_batch": built.batch_size,
      "tokens_per_step": tokens,
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
  parser.add_argument("--chunk-size", type=int, default=chunked_attention.CHUNK_SIZE,
                      help="the chunked kernel's tile")
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
