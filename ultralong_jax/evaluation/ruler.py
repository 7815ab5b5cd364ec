"""RULER-style synthetic long-context tasks (Hsieh et al. 2024, arXiv 2404.06654), generated offline.

  python -m ultralong_jax.evaluation.ruler --ckpt CKPT --tokenizer TOK --out OUT \\
      --lengths 4096,8192 [--tasks niah_multikey,niah_multivalue,variable_tracking,common_words]

Tasks (RULER's names in brackets), each sample a prompt of exactly `length` tokens:
  niah_multikey      [niah_multikey_1]  4 key -> number needles in the haystack; asked for one key.
  niah_multivalue    [niah_multivalue]  one key with 4 numbers scattered; asked for all of them.
  variable_tracking  [vt]               a chain X1 = number, X2 = X1, ... (4 hops) hidden in the
                                        haystack; asked for every variable holding the number.
  common_words       [cwe]              a numbered word list where 10 words appear 30x, others 3x;
                                        asked for the 10 most common (list truncated to length).
Scored by RULER's string_match_all (fraction of reference strings found in the answer), averaged
per task and length. Writes OUT/ruler.json (scores + every sample), OUT/ruler.csv, OUT/ruler.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
from typing import Sequence

import numpy as np

from ultralong_jax.evaluation import generate as gen_lib, haystack as hay, plots, scoring

TASKS = ("niah_multikey", "niah_multivalue", "variable_tracking", "common_words")
_KEYS = ("amber-falcon", "silent-harbor", "copper-meadow", "violet-engine", "frozen-lantern",
         "quiet-orchard", "bright-canyon", "hollow-river")
_WORDS = ("apple", "bridge", "candle", "dragon", "engine", "forest", "garden", "hammer", "island",
          "jacket", "kettle", "ladder", "mirror", "needle", "orange", "pencil", "quartz", "rabbit",
          "saddle", "tunnel", "umbrella", "velvet", "window", "yellow", "zipper", "anchor", "basket",
          "cactus", "dolphin", "feather", "glacier", "harbor", "iceberg", "jungle", "lantern",
          "marble", "nectar", "oyster", "pepper", "rocket", "salmon", "ticket", "violin", "walnut")


def _number(rng: random.Random) -> str:
  return str(rng.randrange(1_000_000, 10_000_000))


def _spread(haystack: hay.Haystack, pieces: Sequence[list[int]], prefix, suffix, length: int,
            rng: random.Random) -> list[int]:
  """Prompt of exactly `length` tokens with `pieces` at random sentence ends, in order."""
  n = length - len(prefix) - len(suffix) - sum(len(p) for p in pieces)
  if n < len(pieces):
    raise ValueError(f"length {length} is too short for the task's needles and instructions "
                     f"({length - n} tokens); use longer lengths.")
  hay_ids = haystack.tokens(n)
  cuts = sorted(haystack.cut_point(n, rng.randrange(n + 1), max(1, n // 100)) for _ in pieces)
  ids, last = list(prefix), 0
  for cut, piece in zip(cuts, pieces):
    ids += hay_ids[last:cut] + list(piece)
    last = cut
  return ids + hay_ids[last:] + list(suffix)


def make_sample(task: str, tokenizer, haystack: hay.Haystack, length: int, seed: int, *,
                chat: bool = True) -> dict:
  """{"task", "length", "ids", "answers"} for one sample of `task`."""
  rng = random.Random(f"{task}/{length}/{seed}")
  encode = tokenizer.encode
  if task == "niah_multikey":
    keys = rng.sample(_KEYS, 4)
    values = [_number(rng) for _ in keys]
    pieces = [encode(f" One of the special magic numbers for {k} is: {v}. ")
              for k, v in zip(keys, values)]
    asked = rng.randrange(len(keys))
    question = f"What is the special magic number for {keys[asked]} mentioned in the document?"
    answers = [values[asked]]
  elif task == "niah_multivalue":
    key = rng.choice(_KEYS)
    answers = [_number(rng) for _ in range(4)]
    pieces = [encode(f" One of the special magic numbers for {key} is: {v}. ") for v in answers]
    question = f"What are all the special magic numbers for {key} mentioned in the document?"
  elif task == "variable_tracking":
    value = _number(rng)
    names = ["".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(5)) for _ in range(4)]
    chain = [f" VAR {names[0]} = {value}. "] + [
        f" VAR {names[i]} = VAR {names[i - 1]}. " for i in range(1, len(names))]
    pieces = [encode(s) for s in chain]
    question = (f"Find all variables that are assigned the value {value} in the document above, "
                "directly or through other variables.")
    answers = names
  elif task == "common_words":
    return _common_words(tokenizer, length, rng, chat=chat)
  else:
    raise ValueError(f"unknown RULER task {task!r}; choose from {TASKS}.")
  prefix, suffix = hay.prompt_parts(tokenizer, question, chat=chat)
  ids = _spread(haystack, pieces, prefix, suffix, length, rng)
  return {"task": task, "length": length, "ids": ids, "answers": answers}


def _common_words(tokenizer, length: int, rng: random.Random, *, chat: bool) -> dict:
  words = list(_WORDS)
  rng.shuffle(words)
  common, rare = words[:10], words[10:]
  question = "What are the 10 most common words in the list above? Answer with the words only."
  prefix, suffix = hay.prompt_parts(tokenizer, question, chat=chat,
                                    intro="Below is a numbered list of words.")
  budget = length - len(prefix) - len(suffix)
  # Common words 30x, rare ones 3x, in random order; entries are added until the budget is used:
  # 10 x 30 common occurrences need the list to be long enough, so short lengths scale them down.
  bag = common * 30 + rare * 3
  rng.shuffle(bag)
  entries, used, i = [], 0, 0
  while True:
    word = bag[i % len(bag)]
    piece = tokenizer.encode(f"{i + 1}. {word}\n")
    if used + len(piece) > budget:
      break
    entries.append(piece)
    used += len(piece)
    i += 1
  if not entries:
    raise ValueError(f"length {length} is too short for common_words.")
  # Fill the last few tokens with newlines so the prompt has exactly `length` tokens.
  newline = tokenizer.encode("\n")
  filler = newline * ((budget - used) // max(len(newline), 1))
  ids = prefix + [t for e in entries for t in e] + filler + suffix
  counts = {w: sum(bag[j % len(bag)] == w for j in range(i)) for w in words}
  top = sorted(words, key=lambda w: -counts[w])[:10]
  return {"task": "common_words", "length": length, "ids": ids, "answers": top}


def run_ruler(model, tokenizer, *, lengths: Sequence[int], out_dir: str,
              tasks: Sequence[str] = TASKS, samples: int = 4, mesh=None, chat: bool = True,
              haystack_text: str | None = None, max_new_tokens: int = 64, batch_size: int = 1,
              prefill_chunk: int = 8192, kv_block: int = 512, seed: int = 0,
              progress: bool = True, cached_model: gen_lib.CachedModel | None = None) -> dict:
  """Generates `samples` prompts per (task, length), answers greedily, scores, writes outputs.

  Returns {"scores": {task: {length: mean}}, "average": {length: mean over tasks}, "samples",
  "paths"}.
  """
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  for t in tasks:
    if t not in TASKS:
      raise ValueError(f"unknown RULER task {t!r}; choose from {TASKS}.")
  haystack = hay.Haystack(tokenizer, haystack_text or hay.filler_text(20_000, seed))
  runner = cached_model or gen_lib.CachedModel(model, mesh, kv_block=kv_block)
  stops = gen_lib.stop_ids(tokenizer)
  work = [make_sample(t, tokenizer, haystack, n, seed * 10_000 + k, chat=chat)
          for t in tasks for n in lengths for k in range(samples)]
  rows = []
  bar = tqdm(total=len(work), desc="ruler samples", disable=not progress, file=sys.stderr)
  for b in range(0, len(work), batch_size):
    batch = work[b:b + batch_size]
    outs = runner.generate([s["ids"] for s in batch], max_new_tokens=max_new_tokens,
                           stop_tokens=stops, prefill_chunk=prefill_chunk)
    for s, out in zip(batch, outs):
      answer = tokenizer.decode([t for t in out if t not in stops])
      rows.append({"task": s["task"], "length": s["length"], "prompt_tokens": len(s["ids"]),
                   "expected": "|".join(s["answers"]), "answer": answer,
                   "score": scoring.all_present(answer, s["answers"])})
    bar.update(len(batch))
  bar.close()
  scores = {t: {n: float(np.mean([r["score"] for r in rows if r["task"] == t and r["length"] == n]))
                for n in lengths} for t in tasks}
  average = {n: float(np.mean([scores[t][n] for t in tasks])) for n in lengths}
  os.makedirs(out_dir, exist_ok=True)
  paths = {k: os.path.join(out_dir, f"ruler.{k}") for k in ("json", "csv", "png")}
  with open(paths["json"], "w") as f:
    json.dump({"scores": scores, "average": average, "samples": rows}, f, indent=1)
  with open(paths["csv"], "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  plots.curves(list(lengths), {**{t: list(scores[t].values()) for t in tasks},
                               "average": list(average.values())}, paths["png"],
               xlabel="context length (tokens)", ylabel="score", title="RULER-style tasks")
  return {"scores": scores, "average": average, "samples": rows, "paths": paths}


def main(argv=None) -> dict:
  from ultralong_jax.evaluation import loading  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(prog="python -m ultralong_jax.evaluation.ruler",
                              description=__doc__.split("\n\n")[0])
  loading.add_model_flags(p)
  p.add_argument("--lengths", required=True, help="comma-separated prompt lengths in tokens")
  p.add_argument("--tasks", default=",".join(TASKS))
  p.add_argument("--samples", type=int, default=4, help="samples per task and length")
  p.add_argument("--haystack", nargs="*", default=[], help="text files (default: filler prose)")
  p.add_argument("--no-chat", action="store_true")
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.add_argument("--batch-size", type=int, default=1)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  # Every flag is checked before the weights load (minutes for a large model); errors name the flag.
  with loading.flag_errors(p):
    loading.positive(args, "samples", "max_new_tokens", "batch_size")
    try:
      lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    except ValueError:
      raise ValueError(f"--lengths={args.lengths!r}: expected comma-separated integers.") from None
    if not lengths or min(lengths) < 1:
      raise ValueError(f"--lengths={args.lengths!r}: give lengths >= 1.")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
      raise ValueError(f"--tasks={args.tasks!r}: {f'unknown {bad}' if bad else 'no tasks'}; "
                       f"choose from {TASKS}.")
    text = hay.load_text_files(args.haystack) if args.haystack else None
    flags = loading.check_model_flags(args)
    filler = hay.Haystack(flags.tokenizer, hay.filler_text(200))
    for t in tasks:  # the shortest length must hold each task's instructions and needles
      try:
        make_sample(t, flags.tokenizer, filler, min(lengths), 0, chat=not args.no_chat)
      except ValueError as e:
        raise ValueError(f"--lengths: {t}: {e}") from None
  model = loading.load_model(args)
  res = run_ruler(model, flags.tokenizer, lengths=lengths, out_dir=args.out, tasks=tasks,
                  samples=args.samples, mesh=flags.mesh, chat=not args.no_chat, haystack_text=text,
                  max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                  prefill_chunk=args.prefill_chunk, kv_block=args.kv_block, seed=args.seed)
  for t, by_length in res["scores"].items():
    print(f"{t:>18}: " + "  ".join(f"{n}: {s:.3f}" for n, s in by_length.items()))
  print(f"{'average':>18}: " + "  ".join(f"{n}: {s:.3f}" for n, s in res["average"].items()))
  print("written: " + ", ".join(res["paths"].values()))
  return res


if __name__ == "__main__":
  main()
