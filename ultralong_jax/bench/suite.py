"""One command for every accelerator claim of docs/performance.md, on whatever device is present.

  python -m ultralong_jax.bench.suite --out runs/suite            # one H100/H200 or TPU: <= 8 min
  python -m ultralong_jax.bench.suite --out /tmp/suite --smoke    # tiny shapes, CPU (the CI test)

Sections (each a child process of this one, under its share of `--budget-s`):
  kernels        one causal block of two rows of T tokens, forward + backward, per kernel that
                 runs on the platform (GPU: cudnn, cudnn_packed, chunked, xla; TPU: splash if
                 present, chunked, xla; CPU: their twins dpa_xla, dpa_xla_packed, chunked, xla), at
                 8K / 32K / 128K, Llama-3.2-1B's attention shape (N 32, K 8, H 64, bf16):
                 TFLOP/s of useful causal work (packed: 8 and 3 documents, their work only);
                 at the first length the fused kernels' gradients against the chunked kernel's.
                 The xla kernel materializes [N, T, T] scores: only T <= 8K.
  train_step     the Llama-3.2-1B step on one device (bench/train_step.py, kernel auto) at each
                 length: step time, tokens/s, MFU, memory_stats() peak next to XLA's plan and
                 the analytic estimate (training/memory.py). One process per length, so each
                 peak is its own.
  ring_overhead  n = 2, 4, 8 blocks + log-sum-exp merge vs one fused call at 128K
                 (bench/ring_overhead.py) with the platform's fused kernel.
  longest        the longest 1B sequence that trains on one device: the analytic estimate picks
                 the candidate under 90% of the device's bytes_limit, then real steps confirm
                 it, stepping by 32K up while they succeed (or down while they fail), within budget.

A section that fails or runs out of time is recorded with its error; the others still run, and
each child writes its rows as it goes, so a timed-out section keeps what it measured. Output:
DIR/suite.json (every row) and DIR/suite.md (tables in docs/performance.md's format, with date,
device, JAX version and this command). This parent process never imports JAX, so it holds no
accelerator memory while the children run. Everything imported is a runtime requirement
(requirements.txt); docs/performance.md says how to bring wheels to an offline machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import subprocess
import sys
import time

from ultralong_jax.bench import suite_report

K = 1024
SECTIONS = ("kernels", "train_step", "ring_overhead", "longest")
# Each section's share of the total budget (train_step's is split over its lengths by tokens).
SHARES = {"kernels": 0.27, "train_step": 0.4, "ring_overhead": 0.13, "longest": 0.2}
KERNELS = {"gpu": ("cudnn", "cudnn_packed", "chunked", "xla"),
           "tpu": ("splash", "chunked", "xla"),
           "cpu": ("dpa_xla", "dpa_xla_packed", "chunked", "xla")}
FUSED = {"gpu": "cudnn", "tpu": "splash", "cpu": "dpa_xla"}   # the ring's fused kernel


@dataclasses.dataclass(frozen=True)
class Plan:
  """Shapes and counts of one suite run."""
  lengths: tuple[int, ...] = (8 * K, 32 * K, 128 * K)
  heads: int = 32          # Llama-3.2-1B: N 32, K 8, H 64
  kv_heads: int = 8
  head_dim: int = 64
  documents: int = 8       # per row, for the packed kernels
  xla_max_length: int = 8 * K
  preset: str = "llama32_1b"
  layers: int = 0          # 0: the preset's
  remat: str = "full"
  steps: int = 3
  warmup: int = 1
  repeats: int = 3
  ring_length: int = 128 * K
  ring_blocks: tuple[int, ...] = (2, 4, 8)
  longest_step: int = 32 * K
  memory_limit: int = 0    # bytes; 0: the device's bytes_limit (none on CPU: section skipped)


SMOKE = Plan(lengths=(256,), heads=4, kv_heads=2, head_dim=16, documents=4, xla_max_length=256,
             preset="tiny", layers=2, steps=1, warmup=1, repeats=1, ring_length=256,
             ring_blocks=(2,), longest_step=256, memory_limit=48 * 2**20)


# --- the sections (run in child processes; they import JAX) -----------------------------------

class _Rows:
  """Rows of one section, rewritten to its JSON file after each one (kept if the child dies)."""

  def __init__(self, path: str):
    self.path, self.rows = path, []

  def add(self, row: dict) -> None:
    self.rows.append(row)
    with open(self.path, "w") as f:
      json.dump(self.rows, f, indent=1, default=str)


def _error(e: BaseException) -> str:
  return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


def _device():
  import jax  # pylint: disable=g-import-not-at-top
  d = jax.devices()[0]
  return {"platform": d.platform, "device_kind": d.device_kind, "jax": jax.__version__}


def _documents(t: int, documents: int):
  """Segment ids [2, T] of two packed rows: `documents` equal documents, and 3 unequal ones."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  position = jnp.arange(t)
  return jnp.stack([position * documents // t, position * 3 // t + 10]).astype(jnp.int32)


def run_kernels(plan: Plan, rows: _Rows, deadline: float) -> None:
  """Two rows of T tokens per call (packed kernels: 8 and 3 documents, so that the check below
  sees segments compacted across rows). At the first length a fused kernel's gradients, which
  depend on its output and log-sum-exp, are compared with the chunked kernel's: the on-device
  check of its layouts (bf16 rounding ~1e-2; a wrong layout is O(1))."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ultralong_jax.bench import attention, ring_overhead  # pylint: disable=g-import-not-at-top
  from ultralong_jax.parallel import block_attention  # pylint: disable=g-import-not-at-top
  platform = jax.devices()[0].platform
  scale = plan.head_dim ** -0.5
  grads = lambda kernel: jax.jit(functools.partial(_block_grads, kernel, scale))
  reference = grads(block_attention.KERNELS["chunked"])
  for name in (n for n in KERNELS[platform] if n in block_attention.KERNELS):
    kernel = block_attention.KERNELS[name]
    packed = kernel.segment_ids and name not in ("xla", "chunked")
    for t in plan.lengths:
      row = {"kernel": name, "seq_len": t, "batch": 2,
             "documents": f"{plan.documents}, 3" if packed else "1"}
      if name == "xla" and t > plan.xla_max_length:
        rows.add({**row, "skipped": f"materializes [N, T, T] scores (runs up to "
                                    f"{plan.xla_max_length})"})
        continue
      if time.time() > deadline:
        rows.add({**row, "skipped": "section budget spent"})
        continue
      try:
        x = ring_overhead.inputs(2, t, plan.kv_heads, plan.heads // plan.kv_heads, plan.head_dim,
                                 jnp.bfloat16)
        seg = _documents(t, plan.documents) if packed else None
        fn = grads(kernel)
        start = time.perf_counter()
        got = jax.block_until_ready(fn(*x, seg))
        compile_s = time.perf_counter() - start
        seconds = ring_overhead._median_seconds(lambda *a: fn(*a, seg), x, plan.repeats)  # pylint: disable=protected-access
        if t == plan.lengths[0] and name not in ("xla", "chunked"):   # CPU-tested references
          want = reference(*x, seg)
          row["rel_err_vs_chunked"] = max(
              float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) for a, b in zip(got, want))
        lengths = ([np.bincount(np.asarray(r)).tolist() for r in seg] if packed else [[t], [t]])
        useful = sum(attention._useful_flops(1, n, plan.heads, plan.head_dim)  # pylint: disable=protected-access
                     for row_lengths in lengths for n in row_lengths if n)
        rows.add({**row, "compile_and_first_s": compile_s, "seconds": seconds,
                  "tflops": useful / seconds / 1e12})
      except Exception as e:  # pylint: disable=broad-except
        rows.add({**row, "error": _error(e)})


def _block_grads(kernel, scale, q, k, v, dout, seg):
  """One causal block's forward and backward through `kernel`: (dq, dk, dv)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  out, lse = kernel.forward(q, k, v, seg, seg, causal=True, scale=scale)
  delta = jnp.einsum("BTKGH,BTKGH->BKGT", dout.astype(jnp.float32), out)
  return kernel.backward(q, k, v, seg, seg, out, lse, dout, delta, causal=True, scale=scale)


def _step_estimate(plan: Plan, t: int, platform: str) -> float:
  """training/memory.py's estimate (bytes per device) of the 1B step that `auto` runs."""
  from ultralong_jax.modeling import presets  # pylint: disable=g-import-not-at-top
  from ultralong_jax.training import memory  # pylint: disable=g-import-not-at-top
  overrides = {"num_layers": plan.layers} if plan.layers else {}
  config = presets.get_preset(plan.preset, remat_policy=plan.remat, **overrides)
  kernel = memory.kernel_class("auto", platform, False, t, 1)
  shape = memory.StepShape(model=config, mesh={"data": 1}, num_devices=1, seq_len=t,
                           global_batch=1, remat=plan.remat, kernel=kernel)
  return memory.estimate(shape)["total"]


def _train_step(plan: Plan, t: int, *, steps: int, warmup: int, abstract: bool = False) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from ultralong_jax.bench import train_step as bench  # pylint: disable=g-import-not-at-top
  setup = bench.Setup(preset=plan.preset, seq_len=t, mesh=(("data", 1),), remat=plan.remat,
                      kernel="auto", batch=1, num_layers=plan.layers)
  r = bench.run(setup, steps=steps, warmup=warmup, abstract=abstract, devices=jax.devices()[:1])
  r["estimate_bytes"] = _step_estimate(plan, t, jax.devices()[0].platform)
  return r


def run_train_step(plan: Plan, rows: _Rows, deadline: float, seq_len: int) -> None:
  del deadline  # one length per process: the parent's timeout is its budget
  rows.add({"seq_len": seq_len, **_train_step(plan, seq_len, steps=plan.steps,
                                              warmup=plan.warmup)})


def run_ring_overhead(plan: Plan, rows: _Rows, deadline: float) -> None:
  del deadline
  import jax  # pylint: disable=g-import-not-at-top
  from ultralong_jax.bench import ring_overhead  # pylint: disable=g-import-not-at-top
  from ultralong_jax.parallel import block_attention  # pylint: disable=g-import-not-at-top
  kernel = FUSED[jax.devices()[0].platform]
  kernel = kernel if kernel in block_attention.KERNELS else "chunked"
  result = ring_overhead.main([
      "--length", str(plan.ring_length), "--blocks", ",".join(map(str, plan.ring_blocks)),
      "--kernel", kernel, "--heads", str(plan.heads), "--kv-heads", str(plan.kv_heads),
      "--head-dim", str(plan.head_dim), "--dtype", "bfloat16", "--repeats", str(plan.repeats)])
  for r in result["rows"]:
    rows.add({"kernel": kernel, "seq_len": plan.ring_length, "fused_seconds":
              result["fused_seconds"], **r})


def run_longest(plan: Plan, rows: _Rows, deadline: float) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  platform = jax.devices()[0].platform
  limit = plan.memory_limit or (jax.devices()[0].memory_stats() or {}).get("bytes_limit", 0)
  if not limit:
    rows.add({"skipped": f"no device memory limit on {platform} (pass --memory-limit-gib)"})
    return
  step = plan.longest_step
  t = step
  while _step_estimate(plan, t + step, platform) <= 0.9 * limit:
    t += step
  rows.add({"candidate": t, "estimate_bytes": _step_estimate(plan, t, platform),
            "limit_bytes": limit})
  trains_at, fails_at = None, None
  while step <= t and time.time() < deadline:
    try:
      # A notional limit (--memory-limit-gib; CPU smoke): judged by XLA's plan of the compiled
      # step, since nothing would run out; otherwise a real step on the device is the judge.
      r = _train_step(plan, t, steps=1, warmup=0, abstract=bool(plan.memory_limit))
      if plan.memory_limit and r["peak_estimate_bytes"] > limit:
        raise MemoryError(f"XLA plan {r['peak_estimate_bytes']} B > limit {limit} B")
      rows.add({"seq_len": t, "trains": True, "step_s": r.get("step_s"),
                "memory_stats": r.get("memory_stats"),
                "peak_estimate_bytes": r["peak_estimate_bytes"]})
      trains_at = max(trains_at or 0, t)
    except Exception as e:  # pylint: disable=broad-except
      rows.add({"seq_len": t, "trains": False, "error": _error(e)})
      fails_at = min(fails_at or t, t)
    if trains_at is not None and fails_at is not None and fails_at - trains_at <= step:
      break
    t = t + step if trains_at == t else t - step
  rows.add({"longest_trained": trains_at, "first_failed": fails_at, "step": step})


RUNNERS = {"kernels": run_kernels, "train_step": run_train_step,
           "ring_overhead": run_ring_overhead, "longest": run_longest}


def _child(args) -> int:
  plan = SMOKE if args.smoke else Plan()
  if args.memory_limit_gib:
    plan = dataclasses.replace(plan, memory_limit=int(args.memory_limit_gib * 2**30))
  rows = _Rows(args.rows)
  rows.add({"device": _device()})
  extra = {"seq_len": args.seq_len} if args.section == "train_step" else {}
  RUNNERS[args.section](plan, rows, time.time() + args.budget_s, **extra)
  return 0


# --- the parent: budgets, children, the report -----------------------------------------------------

def _tasks(plan: Plan, budget: float) -> list[tuple[str, dict, float]]:
  tasks = [("kernels", {}, SHARES["kernels"] * budget)]
  total = sum(plan.lengths)
  tasks += [("train_step", {"seq_len": t},
             SHARES["train_step"] * budget * (0.5 / len(plan.lengths) + 0.5 * t / total))
            for t in plan.lengths]
  tasks += [("ring_overhead", {}, SHARES["ring_overhead"] * budget),
            ("longest", {}, SHARES["longest"] * budget)]
  return tasks


def _run_task(section: str, extra: dict, budget: float, out: str, flags: list[str]) -> dict:
  """Runs one section in a child process (`flags`: --smoke etc.), killed after `budget` s."""
  name = section + "".join(f"_{v}" for v in extra.values())
  rows_path = os.path.join(out, f"{name}.json")
  cmd = [sys.executable, "-m", "ultralong_jax.bench.suite", "--section", section,
         "--rows", rows_path, "--budget-s", f"{budget:.0f}", *flags]
  cmd += ["--seq-len", str(extra["seq_len"])] if "seq_len" in extra else []
  # The child imports this same package, wherever the parent found it.
  package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      p for p in (package_root, os.environ.get("PYTHONPATH")) if p))
  start = time.time()
  status, log = "ok", ""
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                          timeout=max(budget, 0.1))
    log = proc.stdout + proc.stderr
    if proc.returncode:
      status = f"failed (exit {proc.returncode})"
  except subprocess.TimeoutExpired as e:
    status = f"timed out after {budget:.0f} s"
    log = "".join(x.decode() if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr))
  rows = []
  if os.path.exists(rows_path):
    with open(rows_path) as f:
      rows = json.load(f)
  with open(os.path.join(out, f"{name}.log"), "w") as f:
    f.write(log)
  last = [line for line in log.strip().splitlines() if line.strip()][-1:] if status != "ok" else []
  return {"section": section, "name": name, "status": status, "budget_s": budget,
          "seconds": time.time() - start, "error": last[0][:300] if last else None,
          "device": rows[0]["device"] if rows and "device" in rows[0] else None,
          "rows": [r for r in rows if "device" not in r]}


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", help="directory for suite.json, suite.md and per-section logs")
  parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU, CI)")
  parser.add_argument("--budget-s", type=float, default=480.0,
                      help="total seconds (a section: its share of it)")
  parser.add_argument("--sections", default=",".join(SECTIONS))
  parser.add_argument("--memory-limit-gib", type=float, default=0.0,
                      help="device memory for `longest` (default: the device's bytes_limit)")
  parser.add_argument("--section", help=argparse.SUPPRESS)   # child process: run one section
  parser.add_argument("--rows", help=argparse.SUPPRESS)
  parser.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.section:
    sys.exit(_child(args))
  if not args.out:
    parser.error("--out DIR is required")
  wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
  unknown = sorted(set(wanted) - set(SECTIONS))
  if unknown:
    parser.error(f"--sections: unknown {unknown}; choose from {','.join(SECTIONS)}")
  os.makedirs(args.out, exist_ok=True)
  plan = SMOKE if args.smoke else Plan()
  command = "python -m ultralong_jax.bench.suite " + " ".join(argv if argv is not None
                                                              else sys.argv[1:])
  end = time.time() + args.budget_s
  flags = ["--smoke"] if args.smoke else []
  flags += ["--memory-limit-gib", str(args.memory_limit_gib)] if args.memory_limit_gib else []
  results = []
  for section, extra, budget in _tasks(plan, args.budget_s):
    if section not in wanted:
      continue
    budget = min(budget, end - time.time())
    if budget < 1:
      results.append({"section": section, "name": section, "status": "skipped: suite budget "
                      "spent", "seconds": 0.0, "error": None, "device": None, "rows": []})
      continue
    r = _run_task(section, extra, budget, args.out, flags)
    results.append(r)
    print(f"# {r['name']}: {r['status']} in {r['seconds']:.0f} s ({len(r['rows'])} rows)",
          flush=True)
  with open(os.path.join(args.out, "suite.json"), "w") as f:
    json.dump({"command": command, "results": results}, f, indent=1, default=str)
  text = suite_report.markdown(results, command)
  with open(os.path.join(args.out, "suite.md"), "w") as f:
    f.write(text)
  print(text)
  return results


if __name__ == "__main__":
  main()
