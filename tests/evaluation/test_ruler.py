"""RULER's tasks: every sample fits its length, holds what it claims, and its gold answers can be
recovered from the prompt text alone; scoring as RULER's; the CLI writes the full table.

The tiny random model cannot answer anything (scores ~0); the end-to-end test checks the outputs'
completeness, the sample tests check the prompts against what RULER's generators produce.
"""

import collections
import csv
import json
import os
import re
import shutil

import pytest

from ultralong_jax.evaluation import haystack as hay, ruler, ruler_synthetic, ruler_tasks, scoring

LENGTHS = (1536, 5000)  # below and above 4096, where cwe switches its word frequencies


@pytest.fixture(scope="module")
def essay(tokenizer):
  return ruler.essay_haystack(tokenizer, hay.filler_text(4000, seed=2))


def _between(text: str, start: str, end: str) -> str:
  """The text after the last `start` up to the next `end`."""
  return text[text.rindex(start) + len(start):].split(end, 1)[0]


def _check_niah(task, text, answers):
  args = ruler_tasks.TASKS[task].args
  needles = re.findall(r"One of the special magic (\w+) for (\S+) is: (\S+)\.", text)
  assert {t for t, _, _ in needles} == {args["type_needle_v"]}
  queried = re.search(r"What (?:is|are all) the special magic \w+ for (.+) mentioned", text)[1]
  keys = re.split(r", and |, ", queried)
  assert len(keys) == args["num_needle_q"]
  values = collections.defaultdict(list)
  for _, key, value in needles:
    values[key].append(value)
  # Every asked key has exactly its num_needle_v values, and they are the gold answers.
  assert all(len(values[k]) == args["num_needle_v"] for k in keys)
  assert sorted(v for k in keys for v in values[k]) == sorted(answers)
  kind = args["type_haystack"]
  if kind == "essay":
    assert len(needles) == max(args["num_needle_k"], args["num_needle_q"]) * args["num_needle_v"]
  elif kind == "noise":
    assert text.count(ruler_synthetic.NOISE) > 10 and len(needles) == 1
  else:  # needle haystack: many distractor needles (their keys never an asked one, checked above)
    assert len(needles) > 10 and len(values) > 10
  uuid = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
  pattern = {"numbers": r"\d{7}", "uuids": uuid, "words": r"[a-z]+-[a-z]+"}
  assert all(re.fullmatch(pattern[args["type_needle_k"]], k) for _, k, _ in needles)
  assert all(re.fullmatch(pattern[args["type_needle_v"]], v) for _, _, v in needles)
  single = args["num_needle_q"] * args["num_needle_v"] == 1
  assert text.count("A special magic " if single else "Some special magic ") == 1
  assert text.endswith(f"mentioned in the provided text {'is' if single else 'are'}")


def _check_vt(text, answers):
  task = text[text.rindex("Memorize and track"):]  # after the worked example
  value = re.search(r"assigned the value (\d+) in the text above", task)[1]
  assigned = dict(re.findall(r"VAR (\w+) = (VAR \w+|\d+)", task))
  holders, changed = {value}, True
  while changed:  # resolve the chain: a variable holds the value if it is assigned a holder
    grown = holders | {v for v, rhs in assigned.items() if rhs.removeprefix("VAR ") in holders
                       or rhs in holders}
    changed, holders = grown != holders, grown
  assert sorted(holders - {value}) == sorted(answers) and len(answers) == 5
  assert f"5 variables are assigned the value {value}, they are: " in text
  example = text[:text.rindex("Memorize and track")]
  assert "VAR" in example and not set(answers) & set(re.findall(r"VAR (\w+)", example))


