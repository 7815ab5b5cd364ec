"""Decoding speed: the on-device loop vs the per-token host loop vs transformers' `generate`.

  python -m ultralong_jax.bench.decode                       # batch 8, 64-token prompts, 96 new
  python -m ultralong_jax.bench.decode --threads 1 --repeats 9  # one thread each: steadier

One random Llama (`--layers`, `--hidden`, ...; float32) is built here, written with the project's
`save_pretrained` and loaded by transformers' `LlamaForCausalLM.from_pretrained` (PyTorch, CPU,
its default attention), so all three decode the same weights from the same prompts (`--batch`
random prompts of `--prompt` tokens). Each decodes exactly `--new-tokens` tokens per row, greedy,
with no stop token (transformers: `eos_token_id=None`), prefill included in the time:
  device        `CachedModel.generate` (loop="device"): one jitted `lax.while_loop` for all tokens
  host          `CachedModel.generate(loop="host")`: one jitted step per token from Python
  transformers  `model.generate(do_sample=False)` on the CPU (torch, a test-only dependency)
One warm-up call each (compiles), then `--repeats` timed calls; the table gives tokens/s of the
median call (wall clock), the spread over the repeats, the ratio to transformers, tokens per
CPU-second of this process (all threads: less sensitive to other work on the machine, but it counts
threads that spin while waiting), and how many rows' tokens equal transformers' (float32 on both
sides: they should all).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time

import jax
import numpy as np
from flax import nnx

import ultralong_jax
from ultralong_jax.evaluation import generate as gen
from ultralong_jax.modeling.config import LlamaConfig
from ultralong_jax.modeling.llama import Llama


def _timed(fn, repeats: int) -> tuple[list[tuple[float, float]], object]:
  """(wall, CPU) seconds of `repeats` calls of fn() after one warm-up call, and the last call's
  result. CPU seconds count every thread of this process."""
  result = fn()
  seconds = []
  for _ in range(repeats):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    seconds.append((time.perf_counter() - wall, time.process_time() - cpu))
  return seconds, result


def time_transformers(hf_dir: str, prompts: np.ndarray, new_tokens: int, repeats: int,
                      threads: int = 0) -> tuple[list[tuple[float, float]], np.ndarray, str]:
  """transformers' greedy `generate` of exactly `new_tokens` per row from prompts [B,P] on
  `threads` CPU threads (0: torch's default): ((wall, CPU) seconds per call, new tokens
  [B, new_tokens], versions)."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise SystemExit(f"bench.decode: the transformers baseline needs torch and transformers "
                     f"(pip install -r requirements-test.txt): {e}") from e
  if threads:
    torch.set_num_threads(threads)
  model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
  ids = torch.as_tensor(prompts, dtype=torch.long)

  def run():
    with torch.no_grad():
      return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                            max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                            eos_token_id=None, pad_token_id=0)

  seconds, out = _timed(run, repeats)
  versions = (f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
              f"transformers {transformers.__version__}")
  return seconds, out[:, prompts.shape[1]:].numpy(), versions


def main(argv=None) -> dict:
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
                      help="CPU threads for XLA and torch alike (0: each library's default); "
                           "1 gives steadier figures on a machine shared with other work")
  parser.add_argument("--json", default=None, help="also write the results here")
  args = parser.parse_args(argv)
  for name in ("batch", "prompt", "new_tokens", "repeats"):
    if getattr(args, name) < 1:
      parser.error(f"--{name.replace('_', '-')} must be >= 1")
  if args.threads:
    # Read when JAX starts its CPU backend, i.e. at the first computation below.
    os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_multi_thread_eigen="
                               f"{str(args.threads > 1).lower()} "
                               f"intra_op_parallelism_threads={args.threads}")
  config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                       intermediate_size=args.mlp, num_layers=args.layers, num_heads=args.heads,
                       num_kv_heads=args.kv_heads, rope_theta=10000.0,
                       max_position_embeddings=max(2048, args.prompt + args.new_tokens),
                       bos_token_id=None, eos_token_id=None)
  model = Llama(config, rngs=nnx.Rngs(args.seed))
  prompts = np.random.default_rng(args.seed).integers(1, args.vocab, (args.batch, args.prompt))
  B, new = args.batch, args.new_tokens

  runner = gen.CachedModel(model)
  rows, tokens = [], {}

  def add(name, decoder, seconds):
    rows.append({"name": name, "decoder": decoder, "wall_seconds": [w for w, _ in seconds],
                 "cpu_seconds": [c for _, c in seconds]})

  for loop in ("device", "host"):
    seconds, out = _timed(lambda loop=loop: runner.generate(prompts.tolist(), max_new_tokens=new,
                                                            loop=loop), args.repeats)
    assert all(len(r) == new for r in out), "no stop token: every row has new_tokens tokens"
    tokens[loop] = np.asarray(out)
    add(loop, f"ultralong_jax, {loop} loop", seconds)
  with tempfile.TemporaryDirectory() as tmp:
    hf_dir = ultralong_jax.save_pretrained(model, os.path.join(tmp, "hf"))
    seconds, tokens["transformers"], versions = time_transformers(hf_dir, prompts, new,
                                                                  args.repeats, args.threads)
  add("transformers", "transformers generate", seconds)

  total = B * new
  for row in rows:
    row["tokens_per_s"] = total / statistics.median(row["wall_seconds"])
    row["tokens_per_cpu_s"] = total / statistics.median(row["cpu_seconds"])
    row["vs_transformers"] = row["tokens_per_s"] * statistics.median(rows[-1]["wall_seconds"]) / total
    row["rows_equal_transformers"] = int(
        (tokens[row["name"]] == tokens["transformers"]).all(1).sum())
  threads = f"{args.threads} thread(s)" if args.threads else "default threads"
  print(f"# {datetime.date.today()}, {platform.machine()} CPU x{os.cpu_count()} (load average "
        f"{os.getloadavg()[0]:.1f}), jax {jax.__version__} ({jax.devices()[0].platform}, {threads}), "
        f"{versions}")
  print(f"# batch {B}, {args.prompt}-token prompts, {new} new tokens (greedy, prefill included), "
        f"L={args.layers} D={args.hidden} F={args.mlp} N={args.heads} K={args.kv_heads} "
        f"V={args.vocab} float32; median of {args.repeats} after 1 warm-up")
  print("| decoder | tokens/s | spread (min-max tokens/s) | vs transformers | tokens per CPU-second "
        "| rows equal to transformers |\n|---|---|---|---|---|---|")
  for row in rows:
    fastest, slowest = total / min(row["wall_seconds"]), total / max(row["wall_seconds"])
    print(f"| {row['decoder']} | {row['tokens_per_s']:,.0f} | {slowest:,.0f}-{fastest:,.0f} | "
          f"{row['vs_transformers']:.2f}x | {row['tokens_per_cpu_s']:,.0f} | "
          f"{row['rows_equal_transformers']}/{B} |")
  result = {"args": vars(args), "rows": rows}
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == "__main__":
  main()
