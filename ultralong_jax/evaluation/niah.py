"""Needle in a haystack: a grid of context lengths x needle depths, scored, plotted, saved.

  python -m ultralong_jax.evaluation.niah --ckpt CKPT --tokenizer TOK --out OUT [--max-length N]

Default grid as in the UltraLong paper (arXiv 2504.06214, Fig. 1): 40 lengths evenly spaced up to
the maximum (the model's max_position_embeddings unless --max-length) x 10 depths from 0% to 100%.
Each cell is one prompt of exactly `length` tokens (chat template, instructions and question
included) with the needle at `depth` of the haystack; the model answers greedily from the KV cache
(evaluation/generate.py; sharded over `sequence` with --mesh). Scores: exact match for the numeric
passkey, word-overlap recall for sentence needles. Writes OUT/niah.json (settings + every cell with
the model's answer), OUT/niah.csv and OUT/niah_heatmap.png (training length dashed).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import json
import os
import sys
from typing import Sequence

import numpy as np

from ultralong_jax.evaluation import generate as gen_lib, haystack as hay, plots, scoring
from ultralong_jax.evaluation.prompt_style import PromptStyle, as_style

CSV_FIELDS = ("length", "depth", "depth_actual", "prompt_tokens", "needle_start", "kind",
              "expected", "answer", "score")


def default_lengths(max_length: int, num: int = 40, min_length: int | None = None) -> list[int]:
  """`num` lengths evenly spaced from `min_length` (default max_length / num) to max_length."""
  if max_length < 1 or num < 1:
    raise ValueError(f"need max_length >= 1 and num >= 1, got {max_length}, {num}.")
  low = min_length if min_length is not None else max_length / num
  return sorted({int(round(x)) for x in np.linspace(low, max_length, num)})


def default_depths(num: int = 10) -> list[float]:
  """`num` depths evenly spaced from 0 (needle first) to 1 (needle last)."""
  return [float(d) for d in np.linspace(0.0, 1.0, num)]


@dataclasses.dataclass
class Cell:
  length: int
  depth: float
  needle: hay.Needle
  prompt: hay.Prompt


def make_cells(tokenizer, haystack: hay.Haystack, lengths: Sequence[int], depths: Sequence[float],
               *, needle: hay.Needle | str = "passkey", chat: bool | PromptStyle = True,
               seed: int = 0) -> list[Cell]:
  """Every (length, depth) prompt. needle: a Needle, "passkey" (a new number per cell, seeded),
  "sentence" (hay.SENTENCE_NEEDLE), or a callable seed -> Needle (a new needle per cell)."""
  cells = []
  for i, length in enumerate(lengths):
    for j, depth in enumerate(depths):
      if needle == "passkey":
        n = hay.passkey_needle(seed * 1_000_003 + i * len(depths) + j)
      elif needle == "sentence":
        n = hay.SENTENCE_NEEDLE
      elif callable(needle):
        n = needle(seed * 1_000_003 + i * len(depths) + j)
      else:
        n = needle
      prefix, suffix = hay.prompt_parts(tokenizer, n.question, chat=chat)
      prompt = hay.build_prompt(haystack, tokenizer.encode(n.text), prefix, suffix, length, depth)
      cells.append(Cell(length, depth, n, prompt))
  return cells


@dataclasses.dataclass
class NiahResults:
  lengths: list[int]
  depths: list[float]
  scores: np.ndarray      # [depths, lengths]
  cells: list[dict]       # one row per cell (CSV_FIELDS)
  paths: dict[str, str]   # json, csv, heatmap

  @property
  def mean(self) -> float:
    return float(np.mean(self.scores))

  def by_distance(self, edges: Sequence[int]) -> list[dict]:
    """Retrieval by how far the needle starts from the end of the prompt (tokens), in bands split
    at the increasing `edges`: [{"band": "<= 128" | "129-256" | "> 256", "cells", "score"}, ...];
    bands without cells are left out. A model trained at T tokens can only have learned to look
    back about T tokens, whatever the prompt's length: this is the view that shows it."""
    bounds = [0, *edges, None]
    bands = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
      scores = [c["score"] for c in self.cells
                if (c["prompt_tokens"] - c["needle_start"] > lo)
                and (hi is None or c["prompt_tokens"] - c["needle_start"] <= hi)]
      if scores:
        name = f"<= {hi}" if lo == 0 else (f"> {lo}" if hi is None else f"{lo + 1}-{hi}")
        bands.append({"band": name, "cells": len(scores), "score": float(np.mean(scores))})
    return bands