def _check_cwe(text, answers, length):
  listed = _between(text, "Memorize the ones that appear most often.\n", "\nQuestion")
  counts = collections.Counter(re.findall(r"\d+\. ([a-z-]+)", listed))
  numbers = [int(n) for n in re.findall(r"(\d+)\. ", listed)]
  assert numbers == list(range(1, len(numbers) + 1))
  common, rare = (6, 1) if length < 4096 else (30, 3)
  assert len(answers) == 10 and all(counts[w] == common for w in answers)
  assert len(counts) > 10 and all(c == rare for w, c in counts.items() if w not in answers)


def _check_fwe(text, answers):
  coded = _between(text, "Find the three most frequently appeared coded words.", "\nQuestion")
  counts = collections.Counter(coded.split())
  ranked = [w for w, _ in counts.most_common() if w != "..."]
  assert counts.most_common(1)[0][0] == "..." and ranked[:3] == answers
  assert counts[ranked[2]] > counts[ranked[3]]  # the third is strictly ahead of the rest


@pytest.mark.parametrize("task", ruler_tasks.SYNTHETIC)
def test_synthetic_sample_fits_and_answers_are_recoverable(task, tokenizer, essay):
  for length in LENGTHS:
    s = ruler.make_sample(task, tokenizer, essay, length, seed=1)
    budget = length - ruler_tasks.TASKS[task].new_tokens
    # At most the budget; the context fills it to within one piece (a line, list entry, word;
    # a line of two uuids is the longest, ~80 tokens with this byte-level tokenizer).
    assert budget - 100 <= len(s["ids"]) <= budget, (len(s["ids"]), budget)
    text = tokenizer.decode(s["ids"])
    assert text.startswith("<|begin_of_text|>") and "<|start_header_id|>assistant" in text
    answer_prefix = text.rsplit("<|end_header_id|>\n\n", 1)[1]
    assert answer_prefix.startswith(" ") and all(a not in answer_prefix for a in s["answers"])
    assert all(a in text for a in s["answers"]) and s["metric"] == "string_match_all"
    family = ruler_tasks.TASKS[task].family
    if family == "niah":
      _check_niah(task, text, s["answers"])
    elif family == "vt":
      _check_vt(text, s["answers"])
    elif family == "cwe":
      _check_cwe(text, s["answers"], length)
    else:
      _check_fwe(text, s["answers"])


def test_samples_are_seeded_and_bounded(tokenizer, essay):
  a = ruler.make_sample("niah_multivalue", tokenizer, essay, 1536, seed=3)
  assert a == ruler.make_sample("niah_multivalue", tokenizer, essay, 1536, seed=3)
  assert a != ruler.make_sample("niah_multivalue", tokenizer, essay, 1536, seed=4)
  # --max-new-tokens moves the prompt budget; old task names still resolve.
  b = ruler.make_sample("variable_tracking", tokenizer, essay, 1536, seed=3, new_tokens=2)
  assert b["task"] == "vt" and 1536 - 2 - 100 <= len(b["ids"]) <= 1534
  with pytest.raises(ValueError, match="use longer lengths"):
    ruler.make_sample("cwe", tokenizer, essay, 600, seed=0)
  # A user's essay (--haystack) is the essay haystack, its whitespace runs made single spaces.
  own = ruler.essay_haystack(tokenizer,
                             "Zebras paint the fence at dawn.\n\nOwls   read maps. " * 40)
  d = tokenizer.decode(ruler.make_sample("niah_single_2", tokenizer, own, 1536, seed=0)["ids"])
  assert "dawn. Owls read maps. Zebras paint" in d and "The grass is green" not in d
  # --no-chat: RULER's `base` template, BOS + task text + answer prefix, no chat headers.
  c = ruler.make_sample("fwe", tokenizer, essay, 1536, seed=3, chat=False)
  text = tokenizer.decode(c["ids"])
  assert text.startswith("<|begin_of_text|>Read the following coded text") and "<|" not in text[17:]
  assert text.endswith("above coded text? Answer: According to the coded text above, the three "
                       "most frequently appeared words are:")


