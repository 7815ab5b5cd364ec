"""Stage-1 pipeline: prepared long documents -> resampled, mixed, separator-joined rows.

  prepared shards or a TFDS split (per domain)  --plan-->  resampled document indices
    -> shuffle (per epoch) -> repeat -> this process's slice -> read tokens, append separator
                                                           (Grain MapDataset, random access)
    -> mix domains by token weight                         (grain.IterDataset.mix)
    -> count the realized mix, drop bad documents          (stats.CountingIterDataset)
    -> grain.experimental.ConcatThenSplitIterDataset       (rows of exactly seq_len + 1;
                                                           data.packing: or first/best-fit)
    -> features (features.pretrain_features) -> batch -> mp_prefetch workers

Concat-then-split (`packing="concat"`) is the packer that matches the recipe: documents run on
across row boundaries, no padding, so no token is lost or duplicated. `first_fit` / `best_fit`
put whole documents in rows and pad the rest (for short-context pretraining where a document cut
in two would lose its point, e.g. a question separated from its context); every document must
fit in a row, checked before the pipeline starts.
Memory: the pipeline holds the length arrays (8 bytes per document) and one row in flight per
worker plus Grain's small read-ahead, never the corpus.

A domain is a directory written by `prepare` (`path`), or a TFDS split in the ArrayRecord format
(`tfds` + `data_dir`) whose documents are tokenized on the fly (tfds_source.TfdsDocuments); both
give the same documents in the same order, so the same batches.
"""

from __future__ import annotations

import logging
from typing import Any

import grain
import numpy as np

from ultralong_jax.data import bad_input as bi
from ultralong_jax.data import config as config_lib
from ultralong_jax.data import features
from ultralong_jax.data import pipeline
from ultralong_jax.data import resample
from ultralong_jax.data import shards
from ultralong_jax.data import stats
from ultralong_jax.data import tfds_source

log = logging.getLogger(__name__)

# Documents read ahead per process by Grain's reader threads; bounds memory for long documents.
_READ_THREADS = 4
_READ_AHEAD = 32


class _LoadDocument:
  """Domain document index -> {"tokens": [n + extras], "domain": d} or a Dropped marker.

  `reader(index)` gives a document's token ids and `reader.where(index)` its location:
  shards.DocumentReader or tfds_source.TfdsDocuments.
  """

  def __init__(self, reader, domain_id: int, bos_id: int, separator_id: int, vocab_size: int,
               strict: bool):
    self._reader = reader
    self._domain_id = domain_id
    self._prefix = np.asarray([bos_id] if bos_id >= 0 else [], np.int32)
    self._suffix = np.asarray([separator_id] if separator_id >= 0 else [], np.int32)
    self._vocab_size = vocab_size
    self._strict = strict

  def __call__(self, index: int) -> dict[str, Any] | bi.Dropped:
    tokens = self._reader(index)
    if tokens is None:  # a damaged record, data.damaged_records=skip
      return bi.Dropped(bi.DAMAGED_RECORD, self._reader.where(index), "damaged")
    if tokens.size == 0:
      return bi.reject(bi.EMPTY_DOCUMENT, self._reader.where(index), "", self._strict)
    if tokens.min() < 0 or tokens.max() >= self._vocab_size:
      return bi.reject(bi.TOKEN_OUT_OF_VOCAB, self._reader.where(index),
                       f"ids in [{tokens.min()}, {tokens.max()}], vocab_size {self._vocab_size}",
                       self._strict)
    return {"tokens": np.concatenate([self._prefix, tokens, self._suffix]),
            "domain": self._domain_id}


class _CountMix:
  """Counts documents and tokens (separators excluded) per domain as they enter packing."""

  def __init__(self, domain_names: list[str], extras: int):
    self._names = domain_names
    self._extras = extras

  def __call__(self, element):
    if isinstance(element, bi.Dropped):
      return None, {element.kind: 1}
    name = self._names[element["domain"]]
    return ({"tokens": element["tokens"]},
            {f"{name}/documents": 1, f"{name}/tokens": len(element["tokens"]) - self._extras})


