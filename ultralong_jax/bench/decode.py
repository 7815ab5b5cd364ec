"""Decoding speed: the on-device loop vs the per-token host loop vs transformers' `generate`.

  python -m ultralong_jax.bench.decode                          # batch 8, 64-token prompts, 96 new
  python -m ultralong_jax.bench.decode --threads 1 --repeats 9  # one thread each

One random Llama (`--layers`, `--hidden`, ...; float32) is built here and written with the
project's `save_pretrained`; transformers' `LlamaForCausalLM.from_pretrained` (PyTorch, CPU, its
default attention) loads it in a separate process, `benchmarks/hf_generate_baseline.py` of the
repository (the library never imports torch; `--baseline` points elsewhere). All three decode the
same weights from the same prompts (`--batch` random prompts of `--prompt` tokens), exactly
`--new-tokens` tokens per row, greedy, with no stop token, prefill included:
  device        `CachedModel.generate` (loop="device"): one jitted `lax.while_loop` for all tokens
  host          `CachedModel.generate(loop="host")`: one jitted step per token from Python
  transformers  `model.generate(do_sample=False)` in the baseline process
One warm-up call each (compiles), then `--repeats` rounds of one timed call of each decoder,
interleaved (the order rotates every round), so that load from other work on the machine falls on
all three alike. The table gives tokens/s of the median call (wall clock), the spread over the
repeats, the ratio to transformers, tokens per CPU-second (the timed process's threads: less
sensitive to other work, but threads that spin while waiting count) and how many rows' tokens
equal transformers' (float32 on both sides: they should all); the header gives the thread
settings and the load average before and after. Without torch/transformers the JAX rows are
timed alone and the reason is printed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
from flax import nnx

import ultralong_jax
from ultralong_jax.evaluation import generate as gen
from ultralong_jax.modeling.config import LlamaConfig
from ultralong_jax.modeling.llama import Llama

BASELINE = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "hf_generate_baseline.py"


class Baseline:
  """transformers' `generate` in a child process (benchmarks/hf_generate_baseline.py --serve):
  `start()` loads the model and makes its warm-up call, `timed()` returns the (wall, CPU) seconds
  of one call, `tokens()` the last call's new tokens [B, new_tokens]. `unavailable` holds the
  reason when it could not start (torch or transformers not installed, script not found)."""

  def __init__(self, script: pathlib.Path, hf_dir: str, prompts: np.ndarray, new_tokens: int,
               threads: int, tmp: str):
    self.unavailable, self.info, self.proc = None, {}, None
    if not script.is_file():
      self.unavailable = (f"{script} not found (it ships with the repository, not the package; "
                          f"pass --baseline PATH)")
      return
    prompts_file = os.path.join(tmp, "prompts.npy")
    np.save(prompts_file, prompts)
    self.proc = subprocess.Popen(
        [sys.executable, str(script), "--serve", "--model", hf_dir, "--prompts", prompts_file,
         "--new-tokens", str(new_tokens), "--threads", str(threads)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

  def start(self) -> None:
    if self.proc is None:
      return
    line = self.proc.stdout.readline()
    if not line:
      err = self.proc.stderr.read().strip()
      code = self.proc.wait()
      self.unavailable = (err.splitlines()[-1] if err else f"{BASELINE.name} exited with {code}")
      self.proc = None
      return
    self.info = json.loads(line)

  def _ask(self, command: str) -> dict:
    self.proc.stdin.write(command + "\n")
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"{BASELINE.name} stopped: {self.proc.stderr.read().strip()}")
    return json.loads(line)

  def timed(self) -> tuple[float, float]:
    out = self._ask("run")
    return out["wall"], out["cpu"]

  def tokens(self) -> np.ndarray:
    tokens = np.asarray(self._ask("tokens")["tokens"])
    self.proc.wait()
    return tokens


def _timed_here(fn) -> tuple[tuple[float, float], object]:
  """(wall, CPU) seconds of one call of fn() in this process (CPU: all its threads), result."""
  wall, cpu = time.perf_counter(), time.process_time()
  result = fn()
  return (time.perf_counter() - wall, time.process_time() - cpu), result


def _parse_args(argv) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--prompt", type=int, default=64, help="prompt tokens per row")
  parser.add_argument("--new-tokens", type=int, default=96)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--hidden", type=int, default=256, help="width D")
  parser.add_argument("--mlp", type=int, default=768, help="MLP width F")
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--kv-heads", type=int, default=2)
  parser.add_argument("--vocab", type=int, default=32000)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--threads", type=int, default=0,
                      help="CPU threads for XLA and torch alike (0: each library's default)")
  parser.add_argument("--baseline", default=str(BASELINE),
                      help="the transformers baseline script (benchmarks/hf_generate_baseline.py)")
  parser.add_argument("--json", default=None, help="also write the results here")
  args = parser.parse_args(argv)
  for name in ("batch", "prompt", "new_tokens", "repeats"):
    if getattr(args, name) < 1:
      parser.error(f"--{name.replace('_', '-')} must be >= 1")
  return args


NAMES = {"device": "ultralong_jax, device loop", "host": "ultralong_jax, host loop",
         "transformers": "transformers generate"}


def _measure(args: argparse.Namespace, model: Llama, prompts: np.ndarray):
  """Interleaved timed rounds of each decoder after one warm-up: ({name: [(wall, cpu)]},
  {name: tokens [B, new]}, the Baseline)."""
  new = args.new_tokens
  runner = gen.CachedModel(model)
  decoders = {loop: (lambda loop=loop: runner.generate(prompts.tolist(), max_new_tokens=new,
                                                       loop=loop))
              for loop in ("device", "host")}
  seconds = {name: [] for name in NAMES}
  tokens = {}
  with tempfile.TemporaryDirectory() as tmp:
    hf_dir = ultralong_jax.save_pretrained(model, os.path.join(tmp, "hf"))
    baseline = Baseline(pathlib.Path(args.baseline), hf_dir, prompts, new, args.threads, tmp)
    for fn in decoders.values():  # warm-up (compiles) while the baseline loads
      fn()
    baseline.start()
    if baseline.unavailable:
      print(f"bench.decode: no transformers baseline: {baseline.unavailable}", file=sys.stderr)
      del seconds["transformers"]
    order = list(seconds)
    for r in range(args.repeats):
      for name in order[r % len(order):] + order[:r % len(order)]:
        if name == "transformers":
          seconds[name].append(baseline.timed())
        else:
          timing, out = _timed_here(decoders[name])
          seconds[name].append(timing)
          assert all(len(row) == new for row in out), "no stop token: every row has new tokens"
          tokens[name] = np.asarray(out)
    if "transformers" in seconds:
      tokens["transformers"] = baseline.tokens()
  return seconds, tokens, baseline


def _rows(seconds: dict, tokens: dict, total: int) -> list[dict]:
  """One row per decoder: tokens/s (median wall), per CPU-second, and against transformers."""
  rows = []
  reference = statistics.median(w for w, _ in seconds.get("transformers", [(float("nan"), 0)]))
  for name, timings in seconds.items():
    wall = [w for w, _ in timings]
    cpu = [c for _, c in timings]
    row = {"name": name, "decoder": NAMES[name], "wall_seconds": wall, "cpu_seconds": cpu,
           "tokens_per_s": total / statistics.median(wall),
           "tokens_per_cpu_s": total / statistics.median(cpu)}
    if "transformers" in seconds:
      row["vs_transformers"] = reference / statistics.median(wall)
      row["rows_equal_transformers"] = int((tokens[name] == tokens["transformers"]).all(1).sum())
    rows.append(row)
  return rows


def _print_table(args: argparse.Namespace, rows: list[dict], loads: tuple[float, float],
                 baseline_info: dict | None) -> None:
  B, new, total = args.batch, args.new_tokens, args.batch * args.new_tokens
  xla_threads = (f"{args.threads} thread(s)" if args.threads
                 else f"default threads (intra-op pool over {os.cpu_count()} cores)")
  torch_info = (f"; {baseline_info['versions']} ({baseline_info['threads']} threads)"
                if baseline_info else "")
  print(f"# {datetime.date.today()}, {platform.machine()} CPU x{os.cpu_count()}, load average "
        f"{loads[0]:.1f} before / {loads[1]:.1f} after; jax {jax.__version__} "
        f"({jax.devices()[0].platform}, {xla_threads}){torch_info}")
  print(f"# batch {B}, {args.prompt}-token prompts, {new} new tokens (greedy, prefill included), "
        f"L={args.layers} D={args.hidden} F={args.mlp} N={args.heads} K={args.kv_heads} "
        f"V={args.vocab} float32; median of {args.repeats} interleaved rounds after 1 warm-up")
  print("| decoder | tokens/s | spread (min-max tokens/s) | vs transformers | tokens per CPU-second "
        "| rows equal to transformers |\n|---|---|---|---|---|---|")
  for row in rows:
    fastest, slowest = total / min(row["wall_seconds"]), total / max(row["wall_seconds"])
    ratio = f"{row['vs_transformers']:.2f}x" if "vs_transformers" in row else "n/a"
    equal = f"{row['rows_equal_transformers']}/{B}" if "vs_transformers" in row else "n/a"
    print(f"| {row['decoder']} | {row['tokens_per_s']:,.0f} | {slowest:,.0f}-{fastest:,.0f} | "
          f"{ratio} | {row['tokens_per_cpu_s']:,.0f} | {equal} |")


def main(argv=None) -> dict:
  args = _parse_args(argv)
  if args.threads:
    # Read when JAX starts its CPU backend, i.e. at the first computation below.
    os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_multi_thread_eigen="
                               f"{str(args.threads > 1).lower()} "
                               f"intra_op_parallelism_threads={args.threads}")
  load_before = os.getloadavg()[0]
  config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                       intermediate_size=args.mlp, num_layers=args.layers, num_heads=args.heads,
                       num_kv_heads=args.kv_heads, rope_theta=10000.0,
                       max_position_embeddings=max(2048, args.prompt + args.new_tokens),
                       bos_token_id=None, eos_token_id=None)
  model = Llama(config, rngs=nnx.Rngs(args.seed))
  prompts = np.random.default_rng(args.seed).integers(1, args.vocab, (args.batch, args.prompt))
  seconds, tokens, baseline = _measure(args, model, prompts)
  loads = (load_before, os.getloadavg()[0])
  rows = _rows(seconds, tokens, args.batch * args.new_tokens)
  _print_table(args, rows, loads, baseline.info)
  result = {"args": vars(args), "rows": rows, "load_average": list(loads),
            "baseline": baseline.info or {"unavailable": baseline.unavailable}}
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == "__main__":
  main()
