"""Perplexity by position: does the loss keep falling as the model sees more context?

  python -m ultralong_jax.evaluation.perplexity --ckpt CKPT --tokenizer TOK --out OUT \\
      --length 1048576 [--documents a.txt b.txt ...] [--buckets 20]

Each document (a text file, or built-in filler prose) is cut to `length` + 1 tokens and run through
the KV-cache forward in prefill chunks (sequence-sharded with --mesh), which gives the next-token
negative log-likelihood at every position without holding [length, vocab] logits at once. Losses are
averaged per position bucket (log-spaced by default: [1, 2), [2, 4), ... so that early and late
context get equal room), written to OUT/perplexity.json and plotted to OUT/perplexity.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

import numpy as np

from ultralong_jax.evaluation import generate as gen_lib, haystack as hay, plots


def bucket_edges(length: int, num: int = 20, log: bool = True) -> np.ndarray:
  """Bucket boundaries over positions [0, length): log-spaced (first bucket [0, 1)) or linear."""
  if log:
    edges = np.unique(np.round(np.geomspace(1, length, num)).astype(int))
    return np.concatenate([[0], edges[edges < length], [length]])
  return np.unique(np.linspace(0, length, num + 1).round().astype(int))


def bucket_means(nll: np.ndarray, edges: np.ndarray) -> list[dict]:
  """nll [B, T] per position -> per bucket {start, end, tokens, loss, perplexity}."""
  out = []
  for lo, hi in zip(edges[:-1], edges[1:]):
    values = nll[:, lo:hi]
    loss = float(values.mean())
    out.append({"start": int(lo), "end": int(hi), "tokens": int(values.size), "loss": loss,
                "perplexity": float(np.exp(loss))})
  return out


def token_nll(runner: gen_lib.CachedModel, documents: Sequence[Sequence[int]], length: int, *,
              chunk: int = 8192) -> np.ndarray:
  """Next-token NLL [B, length] (float32) of each document's first length + 1 tokens."""
  short = [i for i, d in enumerate(documents) if len(d) < length + 1]
  if short:
    raise ValueError(f"documents {short} have fewer than length + 1 = {length + 1} tokens; "
                     "give longer documents or a smaller --length.")
  # Padding rows (copies of the last document) fill the batch up to the mesh's data x fsdp; their
  # losses are dropped below.
  ids = np.asarray([list(d[:length + 1]) for d in runner.pad_rows(documents)], np.int32)
  B = len(ids)
  chunk = min(-(-chunk // runner.chunk_multiple()) * runner.chunk_multiple(),
              -(-length // runner.chunk_multiple()) * runner.chunk_multiple())
  padded = -(-length // chunk) * chunk
  # Right-pad the tail with segment 0: padding comes after every real token, so it changes none
  # of their losses (causal), and its own losses are dropped.
  inputs = np.zeros((B, padded), np.int32)
  targets = np.zeros((B, padded), np.int32)
  inputs[:, :length], targets[:, :length] = ids[:, :-1], ids[:, 1:]
  segment_ids = (np.arange(padded) < length).astype(np.int32)[None].repeat(B, 0)
  positions = np.broadcast_to(np.arange(padded, dtype=np.int32), (B, padded))
  cache = runner.new_cache(B, padded)
  nll = []
  for start in range(0, padded, chunk):
    s = slice(start, start + chunk)
    out, cache = runner.step(cache, inputs[:, s], positions[:, s], segment_ids[:, s], start,
                             head="nll", targets=targets[:, s])
    nll.append(np.asarray(out))
  return np.concatenate(nll, axis=1)[:len(documents), :length]


def run_perplexity(model, tokenizer, *, length: int, out_dir: str, texts: Sequence[str] | None = None,
                   mesh=None, num_buckets: int = 20, log_buckets: bool = True,
                   chunk: int = 8192, kv_block: int = 512, title: str = "Loss by position",
                   cached_model: gen_lib.CachedModel | None = None) -> dict:
  """Tokenizes `texts` (default: 2 filler documents), runs `token_nll`, writes JSON + PNG."""
  if texts is None:
    words = int(length * 1.2) + 100  # filler prose has more than one token per word
    texts = [hay.filler_text(words, seed=s) for s in range(2)]
  documents = [tokenizer.encode(t) for t in texts]
  runner = cached_model or gen_lib.CachedModel(model, mesh, kv_block=kv_block)
  nll = token_nll(runner, documents, length, chunk=chunk)
  edges = bucket_edges(length, num_buckets, log_buckets)
  buckets = bucket_means(nll, edges)
  os.makedirs(out_dir, exist_ok=True)
  result = {"length": length, "documents": len(documents), "mean_loss": float(nll.mean()),
            "buckets": buckets, "paths": {"json": os.path.join(out_dir, "perplexity.json"),
                                          "plot": os.path.join(out_dir, "perplexity.png")}}
  with open(result["paths"]["json"], "w") as f:
    json.dump(result, f, indent=1)
  centers = [np.sqrt(max(b["start"], 1) * b["end"]) if log_buckets else (b["start"] + b["end"]) / 2
             for b in buckets]
  plots.curves(centers, {"loss": [b["loss"] for b in buckets]}, result["paths"]["plot"],
               xlabel="token position", ylabel="next-token loss (nats)", title=title,
               log_x=log_buckets)
  return result


def main(argv=None) -> dict:
  from ultralong_jax.evaluation import loading  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(prog="python -m ultralong_jax.evaluation.perplexity",
                              description=__doc__.split("\n\n")[0])
  loading.add_model_flags(p)
  p.add_argument("--length", type=int, required=True, help="positions per document")
  p.add_argument("--documents", nargs="*", default=[], help="text files, one document each "
                 "(default: built-in filler prose)")
  p.add_argument("--buckets", type=int, default=20)
  p.add_argument("--linear-buckets", action="store_true")
  args = p.parse_args(argv)
  # Every flag is checked before the weights load (minutes for a large model); errors name the flag.
  with loading.flag_errors(p):
    loading.positive(args, "buckets")
    if args.length < 2:
      raise ValueError(f"--length must be >= 2, got {args.length}.")
    texts = None
    if args.documents:
      texts = [hay.load_text_files([path], flag="--documents") for path in args.documents]
    flags = loading.check_model_flags(args)
    short = [path for path, text in zip(args.documents, texts or [])
             if len(flags.tokenizer.encode(text)) < args.length + 1]
    if short:
      raise ValueError(f"--documents {short} have fewer than --length + 1 = {args.length + 1} "
                       "tokens; give longer documents or a smaller --length.")
  with loading.flag_errors(p):
    model = loading.load_model(args)
  result = run_perplexity(model, flags.tokenizer, length=args.length, out_dir=args.out,
                          texts=texts, mesh=flags.mesh, num_buckets=args.buckets,
                          log_buckets=not args.linear_buckets, chunk=args.prefill_chunk,
                          kv_block=args.kv_block)
  for b in result["buckets"]:
    print(f"positions [{b['start']:>8}, {b['end']:>8}): loss {b['loss']:.4f}", file=sys.stdout)
  print(f"written: {result['paths']['json']}, {result['paths']['plot']}")
  return result


if __name__ == "__main__":
  main()
