"""The tokenized-corpus format `prepare` writes and the stage-1 pipeline reads.

A prepared directory holds one domain:
  manifest.json                          domain, tokenizer, vocab_size, counts, bad-input counts
  docs-00000-of-0000N.arrayrecord         one record per document: its token ids as
                                          little-endian int32 bytes (Llama 3's V = 128256 > 2^16)
  docs-00000-of-0000N.lengths.npy         int64 token count of each record, in record order
The length files let the pipeline plan length-based resampling and the domain mix without
reading a single document, so a 4M-token row is built without holding the corpus in RAM.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

MANIFEST = "manifest.json"
TOKEN_DTYPE = np.dtype("<i4")
FORMAT_VERSION = 1


def shard_name(index: int, count: int) -> str:
  return f"docs-{index:05d}-of-{count:05d}.arrayrecord"


def lengths_name(shard: str) -> str:
  return shard[: -len(".arrayrecord")] + ".lengths.npy"


def encode_doc(tokens: np.ndarray) -> bytes:
  return np.asarray(tokens, TOKEN_DTYPE).tobytes()


def decode_doc(record: bytes) -> np.ndarray:
  return np.frombuffer(record, TOKEN_DTYPE).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class PreparedCorpus:
  """A prepared directory: shard paths, per-document lengths and the manifest."""
  path: str
  manifest: dict[str, Any]
  shard_paths: tuple[str, ...]
  lengths: np.ndarray  # [num_documents] int64, documents in global record order

  @property
  def domain(self) -> str:
    return self.manifest["domain"]


def load_prepared(path: str) -> PreparedCorpus:
  manifest_path = os.path.join(path, MANIFEST)
  if not os.path.exists(manifest_path):
    raise FileNotFoundError(f"{manifest_path} not found: prepare the corpus first with "
                            "`python -m ultralong_jax.data.prepare --output_dir ...`")
  with open(manifest_path) as f:
    manifest = json.load(f)
  if manifest.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{manifest_path}: format_version {manifest.get('format_version')} "
                     f"!= {FORMAT_VERSION}; re-run prepare")
  shards = tuple(os.path.join(path, s["file"]) for s in manifest["shards"])
  lengths = [np.load(os.path.join(path, s["lengths"])) for s in manifest["shards"]]
  lengths = np.concatenate(lengths).astype(np.int64) if lengths else np.zeros(0, np.int64)
  if len(lengths) != manifest["num_documents"]:
    raise ValueError(f"{path}: length files hold {len(lengths)} documents, manifest says "
                     f"{manifest['num_documents']}")
  return PreparedCorpus(path, manifest, shards, lengths)


class DocumentReader:
  """Random access to documents of one prepared corpus; opens its files lazily per process."""

  def __init__(self, corpus: PreparedCorpus):
    self._shard_paths = corpus.shard_paths
    sizes = [s["num_documents"] for s in corpus.manifest["shards"]]
    self._first = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    self._source = None

  def __getstate__(self):
    # Grain pickles the pipeline into worker processes: ship paths, not open files.
    return {**self.__dict__, "_source": None}

  def __call__(self, index: int) -> np.ndarray:
    if self._source is None:
      import grain  # pylint: disable=import-outside-toplevel
      self._source = grain.sources.ArrayRecordDataSource(list(self._shard_paths))
    return decode_doc(self._source[int(index)])

  def where(self, index: int) -> str:
    """"shard path:record index" of a global document index."""
    shard = int(np.searchsorted(self._first, index, side="right") - 1)
    return f"{self._shard_paths[shard]}:{int(index) - int(self._first[shard])}"
