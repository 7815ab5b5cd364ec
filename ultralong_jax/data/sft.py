"""Stage-2 pipeline: chat JSONL -> chat template tokens -> packed rows, one example a segment.

  JSONL lines (jsonl_source) or TFDS examples (tfds_source)
    -> shuffle (per epoch) -> repeat -> this process's slice
    -> parse + render + tokenize (chat_template), over-limit drop/truncate  (Grain MapDataset)
    -> count examples, tokens, truncations and every dropped kind          (stats)
    -> grain.experimental.FirstFitPackIterDataset / BestFitPackIterDataset (rows of seq_len + 1)
    -> features (features.sft_features) -> batch -> mp_prefetch workers

First/best-fit packing pads instead of splitting, so an example never straddles two rows and
never attends to another (segment ids and positions restart per example). A TFDS split holding
the same chats in the same order as a JSONL file gives the same batches.
"""

from __future__ import annotations

import logging
from typing import Any

import grain
import numpy as np

from ultralong_jax.data import bad_input as bi
from ultralong_jax.data import chat_template
from ultralong_jax.data import config as config_lib
from ultralong_jax.data import features
from ultralong_jax.data import jsonl_source
from ultralong_jax.data import pipeline
from ultralong_jax.data import readers
from ultralong_jax.data import stats
from ultralong_jax.data import tfds_source
from ultralong_jax.data import tokenizer as tok_lib

log = logging.getLogger(__name__)


class RenderChat:
  """(record, where) -> {"tokens", "trainable", "truncated"} or a Dropped marker.

  `parse(record, where, strict)` turns a record into a JSON-like chat object or a Dropped
  marker: readers.parse_json_line for JSONL lines, tfds_source.chat_from_example for TFDS.
  """

  def __init__(self, template, max_example_len: int,
               over_limit: str, vocab_size: int, strict: bool,
               parse=readers.parse_json_line):
    self._template = template
    self._parse = parse
    self._max_len = max_example_len
    self._over_limit = over_limit
    self._vocab_size = vocab_size
    self._strict = strict

  def __call__(self, record: tuple[bytes, str]) -> dict[str, Any] | bi.Dropped:
    raw, where = record
    obj = self._parse(raw, where, self._strict)
    if isinstance(obj, bi.Dropped):
      return obj
    if "messages" not in obj:
      return bi.reject(bi.MISSING_FIELD, where, "no 'messages' field", self._strict)
    try:
      ids, trainable = self._template.render(obj["messages"])
    except chat_template.ChatFormatError as e:
      return bi.reject(e.kind, where, str(e), self._strict)
    if ids.max() >= self._vocab_size:
      return bi.reject(bi.TOKEN_OUT_OF_VOCAB, where, f"id {ids.max()} >= vocab_size "
                       f"{self._vocab_size}", self._strict)
    truncated = 0
    if len(ids) > self._max_len:
      # A policy, not malformed input: counted, never fatal in strict mode.
      if self._over_limit == "drop":
        return bi.Dropped(bi.OVER_LIMIT_DROPPED, where, f"{len(ids)} > {self._max_len} tokens")
      ids, trainable, truncated = ids[: self._max_len], trainable[: self._max_len], 1
    if not trainable.any():
      return bi.Dropped(bi.NO_ASSISTANT_TOKENS, where, "nothing to train on")
    return {"tokens": ids, "trainable": trainable, "truncated": truncated}


def _count(element):
  if isinstance(element, bi.Dropped):
    return None, {element.kind: 1}
  n = len(element["tokens"])
  return ({"tokens": element["tokens"], "trainable": element["trainable"]},
          {"examples": 1, "tokens": n, "trainable_tokens": int(element["trainable"].sum()),
           "over_limit_truncated": element["truncated"]})


def _to_features(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return features.sft_features(packed["tokens"], packed["trainable"],
                               packed["tokens_segment_ids"], packed["tokens_positions"])


def build_sft_pipeline(data: config_lib.SftData, *, process_index: int | None = None,
                       process_count: int | None = None, cache_dir: str | None = None
                       ) -> pipeline.Pipeline:
  """Builds the stage-2 pipeline of `data` (config.resolve_data_config of a
  `default_data_config(2)`) for one JAX process."""
  process_index, process_count = pipeline.process_info(process_index, process_count)
  pipeline.check_process_count(data, process_count)
  bad = bi.BadInputLog(data.strict)
  if data.chat_tfds:
    source = tfds_source.TfdsSource(data.chat_tfds, data.chat_tfds_data_dir, "data.chat_tfds")
    parse = tfds_source.chat_from_example
    if len(source) == 0:
      raise ValueError(f"data.chat_tfds: {data.chat_tfds!r} holds no examples.")
    build = {"tfds": data.chat_tfds, "examples": len(source)}
  else:
    paths = readers.expand_paths(data.chat_files)
    source = jsonl_source.JsonlSource(paths, cache_dir=cache_dir)
    parse = readers.parse_json_line
    empty = [p for p, n in zip(paths, source.lines_per_file) if n == 0]
    for p in empty:
      bad.report(bi.EMPTY_SOURCE, f"{p}:0", "no lines")
    if len(source) == 0:
      raise ValueError(f"data.chat_files: {data.chat_files!r} holds no lines.")
    build = {"files": len(paths), "lines": len(source)}
  template = chat_template.make_chat_template(
      data.chat.template, tok_lib.load_tokenizer(data.tokenizer),
      date_preamble=data.chat.date_preamble, date_string=data.chat.date_string)
  ds = grain.MapDataset.source(source).shuffle(seed=data.seed)
  ds = ds.repeat(data.num_epochs if data.num_epochs > 0 else None)
  ds = ds[process_index::process_count]
  ds = ds.map(RenderChat(template, data.max_example_len, data.over_limit, data.vocab_size,
                         data.strict, parse))
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=64))
  ds = stats.CountingIterDataset(ds, _count, name="sft")
  packer = (grain.experimental.FirstFitPackIterDataset if data.packing == "first_fit"
            else grain.experimental.BestFitPackIterDataset)
  row = data.seq_len + 1
  ds = packer(ds, length_struct={"tokens": row, "trainable": row},
              num_packing_bins=data.num_packing_bins, seed=data.seed, shuffle_bins=True)
  ds = ds.map(_to_features)
  batch_size = data.global_batch_size // process_count
  ds = pipeline.batch_and_prefetch(ds, batch_size, data)
  build["bad_input"] = dict(bad.counts)
  log.info("SFT data: %s; bad input at build %s", source, build["bad_input"])
  return pipeline.Pipeline(ds, batch_size, data.seq_len, build)
