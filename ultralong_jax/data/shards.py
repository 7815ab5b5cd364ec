"""The tokenized-corpus format `prepare` writes and the stage-1 pipeline reads.

A prepared directory holds one domain:
  manifest.json                          domain, tokenizer, vocab_size, counts, bad-input counts
  docs-00000-of-0000N.arrayrecord         one record per document: its token ids as
                                          little-endian int32 bytes (Llama 3's V = 128256 > 2^16)
  docs-00000-of-0000N.lengths.npy         int64 token count of each record, in record order
  docs-00000-of-0000N.crc32.npy           uint32 CRC-32 of each record's bytes, in record order
The length files let the pipeline plan length-based resampling and the domain mix without
reading a single document, so a 4M-token row is built without holding the corpus in RAM.

Integrity: the manifest records each shard's size in bytes and SHA-256 (`verify_checksums`
checks the whole files, e.g. after a copy). A pipeline checks the sizes when it is built (a
truncated copy fails before anything compiles) and each record's CRC-32 when it reads it (a
flipped bit fails at that record, for ~1 ms per 1M tokens). A damaged shard raises
DamagedShardError naming the file and record; with data.damaged_records=skip its records are
dropped instead and counted as `damaged_record` in the run's data stats. A corpus prepared
without these fields reads unchecked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import zlib
from typing import Any

import numpy as np

MANIFEST = "manifest.json"
TOKEN_DTYPE = np.dtype("<i4")
FORMAT_VERSION = 1


def shard_name(index: int, count: int) -> str:
  return f"docs-{index:05d}-of-{count:05d}.arrayrecord"


def lengths_name(shard: str) -> str:
  return shard[: -len(".arrayrecord")] + ".lengths.npy"


def crc32_name(shard: str) -> str:
  return shard[: -len(".arrayrecord")] + ".crc32.npy"


DAMAGED_MODES = ("error", "skip")


class DamagedShardError(ValueError):
  """A prepared shard whose bytes are not the ones `prepare` wrote."""


def record_crc32(record: bytes) -> int:
  return zlib.crc32(record) & 0xFFFFFFFF


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(1 << 22):
      digest.update(block)
  return digest.hexdigest()


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
  damaged: str = "error"  # data.damaged_records: what reading a damaged record does
  damaged_shards: frozenset[int] = frozenset()  # shards whose size is wrong (skip mode)

  @property
  def domain(self) -> str:
    return self.manifest["domain"]


def load_prepared(path: str, damaged: str = "error") -> PreparedCorpus:
  """Reads the manifest and length files and checks every shard's size against the manifest:
  a wrong size raises DamagedShardError naming the file, or with damaged="skip" marks the shard
  so that its records are skipped (and counted) when read."""
  if damaged not in DAMAGED_MODES:
    raise ValueError(f"data.damaged_records={damaged!r}; use one of {DAMAGED_MODES}.")
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
  bad = set()
  for i, (shard, info) in enumerate(zip(shards, manifest["shards"])):
    if "bytes" not in info:
      continue
    size = os.path.getsize(shard) if os.path.exists(shard) else None
    if size != info["bytes"]:
      what = "is missing" if size is None else f"has {size} bytes"
      message = (f"{shard} {what}, but {manifest_path} says {info['bytes']} (a truncated or "
                 "partial copy?)")
      if damaged == "error":
        raise DamagedShardError(f"{message}; copy it again or re-run prepare, or set "
                                "data.damaged_records=skip to skip and count its records.")
      logging.warning("%s; data.damaged_records=skip: its %d records will be skipped", message,
                      info["num_documents"])
      bad.add(i)
  return PreparedCorpus(path, manifest, shards, lengths, damaged, frozenset(bad))


def verify_checksums(corpus: PreparedCorpus) -> list[str]:
  """Reads every shard whole and compares its SHA-256 with the manifest's; returns the paths
  that differ (slow on a large corpus: for after a copy, not for every run)."""
  return [shard for shard, info in zip(corpus.shard_paths, corpus.manifest["shards"])
          if "sha256" in info and file_sha256(shard) != info["sha256"]]


class DocumentReader:
  """Random access to documents of one prepared corpus; opens each shard lazily per process,
  and checks each record's CRC-32 (when the corpus has them) as it reads it.

  Returns a document's tokens, or None for a damaged record when the corpus was loaded with
  damaged="skip" (else DamagedShardError names the shard and record).
  """

  def __init__(self, corpus: PreparedCorpus):
    self._shard_paths = corpus.shard_paths
    self._crc_paths = tuple(
        os.path.join(corpus.path, s["crc32"]) if "crc32" in s else None
        for s in corpus.manifest["shards"])
    sizes = [s["num_documents"] for s in corpus.manifest["shards"]]
    self._first = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    self._damaged, self._damaged_shards = corpus.damaged, corpus.damaged_shards
    self._sources: dict[int, Any] = {}
    self._crcs: dict[int, np.ndarray | None] = {}
    self._skipped = 0

  def __getstate__(self):
    # Grain pickles the pipeline into worker processes: ship paths, not open files.
    return {**self.__dict__, "_sources": {}, "_crcs": {}}

  def _locate(self, index: int) -> tuple[int, int]:
    shard = int(np.searchsorted(self._first, index, side="right") - 1)
    return shard, int(index) - int(self._first[shard])

  def __call__(self, index: int) -> np.ndarray | None:
    shard, record = self._locate(index)
    if shard in self._damaged_shards:
      return None  # skip mode (error mode raised when the corpus was loaded)
    try:
      if shard not in self._sources:
        import grain  # pylint: disable=import-outside-toplevel
        crc_path = self._crc_paths[shard]
        # The CRCs first: Grain reads from several threads, and one that finds the shard in
        # _sources goes on to look up its CRCs.
        self._crcs[shard] = np.load(crc_path) if crc_path else None
        self._sources[shard] = grain.sources.ArrayRecordDataSource([self._shard_paths[shard]])
      raw = self._sources[shard][record]
    except Exception as e:  # pylint: disable=broad-except  # riegeli/array_record errors vary
      return self._damaged_record(shard, record, f"unreadable: {type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200] if str(e) else ''}")
    crcs = self._crcs[shard]
    if crcs is not None and record_crc32(raw) != int(crcs[record]):
      return self._damaged_record(shard, record, "its CRC-32 does not match the one prepare "
                                  "recorded")
    return decode_doc(raw)

  def _damaged_record(self, shard: int, record: int, why: str) -> None:
    where = f"{self._shard_paths[shard]}: record {record}"
    if self._damaged == "skip":
      self._skipped += 1
      if self._skipped <= 5:  # the count is in the data stats; the log shows the first few
        logging.warning("%s is damaged (%s); skipped (data.damaged_records=skip)", where, why)
      return None
    raise DamagedShardError(f"{where} is damaged ({why}); copy the shard again or re-run "
                            "prepare, or set data.damaged_records=skip to skip and count "
                            "damaged records.")

  def where(self, index: int) -> str:
    """"shard path:record index" of a global document index."""
    shard, record = self._locate(index)
    return f"{self._shard_paths[shard]}:{record}"