class _Features:

  def __init__(self, document_mask: bool):
    self._document_mask = document_mask

  def __call__(self, packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return features.pretrain_features(packed["tokens"], packed["tokens_segment_ids"],
                                      packed["tokens_positions"], self._document_mask)


def _open_domain(data: config_lib.PretrainData, dom: config_lib.Domain, cache_dir: str | None):
  """(reader, lengths, max token id, bad input counted before the pipeline) of one domain."""
  name = dom.name
  if dom.tfds:
    docs = tfds_source.TfdsDocuments(
        dom.tfds, dom.data_dir, dom.text_field, data.tokenizer, f"data.domains.{name}.tfds",
        data.strict, cache_dir)
    return docs, docs.lengths, docs.max_token_id, docs.bad_input, (
        f"data.domains.{name}.tfds: {dom.tfds} tokenized with {data.tokenizer}")
  corpus = shards.load_prepared(dom.path, data.damaged_records)
  return (shards.DocumentReader(corpus), corpus.lengths, corpus.manifest["max_token_id"],
          corpus.manifest.get("bad_input", {}), f"data.domains.{name}.path: {dom.path}")


def build_pretrain_pipeline(data: config_lib.PretrainData, *, process_index: int | None = None,
                            process_count: int | None = None, cache_dir: str | None = None
                            ) -> pipeline.Pipeline:
  """Builds the stage-1 pipeline of `data` (config.resolve_data_config of a
  `default_data_config(1)`) for one JAX process.

  `cache_dir` keeps the token counts of TFDS domains tokenized on the fly (default: a
  directory under the system temp dir).
  """
  process_index, process_count = pipeline.process_info(process_index, process_count)
  pipeline.check_process_count(data, process_count)
  names = list(data.domains)
  extras = int(data.bos_id >= 0) + int(data.separator_id >= 0)
  domain_datasets, doc_weights, plan_stats = [], [], {}
  for domain_id, name in enumerate(names):
    dom = data.domains[name]
    reader, lengths, max_token_id, bad_before, what = _open_domain(data, dom, cache_dir)
    if max_token_id >= data.vocab_size:
      raise ValueError(f"{what} holds token id {max_token_id} >= data.vocab_size "
                       f"{data.vocab_size}; use the model's tokenizer (or fix vocab_size).")
    rates = dom.resample
    plan = resample.plan_domain(name, lengths, rates, data.seed)
    plan_stats[name] = plan.summary(rates)
    plan_stats[name]["prepare_bad_input"] = bad_before
    if len(plan.doc_indices) == 0:
      raise ValueError(f"data.domains.{name}: no document survives resampling "
                       f"({plan_stats[name]}); raise the rates or drop the domain.")
    if data.packing != "concat":
      _check_rows_fit(data, name, lengths, extras)
    # MapDataset.mix draws documents; turn the token weight into a document weight by the
    # domain's mean tokens per sampled document (separators included, they fill rows too).
    mean_tokens = plan.tokens_after / len(plan.doc_indices) + extras
    doc_weights.append(dom.weight / mean_tokens)
    ds = grain.MapDataset.source(plan.doc_indices)
    # Shuffling before repeat gives each epoch its own order (Grain reseeds per epoch).
    ds = ds.shuffle(seed=resample.shuffle_seed(data.seed, name))
    ds = ds.repeat(data.num_epochs if data.num_epochs > 0 else None)
    # Slice per domain, before mixing: a slice of the mixed stream could give one process
    # (or one mp_prefetch worker, which Grain slices the same way) a single domain.
    ds = ds[process_index::process_count]
    ds = ds.map(_LoadDocument(reader, domain_id, data.bos_id, data.separator_id, data.vocab_size,
                              data.strict))
    domain_datasets.append(ds.to_iter_dataset(grain.ReadOptions(
        num_threads=_READ_THREADS, prefetch_buffer_size=_READ_AHEAD)))
  ds = (grain.IterDataset.mix(domain_datasets, weights=doc_weights) if len(names) > 1
        else domain_datasets[0])
  ds = stats.CountingIterDataset(ds, _CountMix(names, extras), name="mix")
  row = {"tokens": data.seq_len + 1}
  if data.packing == "concat":
    ds = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct=row,
                                                       split_full_length_features=True)
  else:
    packer = (grain.experimental.FirstFitPackIterDataset if data.packing == "first_fit"
              else grain.experimental.BestFitPackIterDataset)
    ds = packer(ds, length_struct=row, num_packing_bins=data.num_packing_bins, seed=data.seed,
                shuffle_bins=True)
  ds = ds.map(_Features(data.document_mask))
  batch_size = data.global_batch_size // process_count
  ds = pipeline.batch_and_prefetch(ds, batch_size, data)
  _log_plan(plan_stats, names, [data.domains[n].weight for n in names])
  return pipeline.Pipeline(ds, batch_size, data.seq_len, {"domains": plan_stats})


def _check_rows_fit(data: config_lib.PretrainData, name: str, lengths: np.ndarray,
                    extras: int) -> None:
  """First/best-fit packing never cuts a document: every one must fit in a row."""
  too_long = int(np.sum(np.asarray(lengths) + extras > data.seq_len + 1))
  if too_long:
    raise ValueError(
        f"data.packing={data.packing!r}: {too_long} document(s) of data.domains.{name} are longer "
        f"than a row ({data.seq_len + 1} tokens with BOS / separator; the longest has "
        f"{int(np.max(lengths))} tokens); use data.packing='concat' (documents run on across "
        "rows) or a longer data.seq_len.")


def _log_plan(plan_stats: dict[str, dict], names: list[str], weights: list[float]) -> None:
  total_w = sum(weights)
  for name, w in zip(names, weights):
    s = plan_stats[name]
    log.info("domain %s: target token share %.3f; documents %d -> %d after resampling "
             "(short %d -> %d, long %d -> %d); tokens %d -> %d; prepare dropped %s", name,
             w / total_w, s["documents_before"], s["documents_after"], s["short_documents_before"],
             s["short_documents_after"], s["long_documents_before"], s["long_documents_after"],
             s["tokens_before"], s["tokens_after"], s["prepare_bad_input"])


def realized_mix(run_stats: dict[str, Any]) -> dict[str, float]:
  """Token share per domain among the documents packed so far (from `Pipeline.stats`)."""
  mix = run_stats.get("mix", {})
  tokens = {k[: -len("/tokens")]: v for k, v in mix.items() if k.endswith("/tokens")}
  total = sum(tokens.values()) or 1
  return {k: v / total for k, v in sorted(tokens.items())}
