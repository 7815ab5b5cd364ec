"""transformers' greedy `generate` timed on the CPU: the baseline of `python -m
ultralong_jax.bench.decode`, kept outside the library (which never imports torch).

  python benchmarks/hf_generate_baseline.py --model DIR --prompts PROMPTS.npy --new-tokens 96 \
      --repeats 5 [--threads 1] [--out RESULT.json]
  python benchmarks/hf_generate_baseline.py ... --serve   # driven by bench.decode (below)

DIR is a Hugging Face checkpoint (e.g. written by `ultralong_jax.save_pretrained`), loaded with
`LlamaForCausalLM.from_pretrained` in float32 and its default attention; PROMPTS.npy an int
array [B, P] (`np.save`; loaded without pickle). Each call decodes exactly --new-tokens tokens
per row, greedy, with no stop token (`eos_token_id=None`, `min_new_tokens`), prefill included.
--threads sets `torch.set_num_threads` (0: torch's default).

--repeats mode: one warm-up call, then the timed calls; prints (and writes to --out) JSON with
the wall and CPU seconds of each call (CPU: every thread of this process), the new tokens of the
last call, the versions and the thread count.

--serve mode (what bench.decode uses, so that it can interleave this process's calls with its
own): after loading and one warm-up call it prints one JSON line {"versions", "threads"}; then
for every "run" line on stdin it times one call and prints {"wall", "cpu"}; on "tokens" it
prints {"tokens": [[...], ...]} (the last call's new tokens) and exits.

Exit status 3, with the reason on stderr, when torch or transformers is not installed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

MISSING = 3


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
  parser.add_argument("--prompts", required=True, help=".npy int array [batch, prompt tokens]")
  parser.add_argument("--new-tokens", type=int, required=True)
  parser.add_argument("--threads", type=int, default=0)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--serve", action="store_true", help="timed calls on request (stdin)")
  parser.add_argument("--out", default=None, help="also write the --repeats result here")
  args = parser.parse_args(argv)
  try:
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    print(f"hf_generate_baseline: transformers' generate needs torch and transformers "
          f"(pip install -r requirements-test.txt): {e}", file=sys.stderr)
    sys.exit(MISSING)
  if args.threads:
    torch.set_num_threads(args.threads)
  prompts = np.load(args.prompts, allow_pickle=False)
  model = transformers.LlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
  ids = torch.as_tensor(prompts, dtype=torch.long)

  def run():
    with torch.no_grad():
      return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                            max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                            eos_token_id=None, pad_token_id=0)

  def timed():
    wall, cpu = time.perf_counter(), time.process_time()
    out = run()
    return time.perf_counter() - wall, time.process_time() - cpu, out

  info = {"versions": f"torch {torch.__version__}, transformers {transformers.__version__}",
          "threads": torch.get_num_threads()}
  out = run()  # warm-up
  new_tokens = lambda out: out[:, prompts.shape[1]:].tolist()  # noqa: E731
  if args.serve:
    print(json.dumps(info), flush=True)
    for line in sys.stdin:
      if line.strip() == "run":
        wall, cpu, out = timed()
        print(json.dumps({"wall": wall, "cpu": cpu}), flush=True)
      elif line.strip() == "tokens":
        print(json.dumps({"tokens": new_tokens(out)}), flush=True)
        return
    return
  seconds = []
  for _ in range(args.repeats):
    wall, cpu, out = timed()
    seconds.append((wall, cpu))
  result = {**info, "wall_seconds": [w for w, _ in seconds], "cpu_seconds": [c for _, c in seconds],
            "tokens": new_tokens(out)}
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f)
  print(json.dumps({k: v for k, v in result.items() if k != "tokens"}))


if __name__ == "__main__":
  main()