def run_niah(model, tokenizer, *, lengths: Sequence[int], depths: Sequence[float], out_dir: str,
             mesh=None, needle: hay.Needle | str = "passkey", haystack_text: str | None = None,
             chat: bool | PromptStyle = True, max_new_tokens: int = 32, batch_size: int = 1,
             training_length: int | None = None, prefill_chunk: int = 8192, kv_block: int = 512,
             seed: int = 0, progress: bool = True, title: str = "Needle in a haystack",
             cached_model: gen_lib.CachedModel | None = None, workers: int = 1) -> NiahResults:
  """Runs the grid and writes niah.json / niah.csv / niah_heatmap.png under out_dir.

  model: a `modeling.llama.Llama`; tokenizer: `ultralong_jax.data.tokenizer` interface; lengths
  in tokens; depths in [0, 1]; haystack_text: defaults to `haystack.filler_text`; cells of one
  length run `batch_size` at a time (all equally long: no padding). `workers` > 1 runs that many
  lengths at once from threads, longest first (each length compiles its own prefill and decode
  programs: on a CPU host, compiling one while running another keeps more cores busy); every
  cell's answer is the same as with one worker.
  """
  if not lengths or not depths:
    raise ValueError("run_niah: lengths and depths must be non-empty.")
  if workers < 1:
    raise ValueError(f"run_niah: workers must be >= 1, got {workers}.")
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  text = haystack_text if haystack_text is not None else hay.filler_text(20_000, seed)
  cells = make_cells(tokenizer, hay.Haystack(tokenizer, text), lengths, depths, needle=needle,
                     chat=chat, seed=seed)
  runner = cached_model or gen_lib.CachedModel(model, mesh, kv_block=kv_block)
  style = as_style(chat)
  stops = style.stop_ids(tokenizer)
  bar = tqdm(total=len(cells), desc="needle cells", disable=not progress, file=sys.stderr)

  def run_length(group: list[Cell]) -> list[dict]:  # one length, all depths
    rows = []
    for b in range(0, len(group), batch_size):
      batch = group[b:b + batch_size]
      outs = runner.generate([c.prompt.ids for c in batch], max_new_tokens=max_new_tokens,
                             stop_tokens=stops, prefill_chunk=prefill_chunk)
      for cell, out in zip(batch, outs):
        answer = tokenizer.decode([t for t in out if t not in stops])
        rows.append({
            "length": cell.length, "depth": cell.depth,
            "depth_actual": round(cell.prompt.depth_actual, 5),
            "prompt_tokens": len(cell.prompt.ids), "needle_start": cell.prompt.needle_start,
            "kind": cell.needle.kind, "expected": cell.needle.answer, "answer": answer,
            "score": scoring.score(cell.needle.kind, answer, cell.needle.answer)})
      bar.update(len(batch))
      bar.set_postfix(length=group[0].length)
    return rows

  groups = [cells[s:s + len(depths)] for s in range(0, len(cells), len(depths))]
  if workers == 1:
    per_length = [run_length(g) for g in groups]
  else:
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      order = sorted(range(len(groups)), key=lambda i: -groups[i][0].length)
      futures = {i: pool.submit(run_length, groups[i]) for i in order}
      try:
        per_length = [futures[i].result() for i in range(len(groups))]
      except BaseException:  # the first error (or Ctrl-C) ends the grid: no new lengths start
        for f in futures.values():
          f.cancel()
        raise
  bar.close()
  rows = [row for group in per_length for row in group]
  scores = np.array([r["score"] for r in rows]).reshape(len(lengths), len(depths)).T
  settings = {"lengths": list(lengths), "depths": list(depths), "chat": style.chat,
              "chat_template": style.template,
              "needle": dataclasses.asdict(cells[0].needle) if not isinstance(needle, str)
              else needle, "max_new_tokens": max_new_tokens, "training_length": training_length,
              "mesh": dict(mesh.shape) if mesh is not None else None}
  return save_results(rows, lengths, depths, scores, out_dir, settings=settings,
                      training_length=training_length, title=title)


