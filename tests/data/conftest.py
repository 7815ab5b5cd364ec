"""Fixtures for the data tests: tiny tokenizers trained here (no network) and generated corpora."""

from __future__ import annotations

import json
import os
import random

import pytest

from ultralong_jax.data.tokenizer import LLAMA3_SPECIAL_TOKENS

WORDS = ("the cat sat on a mat while long context models read whole books about rivers, "
         "numbers 12 345 and 6789; questions? answers! data pipelines pack tokens into rows "
         "ünïcödé 漢字 emoji 🙂 tab\tnew\nline").split(" ")


def random_text(rng: random.Random, n_words: int) -> str:
  return " ".join(rng.choice(WORDS) for _ in range(n_words))


def training_texts(n: int = 400, seed: int = 0) -> list[str]:
  rng = random.Random(seed)
  return [random_text(rng, rng.randint(5, 60)) for _ in range(n)] + [
      "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n", "\n\n", "system",
      "user", "assistant"]


def build_hf_tokenizer(path: str, vocab_size: int = 600) -> str:
  """A byte-level BPE shaped like Llama 3's (same split regex and special tokens)."""
  from ultralong_jax.data import synthetic
  return synthetic.build_tokenizer(path, vocab_size, texts=training_texts())


def build_sp_model(prefix: str, vocab_size: int = 500) -> str:
  """A SentencePiece BPE model with the Llama 3 special tokens as user-defined symbols."""
  import sentencepiece as spm
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(training_texts()), model_prefix=prefix, vocab_size=vocab_size,
      model_type="bpe", user_defined_symbols=list(LLAMA3_SPECIAL_TOKENS),
      normalization_rule_name="identity", remove_extra_whitespaces=False, byte_fallback=True,
      character_coverage=1.0, minloglevel=2)
  return prefix + ".model"


@pytest.fixture(scope="session")
def hf_tokenizer_path(tmp_path_factory) -> str:
  return build_hf_tokenizer(str(tmp_path_factory.mktemp("hf_tok") / "tokenizer.json"))


@pytest.fixture(scope="session")
def sp_model_path(tmp_path_factory) -> str:
  return build_sp_model(str(tmp_path_factory.mktemp("sp_tok") / "sp"))


def write_jsonl(path: str, records: list) -> str:
  """Writes records (dicts, or raw str/bytes lines written as they are)."""
  import gzip
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "wb") as f:
    for r in records:
      if isinstance(r, bytes):
        f.write(r + b"\n")
      elif isinstance(r, str):
        f.write(r.encode() + b"\n")
      else:
        f.write(json.dumps(r).encode() + b"\n")
  return path


def text_corpus(n_docs: int, seed: int, min_words: int = 3, max_words: int = 200) -> list[dict]:
  rng = random.Random(seed)
  return [{"text": random_text(rng, rng.randint(min_words, max_words)), "id": i}
          for i in range(n_docs)]


@pytest.fixture
def tmp(tmp_path) -> str:
  return os.fspath(tmp_path)


@pytest.fixture(scope="session")
def jsonl_writer():
  """`write_jsonl` for test modules (importlib import mode keeps conftest off sys.path)."""
  return write_jsonl