def test_fwe_counts_follow_zipf():
  counts = ruler_synthetic.fwe_counts(10_000, 20, 2.0)
  zeta2 = 1.6449340668482264  # pi^2 / 6
  assert counts == [int(10_000 / k ** 2 / zeta2) for k in range(1, 21)]


def _ruler_string_match_all(preds, refs):  # RULER scripts/eval/synthetic/constants.py, verbatim
  score = sum([sum([1.0 if r.lower() in pred.lower() else 0.0 for r in ref]) / len(ref)
               for pred, ref in zip(preds, refs)]) / len(preds) * 100
  return round(score, 2)


def _ruler_string_match_part(preds, refs):  # RULER scripts/eval/synthetic/constants.py, verbatim
  score = sum([max([1.0 if r.lower() in pred.lower() else 0.0 for r in ref])
               for pred, ref in zip(preds, refs)]) / len(preds) * 100
  return round(score, 2)


def test_scoring_matches_ruler():
  preds = ["The numbers are 1234567 and 7654321.", "ABC-def and xyz", "", "Paris, France"]
  refs = [["1234567", "7654321", "1111111"], ["abc-DEF", "nope"], ["x"], ["paris", "Lyon"]]
  assert scoring.string_match_all(preds, refs) == _ruler_string_match_all(preds, refs) == 41.67
  assert scoring.string_match_part(preds, refs) == _ruler_string_match_part(preds, refs) == 75.0
  assert scoring.string_match_all(["a b c"], [["a", "b", "c"]]) == 100.0
  assert scoring.ruler_postprocess("  one\x01two\t \n") == "one\ntwo"


def _squad_file(tmp_path):
  articles = [{"title": f"T{a}", "paragraphs": [
      {"context": f"Paragraph {a}.{p}: " + hay.filler_text(60, seed=10 * a + p).strip(),
       "qas": [{"question": f"Which code does paragraph {a}.{p} hold?", "is_impossible": False,
                "answers": [{"text": f"CODE{a}{p}"}, {"text": f"code {a}-{p}"}]},
               {"question": "Unanswerable?", "is_impossible": True, "answers": []}]}
      for p in range(3)]} for a in range(4)]
  for art in articles:
    for p in art["paragraphs"]:
      p["context"] += " The code is " + p["qas"][0]["answers"][0]["text"] + "."
  path = tmp_path / "squad.json"
  path.write_text(json.dumps({"version": "v2.0", "data": articles}))
  return str(path)


def _hotpot_file(tmp_path):
  data = [{"question": f"Where is item {i}?", "answer": f"PLACE{i}",
           "context": [[f"Title {i} {j}", [f"Item {i} is in PLACE{i}. " if j == 0 else "",
                                           hay.filler_text(30, seed=100 * i + j).strip()]]
                       for j in range(10)]} for i in range(3)]
  path = tmp_path / "hotpot.json"
  path.write_text(json.dumps(data))
  return str(path)


def test_qa_samples_from_local_files(tokenizer, tmp_path):
  for task, path in (("qa_1", _squad_file(tmp_path)), ("qa_2", _hotpot_file(tmp_path))):
    data = ruler.ruler_qa.load(task, path)
    for k in range(2):
      s = ruler.make_sample(task, tokenizer, None, 2048, seed=k, qa=data)
      assert 2048 - 32 - 400 <= len(s["ids"]) <= 2048 - 32 and s["metric"] == "string_match_part"
      text = tokenizer.decode(s["ids"])
      question = data.questions[k]
      assert f"Question: {question['query']}<|eot_id|>" in text
      assert all(data.docs[d] in text for d in question["context"])  # the gold paragraph(s)
      assert s["answers"] == question["outputs"] and s["answers"][0] in text
      numbers = [int(n) for n in re.findall(r"Document (\d+):\n", text)]
      assert numbers == list(range(1, len(numbers) + 1)) and len(numbers) > 10
  assert len(ruler.ruler_qa.load("qa_1", _squad_file(tmp_path)).questions) == 12  # 12 answerable
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"data": [{"paragraphs": [{"text": "x"}]}]}))
  with pytest.raises(ValueError, match="--squad"):
    ruler.ruler_qa.load("qa_1", str(bad))


