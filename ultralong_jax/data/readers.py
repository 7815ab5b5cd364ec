"""Streaming readers of raw text records: JSONL (plain/.gz), Parquet, ArrayRecord, TFDS.

Each reader yields, in file order, either `(text, where)` for a usable document or a
`bad_input.Dropped` marker; `where` is "path:line" (1-based JSONL line, 0-based row/record
index otherwise) so that strict mode and the logs point at the record. `prepare` streams them
once into tokenized ArrayRecord shards; the JSON helpers are shared with the chat source.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from typing import Any, Iterator

from ultralong_jax.data import bad_input as bi

Record = tuple[str, str] | bi.Dropped

FORMATS = ("jsonl", "parquet", "arrayrecord", "tfds")


def expand_paths(spec: str) -> list[str]:
  """Comma-separated paths or globs -> sorted list of files; FileNotFoundError if none."""
  paths: list[str] = []
  for part in (p.strip() for p in spec.split(",")):
    if part:
      matched = sorted(glob.glob(part)) if glob.has_magic(part) else [part]
      paths.extend(p for p in matched if os.path.isfile(p) or not glob.has_magic(part))
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing or not paths:
    raise FileNotFoundError(f"no input files for {spec!r}" + (f": missing {missing}" if missing
                                                              else " (the globs match nothing)"))
  return paths


def guess_format(path: str) -> str:
  name = path[:-3] if path.endswith(".gz") else path
  if name.endswith((".jsonl", ".json", ".ndjson")):
    return "jsonl"
  if name.endswith(".parquet"):
    return "parquet"
  if name.endswith((".arrayrecord", ".array_record")) or ".array_record-" in name:
    return "arrayrecord"
  raise ValueError(f"cannot tell the format of {path}; pass --format ({'|'.join(FORMATS)})")


def parse_json_line(raw: bytes, where: str, strict: bool) -> dict[str, Any] | bi.Dropped:
  """One JSONL line -> a JSON object, or Dropped (invalid UTF-8, malformed, not an object)."""
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    return bi.reject(bi.INVALID_UTF8, where, str(e), strict)
  if not text.strip():
    return bi.reject(bi.EMPTY_DOCUMENT, where, "blank line", strict)
  try:
    obj = json.loads(text)
  except json.JSONDecodeError as e:
    return bi.reject(bi.MALFORMED_JSON, where, str(e), strict)
  if not isinstance(obj, dict):
    return bi.reject(bi.MALFORMED_JSON, where, f"expected a JSON object, got {type(obj).__name__}",
                     strict)
  return obj


def text_field(obj: dict[str, Any], field: str, where: str, strict: bool) -> Record:
  """Pulls the document text out of a record."""
  if field not in obj or obj[field] is None:
    return bi.reject(bi.MISSING_FIELD, where, f"no {field!r} field", strict)
  value = obj[field]
  if isinstance(value, bytes):
    try:
      value = value.decode("utf-8")
    except UnicodeDecodeError as e:
      return bi.reject(bi.INVALID_UTF8, where, str(e), strict)
  if not isinstance(value, str):
    return bi.reject(bi.INVALID_FIELD, where, f"{field!r} is {type(value).__name__}, not text",
                     strict)
  if not value.strip():
    return bi.reject(bi.EMPTY_DOCUMENT, where, f"{field!r} is empty", strict)
  return value, where


def open_maybe_gzip(path: str):
  return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def read_jsonl(path: str, field: str, strict: bool) -> Iterator[Record]:
  with open_maybe_gzip(path) as f:
    for line_no, raw in enumerate(f, 1):
      where = f"{path}:{line_no}"
      obj = parse_json_line(raw.rstrip(b"\r\n"), where, strict)
      yield obj if isinstance(obj, bi.Dropped) else text_field(obj, field, where, strict)


def read_parquet(path: str, field: str, strict: bool) -> Iterator[Record]:
  try:
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("Parquet input needs pyarrow: pip install pyarrow") from e
  pf = pq.ParquetFile(path)
  if field not in pf.schema_arrow.names:
    yield bi.reject(bi.MISSING_FIELD, f"{path}:0", f"no column {field!r} "
                    f"(columns: {pf.schema_arrow.names})", strict)
    return
  row = 0
  for batch in pf.iter_batches(columns=[field], batch_size=1024):
    for value in batch.column(0).to_pylist():
      yield text_field({field: value}, field, f"{path}:{row}", strict)
      row += 1


def read_arrayrecord(path: str, field: str, strict: bool) -> Iterator[Record]:
  """Records are UTF-8 JSON objects holding `field`, or plain UTF-8 text when field == ""."""
  from array_record.python import array_record_module as arm  # pylint: disable=import-outside-toplevel
  reader = arm.ArrayRecordReader(path)
  try:
    for i in range(reader.num_records()):
      raw = reader.read([i])[0]
      where = f"{path}:{i}"
      if not field:
        yield text_field({"text": raw}, "text", where, strict)
        continue
      obj = parse_json_line(raw, where, strict)
      yield obj if isinstance(obj, bi.Dropped) else text_field(obj, field, where, strict)
  finally:
    reader.close()


def read_tfds(name: str, data_dir: str, split: str, field: str, strict: bool) -> Iterator[Record]:
  """A TFDS dataset already prepared under `data_dir` (no download: machines are offline).

  ArrayRecord datasets are read without TensorFlow (see tfds_source); TFRecord-only ones
  through TensorFlow when it is installed, else the error names the conversion command.
  """
  from ultralong_jax.data import tfds_source  # pylint: disable=import-outside-toplevel
  return tfds_source.iter_texts(name, data_dir, split, field, strict, key="--tfds_name")


def check_tfds(name: str, data_dir: str, split: str) -> None:
  """Raises what `read_tfds` would, before any work starts (package, dataset, split, format)."""
  from ultralong_jax.data import tfds_source  # pylint: disable=import-outside-toplevel
  tfds_source.check_readable(name, data_dir, split, key="--tfds_name")


def read_records(path: str, fmt: str, field: str, strict: bool) -> Iterator[Record]:
  """Dispatches on format; `path` is a file (or "name:split" for tfds, see prepare)."""
  if fmt == "jsonl":
    return read_jsonl(path, field, strict)
  if fmt == "parquet":
    return read_parquet(path, field, strict)
  if fmt == "arrayrecord":
    return read_arrayrecord(path, field, strict)
  raise ValueError(f"unknown format {fmt!r}; use one of {FORMATS}")
