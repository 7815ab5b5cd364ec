"""Needle-in-a-haystack grid construction, scoring and output formats (tiny random model).

The tiny random model cannot retrieve anything (scores ~0); these tests check that prompts are
what the grid asks for and that every output is complete and well-formed.
"""

import csv
import json

import numpy as np
import pytest

from ultralong_jax.evaluation import generate as gen, haystack as hay, niah, scoring


def test_default_grid_is_the_papers():
  lengths = niah.default_lengths(1 << 20)
  assert len(lengths) == 40 and lengths[-1] == 1 << 20
  np.testing.assert_allclose(np.diff(lengths), (1 << 20) / 40, atol=1)  # evenly spaced
  depths = niah.default_depths()
  assert len(depths) == 10 and depths[0] == 0.0 and depths[-1] == 1.0


@pytest.mark.parametrize("chat", [True, False])
def test_prompts_have_target_length_and_needle_at_depth(tokenizer, chat):
  haystack = hay.Haystack(tokenizer, hay.filler_text(3000, seed=1))
  lengths, depths = [300, 1000, 2500], [0.0, 0.1, 0.33, 0.5, 0.9, 1.0]
  cells = niah.make_cells(tokenizer, haystack, lengths, depths, needle="passkey", chat=chat)
  assert len(cells) == len(lengths) * len(depths)
  for cell in cells:
    ids, start = cell.prompt.ids, cell.prompt.needle_start
    assert abs(len(ids) - cell.length) <= 0.01 * cell.length  # the bound; in fact exact
    assert len(ids) == cell.length
    needle_ids = tokenizer.encode(cell.needle.text)
    assert ids[start:start + len(needle_ids)] == needle_ids
    # The needle's depth in the haystack, recomputed from the prompt itself.
    prefix, suffix = hay.prompt_parts(tokenizer, cell.needle.question, chat=chat)
    assert ids[:len(prefix)] == prefix and ids[len(ids) - len(suffix):] == suffix
    n_hay = len(ids) - len(prefix) - len(suffix) - len(needle_ids)
    depth = (start - len(prefix)) / n_hay
    assert depth == pytest.approx(cell.prompt.depth_actual)
    assert abs(depth - cell.depth) <= 0.01 + 1 / n_hay  # moved back to a sentence end at most 1%
    # The needle lands between sentences, and its number is the only number in the text.
    text = tokenizer.decode(ids)
    assert cell.needle.text.strip() in text
    assert scoring.passkey_exact(text, cell.needle.answer) == 1.0
    assert len(set(c for c in text if c.isdigit()) - set(cell.needle.answer + "0123456789")) == 0


def test_passkeys_differ_per_cell_and_are_seeded(tokenizer):
  haystack = hay.Haystack(tokenizer, hay.filler_text(500))
  keys = lambda seed: [c.needle.answer for c in niah.make_cells(  # noqa: E731
      tokenizer, haystack, [200, 300], [0.0, 1.0], seed=seed)]
  assert len(set(keys(0))) == 4 and keys(0) == keys(0) and keys(0) != keys(1)


def test_scoring_hand_computed():
  assert scoring.passkey_exact("The number is 1234567.", "1234567") == 1.0
  assert scoring.passkey_exact("12345678", "1234567") == 0.0
  assert scoring.passkey_exact("123 4567", "1234567") == 0.0
  ref = "eat a sandwich and sit in Dolores Park on a sunny day"  # 11 distinct words
  assert scoring.word_recall("Eat a sandwich in Dolores Park!", ref) == pytest.approx(6 / 11)
  assert scoring.word_recall("", ref) == 0.0
  assert scoring.all_present("keys: ALPHA and beta", ["alpha", "beta", "gamma"]) == pytest.approx(
      2 / 3)
  with pytest.raises(ValueError, match="kind"):
    scoring.score("fuzzy", "a", "b")


def test_by_distance_bands_cells_by_needle_to_end_distance():
  # distances 128 - 10 = 118, 256 - 100 = 156, 512 - 12 = 500, 512 - 256 = 256
  cells = [{"prompt_tokens": 128, "needle_start": 10, "score": 1.0},
           {"prompt_tokens": 256, "needle_start": 100, "score": 0.0},
           {"prompt_tokens": 512, "needle_start": 12, "score": 0.0},
           {"prompt_tokens": 512, "needle_start": 256, "score": 1.0}]
  result = niah.NiahResults([128, 256, 512], [0.0], np.zeros((1, 3)), cells, {})
  assert result.by_distance([128, 256]) == [
      {"band": "<= 128", "cells": 1, "score": 1.0},
      {"band": "129-256", "cells": 2, "score": 0.5},
      {"band": "> 256", "cells": 1, "score": 0.0}]
  assert result.by_distance([64]) == [{"band": "> 64", "cells": 4, "score": 0.5}]


