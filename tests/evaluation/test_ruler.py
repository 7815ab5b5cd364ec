"""RULER-style tasks: every sample has its length and contains its answers; outputs are complete."""

import collections
import json
import re

import pytest

from ultralong_jax.evaluation import haystack as hay, ruler


@pytest.mark.parametrize("task", ruler.TASKS)
def test_samples_have_length_and_answers(task, tokenizer):
  haystack = hay.Haystack(tokenizer, hay.filler_text(4000, seed=2))
  for length in (400, 1500):
    s = ruler.make_sample(task, tokenizer, haystack, length, seed=1)
    assert abs(len(s["ids"]) - length) <= 0.01 * length
    text = tokenizer.decode(s["ids"])
    for answer in s["answers"]:
      assert answer in text
    if task == "niah_multikey":
      assert len(re.findall(r"special magic numbers for", text)) == 4
    if task == "variable_tracking":  # the chain is in order: X1 = value, then Xi = X(i-1)
      names = s["answers"]
      positions = [text.index(f"VAR {n} =") for n in names]
      assert positions == sorted(positions)
      assert all(f"VAR {b} = VAR {a}." in text for a, b in zip(names, names[1:]))
    if task == "common_words":  # the answers are the 10 most frequent list entries
      counts = collections.Counter(re.findall(r"\d+\. (\w+)\n", text))
      tenth = sorted(counts.values(), reverse=True)[9]
      assert all(counts[w] >= tenth for w in s["answers"])


def test_samples_are_seeded(tokenizer):
  haystack = hay.Haystack(tokenizer, hay.filler_text(2000))
  a = ruler.make_sample("niah_multivalue", tokenizer, haystack, 500, seed=3)
  assert a == ruler.make_sample("niah_multivalue", tokenizer, haystack, 500, seed=3)
  assert a != ruler.make_sample("niah_multivalue", tokenizer, haystack, 500, seed=4)


def test_run_ruler_outputs(tiny_model, tokenizer, tmp_path):
  res = ruler.run_ruler(tiny_model, tokenizer, lengths=[400, 512], out_dir=str(tmp_path),
                        samples=1, max_new_tokens=3, batch_size=2, progress=False,
                        prefill_chunk=256)
  assert set(res["scores"]) == set(ruler.TASKS)
  assert all(set(v) == {400, 512} for v in res["scores"].values())
  assert len(res["samples"]) == len(ruler.TASKS) * 2
  data = json.load(open(res["paths"]["json"]))
  assert set(data["average"]) == {"400", "512"}
  with open(res["paths"]["png"], "rb") as f:
    assert f.read(4) == b"\x89PNG"


def test_cli_errors(tiny_model_dir, tokenizer_path, tmp_path, flag_error):
  base = ["--ckpt", tiny_model_dir, "--tokenizer", tokenizer_path, "--out", str(tmp_path)]
  assert flag_error(ruler.main, base + ["--lengths", "300", "--tasks", "niah_multikey,qa"]
                    ).startswith("--tasks")
  assert flag_error(ruler.main, base + ["--lengths", "3k"]).startswith("--lengths")
  assert flag_error(ruler.main, base + ["--lengths", "40"]).startswith("--lengths")  # too short
  assert flag_error(ruler.main, base + ["--lengths", "300", "--samples", "0"]).startswith(
      "--samples")
  assert flag_error(ruler.main, base + ["--lengths", "300", "--mesh", "data=16"]).startswith(
      "--mesh")