def save_results(rows, lengths, depths, scores, out_dir, *, settings, training_length, title):
  os.makedirs(out_dir, exist_ok=True)
  paths = {"json": os.path.join(out_dir, "niah.json"), "csv": os.path.join(out_dir, "niah.csv"),
           "heatmap": os.path.join(out_dir, "niah_heatmap.png")}
  with open(paths["json"], "w") as f:
    json.dump({"settings": settings, "mean_score": float(np.mean(scores)),
               "scores": np.asarray(scores).tolist(), "cells": rows}, f, indent=1)
  with open(paths["csv"], "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
  plots.heatmap(scores, lengths, depths, paths["heatmap"], training_length=training_length,
                title=title)
  return NiahResults(list(lengths), list(depths), np.asarray(scores), rows, paths)


def _numbers(text: str, flag: str, kind=float) -> list:
  """'1,2,3' -> [kind(x), ...]; errors name the flag."""
  try:
    values = [kind(x) for x in text.split(",") if x.strip()]
  except ValueError:
    what = "integers" if kind is int else "numbers"
    raise ValueError(f"{flag}={text!r}: expected comma-separated {what}.") from None
  if not values:
    raise ValueError(f"{flag}={text!r}: no values given.")
  return values


def _parser() -> argparse.ArgumentParser:
  from ultralong_jax.evaluation import loading  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(prog="python -m ultralong_jax.evaluation.niah",
                              description=__doc__.split("\n\n")[0])
  loading.add_model_flags(p)
  p.add_argument("--max-length", type=int, help="longest context (default: the model's "
                 "max_position_embeddings)")
  p.add_argument("--min-length", type=int, help="shortest context (default max-length / num)")
  p.add_argument("--num-lengths", type=int, default=40)
  p.add_argument("--num-depths", type=int, default=10)
  p.add_argument("--lengths", help="explicit comma-separated lengths (overrides the above)")
  p.add_argument("--depths", help="explicit comma-separated depths in percent, e.g. 0,50,100")
  p.add_argument("--haystack", nargs="*", default=[],
                 help="text files for the haystack (default: built-in filler prose)")
  p.add_argument("--needle", default="passkey",
                 help="'passkey' (numeric, exact match), 'sentence' (the San Francisco needle), "
                      "or a custom needle sentence (give --question and --answer)")
  p.add_argument("--question")
  p.add_argument("--answer")
  p.add_argument("--no-chat", action="store_true", help="plain prompt (base models)")
  loading.add_prompt_flags(p)
  p.add_argument("--training-length", type=int, help="draw this length as a dashed line")
  p.add_argument("--max-new-tokens", type=int, default=32)
  p.add_argument("--batch-size", type=int, default=1)
  p.add_argument("--workers", type=int, default=1,
                 help="lengths run at once from threads (CPU hosts: the number of cores)")
  p.add_argument("--seed", type=int, default=0)
  return p


def main(argv=None) -> NiahResults:
  from ultralong_jax.evaluation import loading  # pylint: disable=g-import-not-at-top
  parser = _parser()
  args = parser.parse_args(argv)
  # Every flag is checked before the weights load (minutes for a large model); errors name the flag.
  with loading.flag_errors(parser):
    loading.positive(args, "max_length", "min_length", "num_lengths", "num_depths",
                     "training_length", "max_new_tokens", "batch_size", "workers")
    if args.needle not in ("passkey", "sentence") and not (args.question and args.answer):
      raise ValueError("--needle with a custom sentence needs --question and --answer.")
    needle = args.needle if args.needle in ("passkey", "sentence") else hay.Needle(
        text=f" {args.needle.strip()} ", question=args.question, answer=args.answer)
    lengths = _numbers(args.lengths, "--lengths", int) if args.lengths else None
    if lengths is not None and min(lengths) < 1:
      raise ValueError(f"--lengths={args.lengths!r}: lengths must be >= 1.")
    depths = ([d / 100 for d in _numbers(args.depths, "--depths")] if args.depths else
              default_depths(args.num_depths))
    if any(not 0 <= d <= 1 for d in depths):
      raise ValueError(f"--depths must be percentages in [0, 100], got {args.depths}.")
    text = hay.load_text_files(args.haystack) if args.haystack else None
    flags = loading.check_model_flags(args)
    style = loading.prompt_style_for(flags, args)
    if lengths is None:
      max_length = args.max_length or flags.config.max_position_embeddings
      if args.min_length is not None and args.min_length > max_length:
        raise ValueError(f"--min-length {args.min_length} is above the longest length "
                         f"{max_length} (--max-length or the model's max_position_embeddings).")
      lengths = default_lengths(max_length, args.num_lengths, args.min_length)
    try:  # the shortest cell must leave room for haystack after instructions, needle, question
      make_cells(flags.tokenizer, hay.Haystack(flags.tokenizer, hay.filler_text(200)),
                 [min(lengths)], [0.0], needle=needle, chat=style)
    except ValueError as e:
      raise ValueError(f"{'--lengths' if args.lengths else '--min-length'}: {e}") from None
  with loading.flag_errors(parser):
    model = loading.load_model(args)
  results = run_niah(model, flags.tokenizer, lengths=lengths, depths=depths, out_dir=args.out,
                     mesh=flags.mesh, needle=needle, haystack_text=text, chat=style,
                     max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                     training_length=args.training_length, prefill_chunk=args.prefill_chunk,
                     kv_block=args.kv_block, seed=args.seed, workers=args.workers)
  print(f"needle in a haystack: mean score {results.mean:.3f} over {len(results.cells)} cells")
  for name, path in results.paths.items():
    print(f"  {name}: {path}")
  return results


if __name__ == "__main__":
  main()