def test_run_niah_writes_every_cell(tiny_model, tokenizer, tmp_path):
  lengths, depths = [256, 384], [0.0, 0.5, 1.0]
  res = niah.run_niah(tiny_model, tokenizer, lengths=lengths, depths=depths,
                      out_dir=str(tmp_path), max_new_tokens=4, batch_size=2, training_length=100,
                      progress=False, prefill_chunk=128)
  assert res.scores.shape == (3, 2) and len(res.cells) == 6
  # The random model answers garbage: scores are ~0, but each is a valid score of its answer.
  for row in res.cells:
    assert row["prompt_tokens"] == row["length"]
    assert row["score"] == scoring.passkey_exact(row["answer"], row["expected"])
  data = json.load(open(res.paths["json"]))
  assert len(data["cells"]) == 6 and np.array(data["scores"]).shape == (3, 2)
  assert data["settings"]["lengths"] == lengths
  with open(res.paths["csv"]) as f:
    rows = list(csv.DictReader(f))
  assert [(int(r["length"]), float(r["depth"])) for r in rows] == [
      (n, d) for n in lengths for d in depths]
  assert tuple(rows[0]) == niah.CSV_FIELDS
  with open(res.paths["heatmap"], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  # A cell's answer is what greedy generation gives for its prompt alone.
  cell = niah.make_cells(tokenizer, hay.Haystack(tokenizer, hay.filler_text(20_000, 0)),
                         [384], [0.5])[0]
  out = gen.generate(tiny_model, [cell.prompt.ids], max_new_tokens=4,
                     stop_tokens=gen.stop_ids(tokenizer))[0]
  stops = gen.stop_ids(tokenizer)
  assert tokenizer.decode([t for t in out if t not in stops]) == res.cells[4]["answer"]


def test_workers_give_the_same_cells_and_a_second_model_reuses_the_programs(
    tiny_model, tiny_model_dir, tokenizer, tmp_path):
  import ultralong_jax
  lengths, depths = [192, 256, 320], [0.0, 1.0]
  kwargs = dict(lengths=lengths, depths=depths, max_new_tokens=4, progress=False, kv_block=40)
  first = gen.CachedModel(tiny_model, kv_block=40)
  serial = niah.run_niah(tiny_model, tokenizer, out_dir=str(tmp_path / "a"), cached_model=first,
                         **kwargs)
  compiled = {k: f._cache_size() for k, f in first._compiled.items()}
  assert sum(compiled.values()) == 2 * len(lengths)  # one prefill and one decode loop per length
  # Another instance of the same architecture (the demo's stage 2 after stage 1) runs the
  # programs already compiled; three threads give every cell the one-thread answer, in order.
  other = ultralong_jax.from_pretrained(tiny_model_dir)
  second = gen.CachedModel(other, kv_block=40)
  threaded = niah.run_niah(other, tokenizer, out_dir=str(tmp_path / "b"), workers=3,
                           cached_model=second, **kwargs)
  assert threaded.cells == serial.cells
  np.testing.assert_array_equal(threaded.scores, serial.scores)
  assert {k: f._cache_size() for k, f in second._compiled.items()} == compiled
  # A different kv_block is a different program: nothing shared.
  assert not gen.CachedModel(other, kv_block=24)._compiled
  with pytest.raises(ValueError, match="workers"):
    niah.run_niah(other, tokenizer, out_dir=str(tmp_path / "c"), workers=0, **kwargs)


def test_cli_with_haystack_files_and_sentence_needle(tiny_model_dir, tokenizer_path, tmp_path):
  essay = tmp_path / "essay.txt"
  essay.write_text(hay.filler_text(800, seed=3))
  out = tmp_path / "out"
  res = niah.main(["--ckpt", tiny_model_dir, "--tokenizer", tokenizer_path, "--out", str(out),
                   "--dtype", "float32", "--lengths", "256,320", "--depths", "0,100",
                   "--haystack", str(essay), "--needle", "sentence", "--max-new-tokens", "3",
                   "--mesh", "sequence=2"])
  assert res.scores.shape == (2, 2)
  assert all(r["kind"] == "sentence" for r in res.cells)
  assert (out / "niah_heatmap.png").exists()


def test_cli_on_a_data_mesh_pads_the_batch(tiny_model, tiny_model_dir, tokenizer,
                                           tokenizer_path, tmp_path):
  # data=2 x sequence=4 with one prompt per batch (--batch-size 1): each batch is padded to 2 rows.
  res = niah.main(["--ckpt", tiny_model_dir, "--tokenizer", tokenizer_path, "--out",
                   str(tmp_path), "--dtype", "float32", "--lengths", "256", "--depths", "0,100",
                   "--max-new-tokens", "3", "--mesh", "data=2,sequence=4"])
  assert res.scores.shape == (2, 1)
  # Each answer is what single-device generation gives for the cell's prompt.
  cells = niah.make_cells(tokenizer, hay.Haystack(tokenizer, hay.filler_text(20_000, 0)), [256],
                          [0.0, 1.0])
  stops = gen.stop_ids(tokenizer)
  outs = gen.generate(tiny_model, [c.prompt.ids for c in cells], max_new_tokens=3,
                      stop_tokens=stops)
  assert [r["answer"] for r in res.cells] == [
      tokenizer.decode([t for t in out if t not in stops]) for out in outs]


def test_cli_bad_mesh_is_refused_before_loading(tiny_model_dir, tokenizer_path, tmp_path,
                                               flag_error, monkeypatch):
  import ultralong_jax

  def no_loading(*args, **kwargs):
    raise AssertionError("the model was loaded before the flags were checked")

  monkeypatch.setattr(ultralong_jax, "from_pretrained", no_loading)
  base = ["--ckpt", tiny_model_dir, "--tokenizer", tokenizer_path, "--out", str(tmp_path),
          "--lengths", "256"]
  for mesh, says in [("sequence4", "axis=size pairs"), ("seq=4", "unknown mesh axes ['seq']"),
                     ("sequence=16", "8 devices"), ("sequence=0", ">= 1"),
                     ("data=2,data=2", "twice"), ("tensor=4", "use tensor in [1, 2]")]:
    message = flag_error(niah.main, base + ["--mesh", mesh])
    assert message.startswith(f"--mesh='{mesh}'") and says in message, message
  # The mesh is checked first: a missing checkpoint is not even looked at.
  assert flag_error(niah.main, ["--ckpt", str(tmp_path / "none"), "--tokenizer", "none", "--out",
                                str(tmp_path), "--mesh", "seq=4"]).startswith("--mesh")


def test_cli_bad_inputs_name_the_flag(tiny_model_dir, tokenizer_path, tmp_path, flag_error):
  base = ["--ckpt", tiny_model_dir, "--tokenizer", tokenizer_path, "--out", str(tmp_path)]
  assert "--haystack" in flag_error(niah.main, base + ["--haystack", str(tmp_path / "none.txt")])
  bad = tmp_path / "bad.txt"
  bad.write_bytes(b"\xff\xfe\x00bad")
  assert flag_error(niah.main, base + ["--haystack", str(bad)]).startswith(f"--haystack: {bad}")
  assert flag_error(niah.main, ["--ckpt", str(tmp_path / "nope"), "--tokenizer", tokenizer_path,
                                "--out", "x"]).startswith("--ckpt")
  assert flag_error(niah.main, ["--ckpt", tiny_model_dir, "--tokenizer", str(tmp_path / "t"),
                                "--out", "x"]).startswith("--tokenizer")
  for flags, name in [(["--depths", "0,150", "--lengths", "128"], "--depths"),
                      (["--lengths", "3k"], "--lengths"),
                      (["--lengths", "20"], "--lengths"),  # no room for the haystack
                      (["--min-length", "9000"], "--min-length"),  # above max_position_embeddings
                      (["--batch-size", "0"], "--batch-size"),
                      (["--workers", "0"], "--workers"),
                      (["--num-lengths", "0"], "--num-lengths"),
                      (["--kv-block", "0"], "--kv-block"),
                      (["--needle", "The key is under the mat."], "--needle")]:
    message = flag_error(niah.main, base + flags)
    assert message.startswith(name), message