def test_cli_end_to_end(tiny_model_dir, tokenizer_path, tmp_path, capsys):
  out = tmp_path / "out"
  res = ruler.main(["--ckpt", tiny_model_dir, "--tokenizer", tokenizer_path, "--out", str(out),
                    "--lengths", "1536,2048", "--samples", "1", "--max-new-tokens", "2",
                    "--batch-size", "12", "--prefill-chunk", "2048", "--dtype", "float32",
                    "--squad", _squad_file(tmp_path)])
  printed = capsys.readouterr()
  assert "qa_2 skipped: it needs a local HotpotQA" in printed.out + printed.err
  tasks = list(ruler_tasks.SYNTHETIC) + ["qa_1"]
  data = json.loads((out / "ruler.json").read_text())
  assert data["tasks"] == tasks and set(data["skipped"]) == {"qa_2"}
  assert all(set(data["scores"][t]) == {"1536", "2048"} for t in tasks)
  assert len(data["samples"]) == len(tasks) * 2
  assert all(r["prompt_tokens"] <= r["length"] - 2 for r in data["samples"])
  for n in ("1536", "2048"):  # the average row is the mean over the tasks
    assert data["average"][n] == pytest.approx(
        sum(data["scores"][t][n] for t in tasks) / len(tasks), abs=0.01)
  rows = list(csv.reader(open(out / "ruler.csv")))
  assert rows[0] == ["task", "1536", "2048", "mean"]
  assert [r[0] for r in rows[1:]] == tasks + ["average"]
  assert res["mean"] == pytest.approx(float(rows[-1][-1]))
  with open(out / "ruler.png", "rb") as f:
    assert f.read(4) == b"\x89PNG"
  assert len(list(csv.DictReader(open(out / "ruler_samples.csv")))) == len(tasks) * 2


def test_cli_errors(tiny_model_dir, tokenizer_path, tmp_path, flag_error):
  base = ["--ckpt", tiny_model_dir, "--tokenizer", tokenizer_path, "--out", str(tmp_path)]
  assert flag_error(ruler.main, base + ["--lengths", "1536", "--tasks", "niah_single_1,qa"]
                    ).startswith("--tasks")
  assert flag_error(ruler.main, base + ["--lengths", "3k"]).startswith("--lengths")
  assert flag_error(ruler.main, base + ["--lengths", "300"]).startswith("--lengths")  # too short
  # cwe fits 2048 but not 4096 with this tokenizer (30x common words from 4096 on)
  assert flag_error(ruler.main, base + ["--lengths", "2048,4096", "--tasks", "cwe"]).startswith(
      "--lengths: cwe at length 4096")
  assert flag_error(ruler.main, base + ["--lengths", "1536", "--samples", "0"]).startswith(
      "--samples")
  assert flag_error(ruler.main, base + ["--lengths", "1536", "--mesh", "data=16"]).startswith(
      "--mesh")
  assert flag_error(ruler.main, base + ["--lengths", "1536", "--squad", str(tmp_path / "no.json")]
                    ).startswith("--squad")
  damaged = tmp_path / "damaged"
  shutil.copytree(tiny_model_dir, damaged)
  os.truncate(damaged / "model.safetensors", 1000)
  assert flag_error(ruler.main, ["--ckpt", str(damaged)] + base[2:] + ["--lengths", "1536"]
                    ).startswith(f"--ckpt {damaged}: {damaged}/model.safetensors is not a readable")
  assert flag_error(ruler.main, base + ["--lengths", "1536", "--tasks", "vt", "--hotpotqa",
                                        _hotpot_file(tmp_path)]).startswith("--hotpotqa")
