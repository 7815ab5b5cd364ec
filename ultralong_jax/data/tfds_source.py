"""TensorFlow Datasets on local disk as Grain sources, without TensorFlow.

A TFDS dataset prepared in a random-access file format (ArrayRecord, the format `tfds build
--file_format=array_record` writes) is read through `tfds.data_source(name, split=...,
data_dir=..., download=False)`: a sequence whose items are decoded examples (Text features as
UTF-8 bytes), read at random by Grain's reader threads. tensorflow-datasets is an optional
extra (`pip install -r requirements-tfds.txt`); TensorFlow is not needed.

A dataset is named by a spec "name:split": `name` may carry a config and a version
("c4/en:3.0.1"), `split` is any TFDS split expression ("train", "train[:10%]").

  TfdsSource        item i -> (example, "tfds:name/split:i"); stage-2 chats and `prepare`
  chat_from_example a `messages` feature -> {"messages": [{"role", "content"}, ...]}
  TfdsDocuments     stage-1 documents tokenized on the fly: the token count of every document
                    (for the resampling plan) from one pass at build time, cached on disk
  iter_texts        a sequential pass for `prepare`, through TensorFlow for TFRecord-only
                    datasets when TensorFlow is installed

A TFRecord dataset is not random access; the error names `tfds convert_format`, which converts
it once to ArrayRecord (that conversion reads TFRecord, so it runs where TensorFlow is installed).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import tempfile
from typing import Any, Iterator, Mapping

import numpy as np

from ultralong_jax.data import bad_input as bi

REQUIREMENTS_FILE = "requirements-tfds.txt"
DEFAULT_TEXT_FIELD = "text"

# "name[/config][:x.y.z]:split"; a split may itself hold colons ("train[:10%]").
_SPEC = re.compile(r"(?P<name>[A-Za-z0-9_]+(?:/[A-Za-z0-9_.-]+)?(?::\d+\.\d+\.\d+)?):(?P<split>.+)")


def parse_spec(spec: str, key: str) -> tuple[str, str]:
  """"name:split" -> (name, split); ValueError naming `key` otherwise."""
  match = _SPEC.fullmatch(spec.strip()) if isinstance(spec, str) else None
  if match is None:
    raise ValueError(f"{key}: got {spec!r}; write the TFDS dataset as \"name:split\" "
                     "(e.g. \"my_corpus:train\", \"c4/en:3.0.1:train[:10%]\").")
  return match["name"], match["split"]


def check_installed(key: str) -> None:
  """ImportError naming `key` and the extra when tensorflow-datasets is missing (no import)."""
  if importlib.util.find_spec("tensorflow_datasets") is None:
    raise ImportError(_missing_message(key))


def _missing_message(key: str) -> str:
  return (f"{key} names a TFDS dataset, which needs the optional tensorflow-datasets package: "
          f"pip install -r {REQUIREMENTS_FILE} (TensorFlow is not needed for datasets in the "
          "ArrayRecord format).")


def _import_tfds(key: str):
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(_missing_message(key)) from e
  return tfds


def convert_command(builder) -> str:
  return (f"tfds convert_format --dataset_version_dir={builder.data_dir} "
          "--out_file_format=array_record")


def _builder(tfds, name: str, data_dir: str, key: str):
  """The builder of a dataset already prepared under `data_dir`; nothing is downloaded."""
  if not data_dir or not os.path.isdir(data_dir):
    raise FileNotFoundError(f"{key}: TFDS data_dir {data_dir!r} is not a directory; give the "
                            "local directory that holds the prepared dataset.")
  build_hint = ("prepare it in the ArrayRecord format where the network is reachable, e.g. "
                f"tfds.builder({name!r}, data_dir={data_dir!r}, file_format='array_record')"
                ".download_and_prepare(), and copy it there.")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise FileNotFoundError(f"{key}: no TFDS dataset {name!r} under {data_dir}; "
                            + build_hint) from None
  if not builder.is_prepared():
    raise FileNotFoundError(f"{key}: TFDS dataset {name!r} is not prepared under {data_dir}; "
                            + build_hint)
  return builder


def _random_access(tfds, builder) -> bool:
  formats = tfds.core.file_adapters.FileFormat.with_random_access()
  return bool(builder.info.available_file_formats() & formats)


def _tfrecord_only_message(builder, name: str, key: str) -> str:
  formats = sorted(f.value for f in builder.info.available_file_formats())
  return (f"{key}: TFDS dataset {name!r} in {builder.data_dir} is stored as {formats}, which is "
          "not random access. Convert it once to ArrayRecord (the conversion reads TFRecord, so "
          "run it where TensorFlow is installed, e.g. pip install tensorflow-cpu): "
          f"{convert_command(builder)}")


def open_data_source(spec: str, data_dir: str, key: str):
  """tfds.data_source of a random-access dataset; clear errors naming `key` otherwise."""
  tfds = _import_tfds(key)
  name, split = parse_spec(spec, key)
  builder = _builder(tfds, name, data_dir, key)
  if not _random_access(tfds, builder):
    raise ValueError(_tfrecord_only_message(builder, name, key))
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except ValueError as e:  # unknown split, bad slice
    raise ValueError(f"{key}: {spec!r}: {e}") from None


class TfdsSource:
  """A `grain.RandomAccessDataSource` over one TFDS split: item i -> (example, where).

  Grain pickles sources into its worker processes; the open data source stays behind and each
  process reopens it on first read.
  """

  def __init__(self, spec: str, data_dir: str, key: str):
    self.spec, self.data_dir, self.key = spec, data_dir, key
    self.name, self.split = parse_spec(spec, key)
    self._source = open_data_source(spec, data_dir, key)
    self._len = len(self._source)
    # The dataset's version directory (dataset_info.json and the record files).
    self.dataset_dir = str(self._source.dataset_info.data_dir)

  def __len__(self) -> int:
    return self._len

  def where(self, index: int) -> str:
    return f"tfds:{self.name}/{self.split}:{int(index)}"

  def example(self, index: int) -> Mapping[str, Any]:
    if self._source is None:
      self._source = open_data_source(self.spec, self.data_dir, self.key)
    return self._source[int(index)]

  def __getitem__(self, index: int) -> tuple[Mapping[str, Any], str]:
    index = int(index)
    if not 0 <= index < self._len:
      raise IndexError(index)
    return self.example(index), self.where(index)

  def __getstate__(self):
    return {**self.__dict__, "_source": None}

  def __repr__(self) -> str:
    return f"TfdsSource({self.spec!r}, {self._len} examples)"


def _text(value: Any, where: str, what: str, strict: bool) -> str | bi.Dropped:
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value.item()
  if isinstance(value, bytes):
    try:
      return value.decode("utf-8")
    except UnicodeDecodeError as e:
      return bi.reject(bi.INVALID_UTF8, where, f"{what}: {e}", strict)
  if isinstance(value, str):
    return value
  return bi.reject(bi.INVALID_FIELD, where, f"{what} is {type(value).__name__}, not text", strict)


def chat_from_example(example: Mapping[str, Any], where: str, strict: bool
                      ) -> dict[str, Any] | bi.Dropped:
  """A TFDS example's `messages` feature -> {"messages": [{"role", "content"}, ...]}.

  Accepts the shapes a `messages` feature decodes to: a Sequence of {role, content} Text
  features (columns: {"role": [...], "content": [...]}), a list of such dicts, or a Text
  feature holding the messages as JSON. The chat template validates roles and structure.
  """
  if "messages" not in example:
    return bi.reject(bi.MISSING_FIELD, where, f"no 'messages' feature (features: "
                     f"{sorted(example)})", strict)
  messages = example["messages"]
  if isinstance(messages, (bytes, str, np.ndarray)) and np.ndim(messages) == 0:
    text = _text(messages, where, "'messages'", strict)
    if isinstance(text, bi.Dropped):
      return text
    try:
      messages = json.loads(text)
    except json.JSONDecodeError as e:
      return bi.reject(bi.MALFORMED_JSON, where, f"'messages': {e}", strict)
    return {"messages": messages}
  if isinstance(messages, Mapping):  # Sequence({...}) decodes to columns
    if set(messages) != {"role", "content"} or len(messages["role"]) != len(messages["content"]):
      return bi.reject(bi.INVALID_FIELD, where, "'messages' must hold 'role' and 'content' "
                       f"of equal length (got {sorted(messages)})", strict)
    messages = [{"role": r, "content": c} for r, c in zip(messages["role"], messages["content"])]
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, Mapping):
      out.append(m)  # the template names it
      continue
    m = dict(m)
    for field in ("role", "content"):
      if field in m:
        text = _text(m[field], where, f"message {i} {field}", strict)
        if isinstance(text, bi.Dropped):
          return text
        m[field] = text
    out.append(m)
  return {"messages": out}


class TfdsDocuments:
  """Stage-1 documents of a TFDS split, tokenized on the fly.

  The resampling plan needs every document's token count before the first row, so building
  makes one pass that tokenizes the split (the Hugging Face backend uses all cores) and keeps
  per usable document its TFDS index and token count (16 bytes). Documents that are not usable
  (missing or non-text field, invalid UTF-8, empty, no tokens) are counted by kind like
  `prepare` counts them, or fatal in strict mode. The pass is cached in `cache_dir`, keyed by
  the dataset's files, the split, the field and the tokenizer file, so later builds skip it.
  Reading document k then tokenizes TFDS example `index[k]` again, in Grain's reader threads.
  """

  def __init__(self, spec: str, data_dir: str, text_field: str, tokenizer_path: str, key: str,
               strict: bool, cache_dir: str | None = None, batch_docs: int = 256):
    from ultralong_jax.data import tokenizer as tok_lib  # pylint: disable=import-outside-toplevel
    self.source = TfdsSource(spec, data_dir, key)
    self.text_field = text_field
    self.tokenizer = tok_lib.load_tokenizer(tokenizer_path)
    cache = self._cache_path(cache_dir, tokenizer_path)
    counted = _load_counts(cache)
    if counted is None or (strict and counted["bad_input"]):
      counted = self._count(strict, batch_docs)
      _save_counts(cache, counted)
    self.index = counted["index"]
    self.lengths = counted["lengths"]
    self.max_token_id = counted["max_token_id"]
    self.bad_input = counted["bad_input"]

  def _cache_path(self, cache_dir: str | None, tokenizer_path: str) -> str:
    cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), "ultralong_tfds_cache")
    h = hashlib.sha256()
    for part in (os.path.abspath(self.source.dataset_dir), self.source.split, self.text_field):
      h.update(part.encode() + b"\0")
    for entry in sorted(os.scandir(self.source.dataset_dir), key=lambda e: e.name):
      if entry.is_file():
        st = entry.stat()
        h.update(f"{entry.name}:{st.st_size}:{st.st_mtime_ns}\0".encode())
    if os.path.isdir(tokenizer_path):
      tokenizer_path = os.path.join(tokenizer_path, "tokenizer.json")
    with open(tokenizer_path, "rb") as f:
      h.update(hashlib.sha256(f.read()).digest())
    return os.path.join(cache_dir, f"{self.source.name.replace('/', '_').replace(':', '_')}-"
                        f"{h.hexdigest()[:20]}.npz")

  def text(self, tfds_index: int, strict: bool) -> str | bi.Dropped:
    from ultralong_jax.data import readers  # pylint: disable=import-outside-toplevel
    example, where = self.source[tfds_index]
    record = readers.text_field(dict(example), self.text_field, where, strict)
    return record if isinstance(record, bi.Dropped) else record[0]

  def _count(self, strict: bool, batch_docs: int) -> dict[str, Any]:
    from ultralong_jax.data import tokenizer as tok_lib  # pylint: disable=import-outside-toplevel
    bad = bi.BadInputLog(strict)
    index, lengths, max_id = [], [], -1
    for start in range(0, len(self.source), batch_docs):
      texts, ids = [], []
      for i in range(start, min(start + batch_docs, len(self.source))):
        text = self.text(i, strict)
        if isinstance(text, bi.Dropped):
          bad.add(text)
        else:
          texts.append(text)
          ids.append(i)
      for i, tokens in zip(ids, tok_lib.encode_batch(self.tokenizer, texts)):
        if not tokens:
          bad.report(bi.EMPTY_DOCUMENT, self.source.where(i), "no tokens")
          continue
        index.append(i)
        lengths.append(len(tokens))
        max_id = max(max_id, max(tokens))
    if len(self.source) == 0:
      bad.report(bi.EMPTY_SOURCE, f"tfds:{self.source.name}/{self.source.split}:0", "no examples")
    return {"index": np.asarray(index, np.int64), "lengths": np.asarray(lengths, np.int64),
            "max_token_id": max_id, "bad_input": dict(sorted(bad.counts.items()))}

  def __call__(self, k: int) -> np.ndarray:
    """Token ids of usable document k (int32); empty if its record no longer reads as text."""
    text = self.text(int(self.index[k]), strict=False)
    if isinstance(text, bi.Dropped):
      return np.zeros(0, np.int32)
    return np.asarray(self.tokenizer.encode(text), np.int32)

  def where(self, k: int) -> str:
    return self.source.where(int(self.index[k]))


def _load_counts(path: str) -> dict[str, Any] | None:
  if not os.path.exists(path):
    return None
  with np.load(path, allow_pickle=False) as z:
    return {"index": z["index"], "lengths": z["lengths"], "max_token_id": int(z["max_token_id"]),
            "bad_input": json.loads(str(z["bad_input"]))}


def _save_counts(path: str, counted: dict[str, Any]) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}.npz"
  np.savez(tmp, index=counted["index"], lengths=counted["lengths"],
           max_token_id=counted["max_token_id"], bad_input=json.dumps(counted["bad_input"]))
  os.replace(tmp, path)


def _examples(name: str, data_dir: str, split: str, key: str) -> tuple[int | None, Iterator]:
  """(count or None, examples in order) of a split; raises before reading anything."""
  tfds = _import_tfds(key)
  spec = f"{name}:{split}"
  parse_spec(spec, key)
  builder = _builder(tfds, name, data_dir, key)
  if _random_access(tfds, builder):
    source = open_data_source(spec, data_dir, key)
    return len(source), (source[i] for i in range(len(source)))
  if importlib.util.find_spec("tensorflow") is not None:
    return None, iter(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))
  raise ValueError(_tfrecord_only_message(builder, name, key) + "; or install TensorFlow "
                   "(pip install tensorflow-cpu) and prepare reads the TFRecord files directly.")


def check_readable(name: str, data_dir: str, split: str, key: str) -> None:
  """Raises what `iter_texts` would (missing package, dataset, split; TFRecord without TF)."""
  _examples(name, data_dir, split, key)


def iter_texts(name: str, data_dir: str, split: str, field: str, strict: bool, key: str
               ) -> Iterator[tuple[str, str] | bi.Dropped]:
  """Every record of a split in order, as `readers` yields them, for `prepare`.

  Random-access datasets are read through `tfds.data_source`; a TFRecord-only dataset through
  TensorFlow (`builder.as_dataset`) when it is installed, else an error with the conversion
  command and the package to install. Errors are raised by the call, before any record.
  """
  from ultralong_jax.data import readers  # pylint: disable=import-outside-toplevel
  _, examples = _examples(name, data_dir, split, key)
  where = lambda i: f"tfds:{name}/{split}:{i}"
  return (readers.text_field(dict(example), field, where(i), strict)
          for i, example in enumerate(examples))
