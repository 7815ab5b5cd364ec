"""The demo's data step: domains made in a background process give the files made one by one."""

import filecmp
import json
import os

from ultralong_jax import demo


def _files(root):
  return sorted(os.path.relpath(os.path.join(d, f), root)
                for d, _, files in os.walk(root) for f in files)


def test_make_data_in_two_processes_writes_the_files_of_one(tmp_path):
  corpus = {
      "vocab_size": 512,
      "documents": {
          "short": {"docs": 300, "min_sentences": 1, "max_sentences": 10,
                    "passkey_fraction": 1.0, "repeat": 0.0, "tokens": (72, 127), "recalls": 1,
                    "seed": 0},
          "long": {"docs": 60, "min_sentences": 10, "max_sentences": 50,
                   "passkey_fraction": 0.9, "repeat": 0.0, "tokens": (128, 400), "recalls": 1,
                   "seed": 1},
      },
      "chats": {"count": 30, "max_sentences": 20, "seed": 2},
  }
  made = demo.make_data(str(tmp_path / "made"), 1, quick=False, corpus=corpus)
  # The reference: the same steps one after another in this process.
  ref = tmp_path / "ref"
  ref.mkdir()
  from ultralong_jax.data import synthetic
  tokenizer = synthetic.build_tokenizer(str(ref / "tokenizer.json"), corpus["vocab_size"])
  make_documents = demo._make_documents  # pylint: disable=protected-access
  for domain, spec in corpus["documents"].items():
    make_documents(str(ref), domain, spec, tokenizer, quick=False, progress=False)
  synthetic.write_chats(str(ref / "chats.jsonl"), 30, seed=2, max_sentences=20)
  names = _files(ref)
  assert _files(tmp_path / "made") == names
  assert {"short.jsonl", "long.jsonl", "chats.jsonl", "tokenizer.json"} <= set(names)
  assert sum(n.startswith("long/") for n in names) >= 4  # its shards and manifest
  same = [n for n in names if filecmp.cmp(ref / n, tmp_path / "made" / n, shallow=False)]
  # Every file is equal byte for byte but the manifests, which name their tokenizer and sources
  # by path and say when they were written.
  manifests = {"short/manifest.json", "long/manifest.json"}
  assert set(names) - set(same) <= manifests
  for name in manifests:
    a, b = (json.load(open(root / name)) for root in (ref, tmp_path / "made"))
    assert {k for k in a if a[k] != b[k]} <= {"tokenizer", "sources", "created"}, name
    assert a["shards"] == b["shards"] and a["num_tokens"] == b["num_tokens"] > 0
  assert made["tokenizer"] == str(tmp_path / "made" / "tokenizer.json")
