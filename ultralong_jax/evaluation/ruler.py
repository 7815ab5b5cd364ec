"""RULER (Hsieh et al. 2024, arXiv 2404.06654): its 13 tasks at token-exact lengths, one command.

  python -m ultralong_jax.evaluation.ruler --ckpt CKPT --tokenizer TOK --out OUT \\
      --lengths 4096,8192,16384,32768,65536,131072 [--tasks niah_single_1,vt,...] \\
      [--haystack essays.txt ...] [--squad dev-v2.0.json] [--hotpotqa hotpot_dev_distractor_v1.json]

The 11 synthetic tasks are generated offline (ruler_synthetic.py): niah_single_1/2/3,
niah_multikey_1/2/3, niah_multivalue, niah_multiquery, vt, cwe, fwe; the essay haystack is the
--haystack files (RULER uses Paul Graham's essays) or built-in filler prose. qa_1 (SQuAD) and qa_2
(HotpotQA) run from the files given to --squad / --hotpotqa and are skipped, with a message,
without them. Templates, answer prefixes, generation budgets and metrics are RULER's
(ruler_tasks.py); a sample of length L is a prompt of at most L minus the task's new tokens.
Greedy answers, scored per task and length by RULER's string_match_all (string_match_part for
QA), in percent; the average over the tasks per length is the row the UltraLong paper's RULER
table reports. Writes OUT/ruler.json (table, average, every sample), OUT/ruler.csv (the table),
OUT/ruler_samples.csv and OUT/ruler.png (the table as a heatmap).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from typing import Sequence

import numpy as np

from ultralong_jax.evaluation import generate as gen_lib, haystack as hay, plots, scoring
from ultralong_jax.evaluation import ruler_qa, ruler_synthetic, ruler_tasks
from ultralong_jax.evaluation.prompt_style import PromptStyle, as_style

TASKS = ruler_tasks.SYNTHETIC + ruler_tasks.QA
# Names of the RULER-style tasks this module had before it ran RULER's own definitions.
ALIASES = {"niah_multikey": "niah_multikey_1", "variable_tracking": "vt", "common_words": "cwe"}


def resolve_tasks(names: Sequence[str]) -> list[str]:
  """RULER task names (aliases mapped, order kept, repeats dropped); unknown names raise."""
  out = []
  for name in names:
    task = ALIASES.get(name, name)
    if task not in ruler_tasks.TASKS:
      raise ValueError(f"unknown RULER task {name!r}; choose from {', '.join(TASKS)}.")
    if task not in out:
      out.append(task)
  return out


def make_sample(task: str, tokenizer, haystack: hay.Haystack, length: int, seed: int, *,
                chat: bool | PromptStyle = True, new_tokens: int | None = None,
                qa: ruler_qa.QAData | None = None) -> dict:
  """{"task", "length", "ids", "answers", "metric", "new_tokens"} for one sample of `task`
  (`haystack`: the essay haystack; `qa`: the loaded file of a QA task)."""
  task = resolve_tasks([task])[0]
  if task in ruler_tasks.QA:
    if qa is None:
      raise ValueError(f"{task} needs its file ({ruler_qa.FLAGS[task]}).")
    return ruler_qa.make(task, qa, tokenizer, length, seed, chat=chat, new_tokens=new_tokens)
  return ruler_synthetic.make(task, tokenizer, length, seed, essay=haystack, chat=chat,
                              new_tokens=new_tokens)


def essay_haystack(tokenizer, text: str) -> hay.Haystack:
  """The essay haystack with every run of whitespace one space, as RULER reads its essays."""
  return hay.Haystack(tokenizer, " ".join(text.split()) + " ")


def check_lengths(tokenizer, haystack: hay.Haystack, tasks: Sequence[str],
                  lengths: Sequence[int], *, chat: bool | PromptStyle, new_tokens: int | None,
                  qa: dict) -> None:
  """Raises ValueError, naming the task and length, when a length cannot hold a sample of one of
  `tasks` (its template, needles and answer budget). A sample needs the most room at the shortest
  length, and for cwe also at the shortest length >= 4096 (its word counts step up there)."""
  for t in tasks:
    if t in qa or t not in ruler_tasks.QA:
      at = {min(lengths)} | ({min(n for n in lengths if n >= 4096)}
                             if t == "cwe" and max(lengths) >= 4096 else set())
      for n in sorted(at):
        make_sample(t, tokenizer, haystack, n, 0, chat=chat, new_tokens=new_tokens, qa=qa.get(t))


def qa_skips(tasks: Sequence[str], qa_files: dict[str, str]) -> dict[str, str]:
  """{task: why it is skipped} for the QA tasks among `tasks` without a file."""
  names = {"qa_1": "SQuAD (e.g. dev-v2.0.json)",
           "qa_2": "HotpotQA (e.g. hotpot_dev_distractor_v1.json)"}
  return {t: f"{t} skipped: it needs a local {names[t]} file; pass {ruler_qa.FLAGS[t]} FILE."
          for t in tasks if t in ruler_tasks.QA and not qa_files.get(t)}


def run_ruler(model, tokenizer, *, lengths: Sequence[int], out_dir: str,
              tasks: Sequence[str] = TASKS, samples: int = 4, mesh=None,
              chat: bool | PromptStyle = True,
              haystack_text: str | None = None, max_new_tokens: int | None = None,
              batch_size: int = 1, prefill_chunk: int = 8192, kv_block: int = 512, seed: int = 0,
              progress: bool = True, cached_model: gen_lib.CachedModel | None = None,
              qa_files: dict[str, str] | None = None) -> dict:
  """Generates `samples` prompts per (task, length), answers greedily, scores, writes outputs.

  max_new_tokens: tokens generated per answer for every task (default: each task's RULER
  budget). qa_files: {"qa_1": SQuAD path, "qa_2": HotpotQA path}; a QA task without one is
  skipped (reported in "skipped" and on stderr). Returns {"scores": {task: {length: percent}},
  "average": {length: percent over the tasks}, "mean" (of the averages), "tasks", "skipped",
  "samples", "paths"}.
  """
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  tasks = resolve_tasks(tasks)
  skipped = qa_skips(tasks, qa_files or {})
  for message in skipped.values():
    print(message, file=sys.stderr)
  tasks = [t for t in tasks if t not in skipped]
  if not tasks:
    raise ValueError("no RULER task left to run: " + " ".join(skipped.values()))
  qa = {t: ruler_qa.load(t, qa_files[t]) for t in tasks if t in ruler_tasks.QA}
  haystack = essay_haystack(tokenizer, haystack_text or hay.filler_text(20_000, seed))
  check_lengths(tokenizer, haystack, tasks, lengths, chat=chat, new_tokens=max_new_tokens, qa=qa)
  runner = cached_model or gen_lib.CachedModel(model, mesh, kv_block=kv_block)
  stops = as_style(chat).stop_ids(tokenizer)
  # Samples are built batch by batch (a 1M-token prompt is ~1M Python ints); a batch shares one
  # length (prompts are left-padded to the longest) and one generation budget.
  new_tokens = {t: ruler_tasks.TASKS[t].new_tokens if max_new_tokens is None else max_new_tokens
                for t in tasks}
  batches = []
  for n in lengths:
    for t in tasks:
      for k in range(samples):
        last = batches[-1][-1] if batches else None
        if (last is None or len(batches[-1]) == batch_size or last[0] != n
            or new_tokens[last[1]] != new_tokens[t]):
          batches.append([])
        batches[-1].append((n, t, seed * 10_000 + k))
  rows = []
  bar = tqdm(total=len(lengths) * len(tasks) * samples, desc="ruler samples",
             disable=not progress, file=sys.stderr)
  for specs in batches:
    batch = [make_sample(t, tokenizer, haystack, n, sample_seed, chat=chat,
                         new_tokens=max_new_tokens, qa=qa.get(t)) for n, t, sample_seed in specs]
    outs = runner.generate([s["ids"] for s in batch], max_new_tokens=batch[0]["new_tokens"],
                           stop_tokens=stops, prefill_chunk=prefill_chunk)
    for s, out in zip(batch, outs):
      answer = scoring.ruler_postprocess(tokenizer.decode([t for t in out if t not in stops]))
      rows.append({"task": s["task"], "length": s["length"], "prompt_tokens": len(s["ids"]),
                   "new_tokens": s["new_tokens"], "metric": s["metric"],
                   "expected": "|".join(s["answers"]), "answer": answer,
                   "score": scoring.RULER_METRICS[s["metric"]](answer, s["answers"])})
    bar.update(len(batch))
  bar.close()
  metric_fns = {"string_match_all": scoring.string_match_all,
                "string_match_part": scoring.string_match_part}
  scores = {}
  for t in tasks:
    scores[t] = {}
    for n in lengths:
      mine = [r for r in rows if r["task"] == t and r["length"] == n]
      scores[t][n] = metric_fns[mine[0]["metric"]]([r["answer"] for r in mine],
                                                   [r["expected"].split("|") for r in mine])
  average = {n: round(float(np.mean([scores[t][n] for t in tasks])), 2) for n in lengths}
  mean = round(float(np.mean(list(average.values()))), 2)
  paths = write_outputs(out_dir, tasks, lengths, scores, average, mean, skipped, rows)
  return {"scores": scores, "average": average, "mean": mean, "tasks": tasks,
          "skipped": skipped, "samples": rows, "paths": paths}


def write_outputs(out_dir: str, tasks, lengths, scores, average, mean, skipped, rows) -> dict:
  """ruler.json, ruler.csv (task x length table, the average row, a mean column),
  ruler_samples.csv and ruler.png (the table as a heatmap); returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {k: os.path.join(out_dir, f"ruler.{k}") for k in ("json", "csv", "png")}
  paths["samples_csv"] = os.path.join(out_dir, "ruler_samples.csv")
  with open(paths["json"], "w") as f:
    json.dump({"scores": scores, "average": average, "mean": mean, "tasks": list(tasks),
               "lengths": list(lengths), "skipped": skipped, "samples": rows}, f, indent=1)
  table = [[t, *(scores[t][n] for n in lengths), round(float(np.mean(list(scores[t].values()))),
                                                        2)] for t in tasks]
  table.append(["average", *(average[n] for n in lengths), mean])
  with open(paths["csv"], "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["task", *lengths, "mean"])
    writer.writerows(table)
  with open(paths["samples_csv"], "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  plots.table_heatmap(np.array([r[1:] for r in table], float), [r[0] for r in table],
                      [plots.short_length(n) for n in lengths] + ["mean"], paths["png"],
                      title="RULER (%)")
  return paths


def main(argv=None) -> dict:
  from ultralong_jax.evaluation import loading  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(prog="python -m ultralong_jax.evaluation.ruler",
                              description=__doc__.split("\n\n")[0])
  loading.add_model_flags(p)
  p.add_argument("--lengths", required=True,
                 help="comma-separated model context lengths in tokens (prompt + answer)")
  p.add_argument("--tasks", default=",".join(TASKS),
                 help=f"comma-separated RULER tasks (default all 13: {','.join(TASKS)})")
  p.add_argument("--samples", type=int, default=4, help="samples per task and length")
  p.add_argument("--haystack", nargs="*", default=[],
                 help="essay text files for the essay haystacks (default: built-in filler prose)")
  p.add_argument("--squad", default="", help="SQuAD JSON (e.g. dev-v2.0.json) for qa_1")
  p.add_argument("--hotpotqa", default="",
                 help="HotpotQA JSON (e.g. hotpot_dev_distractor_v1.json) for qa_2")
  p.add_argument("--no-chat", action="store_true",
                 help="bare templates (RULER's 'base') instead of the model's chat template")
  loading.add_prompt_flags(p)
  p.add_argument("--max-new-tokens", type=int, default=None,
                 help="tokens generated per answer for every task (default: RULER's per task: "
                      "niah 128, vt 30, cwe 120, fwe 50, qa 32)")
  p.add_argument("--batch-size", type=int, default=1,
                 help="prompts per generate call (a batch shares one length and answer budget)")
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
    try:
      tasks = resolve_tasks([t.strip() for t in args.tasks.split(",") if t.strip()])
    except ValueError as e:
      raise ValueError(f"--tasks={args.tasks!r}: {e}") from None
    if not tasks:
      raise ValueError(f"--tasks={args.tasks!r}: no tasks; choose from {', '.join(TASKS)}.")
    qa_files = {"qa_1": args.squad, "qa_2": args.hotpotqa}
    for task, path in qa_files.items():
      if path and task not in tasks:
        raise ValueError(f"{ruler_qa.FLAGS[task]} is given but {task} is not in --tasks.")
    qa = {t: ruler_qa.load(t, path) for t, path in qa_files.items() if path}
    text = hay.load_text_files(args.haystack) if args.haystack else None
    flags = loading.check_model_flags(args)
    style = loading.prompt_style_for(flags, args)
    essay = essay_haystack(flags.tokenizer, text or hay.filler_text(2000))
    try:  # the shortest length must hold each task's template, needles and answer
      check_lengths(flags.tokenizer, essay, tasks, lengths, chat=style,
                    new_tokens=args.max_new_tokens, qa=qa)
    except ValueError as e:
      raise ValueError(f"--lengths: {e}") from None
  with loading.flag_errors(p):
    model = loading.load_model(args)
  res = run_ruler(model, flags.tokenizer, lengths=lengths, out_dir=args.out, tasks=tasks,
                  samples=args.samples, mesh=flags.mesh, chat=style, haystack_text=text,
                  max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                  prefill_chunk=args.prefill_chunk, kv_block=args.kv_block, seed=args.seed,
                  qa_files=qa_files)
  width = max(len(t) for t in [*res["tasks"], "average"])
  print(f"{'task':>{width}}  " + "  ".join(f"{plots.short_length(n):>7}" for n in lengths)
        + "     mean")
  for t in res["tasks"]:
    row = res["scores"][t]
    print(f"{t:>{width}}  " + "  ".join(f"{row[n]:7.2f}" for n in lengths)
          + f"  {np.mean(list(row.values())):7.2f}")
  print(f"{'average':>{width}}  " + "  ".join(f"{res['average'][n]:7.2f}" for n in lengths)
        + f"  {res['mean']:7.2f}")
  for message in res["skipped"].values():
    print(message)
  print("written: " + ", ".join(res["paths"].values()))
  return res


if __name__ == "__main__":
  main()
