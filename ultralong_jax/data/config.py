"""The `data` section of a training config: every key documented once, validated in one place.

`default_data_config(stage)` returns the ConfigDict that `configs/*.py` embed as `config.data`;
`validate_data_config(cfg)` checks it before anything is built and raises `ValueError` naming
the key and what would work; `resolve_data_config(cfg)` validates it and returns its typed,
frozen piece (`PretrainData` or `SftData`), which the pipeline builders
(`pretrain.build_pretrain_pipeline`, `sft.build_sft_pipeline`) take. The pieces' fields have no
defaults: they are read from the ConfigDict by name, so `default_data_config` (and
DOMAIN_DEFAULTS for a domain's optional keys) is the one place a default lives.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping

import ml_collections

from ultralong_jax.data import chat_template, resample as resample_lib, tfds_source

# Llama 3 special token ids (meta-llama/Llama-3.1-8B-Instruct tokenizer.json, `added_tokens`).
LLAMA3_END_OF_TEXT = 128001
LLAMA3_VOCAB_SIZE = 128256


def default_data_config(stage: int) -> ml_collections.ConfigDict:
  """Returns the documented default data config for recipe stage 1 (pretrain) or 2 (SFT).

  Keys shared by both stages:
    stage: 1 = long-document continued pretraining, 2 = chat instruction tuning.
    seq_len: L, tokens per row the model sees. Rows are built with L + 1 tokens so that
      `inputs = row[:-1]`, `targets = row[1:]`. Paper: 1M / 2M / 4M (stage 1), 8K-ish (stage 2).
    global_batch_size: rows per step over all JAX processes; each process yields
      `global_batch_size // process_count` rows per batch (paper stage 1: 2).
    seed: one seed for shuffling, resampling and bin shuffling; same seed -> same batches.
    num_epochs: passes over the (resampled) data; 0 repeats forever.
    tokenizer: path to a SentencePiece `.model` or a Hugging Face `tokenizer.json` (or a
      directory holding one). Stage 1 only needs it for `prepare`; stage 2 tokenizes on the fly.
    vocab_size: the model's vocabulary size V; any token id >= V is bad input (counted,
      dropped, or fatal in strict mode).
    strict: False = skip, count and log bad input; True = raise at the first bad record,
      naming file and line.
    num_workers: Grain `mp_prefetch` worker processes (0 = in-process). Packing state lives in
      the workers, so a resumed run must use the same value.
    worker_buffer_size: batches each worker prefetches.

  Stage 1 keys:
    domains: ConfigDict name -> {path | tfds + data_dir [+ text_field], weight[, resample]}:
      `path` is a directory written by `python -m ultralong_jax.data.prepare`; or `tfds` is a
      TFDS dataset "name:split" in the ArrayRecord format under the local `data_dir`, its
      `text_field` feature (default "text") tokenized on the fly with `tokenizer` (needs
      `pip install -r requirements-tfds.txt`, no TensorFlow; see tfds_source.TfdsDocuments);
      `weight` (default 1.0) is the domain's share of *tokens* (normalized over domains); an
      optional
      `resample` sub-dict overrides any of the global resample keys for that domain.
    resample.short_threshold / short_rate: documents with fewer tokens than the threshold are
      kept with probability min(rate, 1) (rate < 1 down-samples). Paper section 3.1: < 4K.
    resample.long_threshold / long_rate: documents with more tokens than the threshold appear
      `rate` times in expectation (floor(rate) copies + one more with probability frac(rate)).
      Paper: > 8K. The paper gives the thresholds, not the rates; 0.5 / 2.0 are our defaults.
    separator_id: token placed between consecutive documents in a row (default Llama 3
      `<|end_of_text|>`); -1 for none.
    bos_id: token prepended to every document (-1 = none, the paper's setting).
    damaged_records: "error" (default) or "skip": what a damaged prepared shard does (a size
      that differs from its manifest, found when the pipeline is built; a record whose CRC-32
      differs, found when it is read): stop with an error naming the file and record, or
      skip its records and count them as `damaged_record` in the data stats (data/shards.py).
    document_mask: False (paper default) = documents attend to each other, positions run
      0..L-1 over the row, segment_ids are 1 on every real token; True = positions restart
      per document and segment_ids number the documents in the row (ablation).
    packing: "concat" (the recipe: concat-then-split, documents run on across rows, no padding)
      or "first_fit" / "best_fit" (whole documents per row, the rest padded; every document,
      with its BOS / separator, must fit in a row of L + 1 tokens).
    num_packing_bins: rows first/best-fit fills at once (as in stage 2).

  Stage 2 keys:
    chat_files: comma-separated JSONL (or .jsonl.gz) paths or globs; one chat per line as
      `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`.
    chat_tfds: instead of chat_files, a TFDS dataset "name:split" in the ArrayRecord format
      whose `messages` feature holds the chats (a Sequence of {role, content} Text features,
      or a Text feature holding the JSON list); needs `pip install -r requirements-tfds.txt`.
    chat_tfds_data_dir: the local TFDS data_dir holding chat_tfds.
    max_example_len: token limit per rendered chat (paper: < 8K).
    over_limit: "drop" or "truncate" examples longer than `max_example_len` (counted).
    packing: "first_fit" or "best_fit" (Grain's packers) for rows of L + 1 tokens.
    num_packing_bins: rows a packer fills at once (more bins = less padding, more memory).
    chat.template: the base model's chat format: llama31 (Llama 3.x), chatml (Qwen2 / Qwen2.5),
      qwen3 (ChatML with <think> blocks), mistral (Mistral v0.3 [INST]), llama2 (Llama 2 [INST] /
      <<SYS>>); see data/chat_template.py.
    chat.date_preamble: (llama31) True renders the official Llama 3.1 template's system block
      ("Cutting Knowledge Date: December 2023\\nToday Date: <date>\\n\\n") on every chat,
      also chats without a system message, as `apply_chat_template` does; False emits a
      system block only for chats that have a system message, without the preamble.
    chat.date_string: (llama31) the "Today Date" the template inserts (official default "26 Jul 2024").
  """
  if stage not in (1, 2):
    raise ValueError(f"data.stage: got {stage!r}; use 1 (pretrain) or 2 (SFT).")
  cfg = ml_collections.ConfigDict()
  cfg.stage = stage
  cfg.seq_len = 1_048_576 if stage == 1 else 8192
  cfg.global_batch_size = 2 if stage == 1 else 8
  cfg.seed = 0
  cfg.num_epochs = 0
  cfg.tokenizer = ""
  cfg.vocab_size = LLAMA3_VOCAB_SIZE
  cfg.strict = False
  cfg.num_workers = 0
  cfg.worker_buffer_size = 2
  if stage == 1:
    cfg.domains = ml_collections.ConfigDict()
    cfg.resample = ml_collections.ConfigDict(dict(
        short_threshold=4096, short_rate=0.5, long_threshold=8192, long_rate=2.0))
    cfg.separator_id = LLAMA3_END_OF_TEXT
    cfg.bos_id = -1
    cfg.document_mask = False
    cfg.packing = "concat"
    cfg.num_packing_bins = 16
    cfg.damaged_records = "error"
  else:
    cfg.chat_files = ""
    cfg.chat_tfds = ""
    cfg.chat_tfds_data_dir = ""
    cfg.max_example_len = 8192
    cfg.over_limit = "drop"
    cfg.packing = "first_fit"
    cfg.num_packing_bins = 16
    cfg.chat = ml_collections.ConfigDict(dict(template="llama31", date_preamble=True,
                                              date_string="26 Jul 2024"))
  return cfg


_COMMON = {"stage", "seq_len", "global_batch_size", "seed", "num_epochs", "tokenizer",
           "vocab_size", "strict", "num_workers", "worker_buffer_size"}
_STAGE_KEYS = {
    1: _COMMON | {"domains", "resample", "separator_id", "bos_id", "document_mask", "packing",
                  "num_packing_bins", "damaged_records"},
    2: _COMMON | {"chat_files", "chat_tfds", "chat_tfds_data_dir", "max_example_len",
                  "over_limit", "packing", "num_packing_bins", "chat"},
}
PRETRAIN_PACKING = ("concat", "first_fit", "best_fit")
_RESAMPLE_KEYS = {"short_threshold", "short_rate", "long_threshold", "long_rate"}
_DOMAIN_KEYS = {"path", "tfds", "data_dir", "text_field", "weight", "resample"}
# A domain's optional keys and their values when left out ("" = not this kind of source).
DOMAIN_DEFAULTS = {"path": "", "tfds": "", "data_dir": "",
                   "text_field": tfds_source.DEFAULT_TEXT_FIELD, "weight": 1.0}


def _fail(key: str, got, fix: str):
  raise ValueError(f"data.{key}: got {got!r}; {fix}")


def _check_resample(prefix: str, r) -> None:
  unknown = set(r.keys()) - _RESAMPLE_KEYS
  if unknown:
    _fail(f"{prefix}.{sorted(unknown)[0]}", "unknown key", f"use one of {sorted(_RESAMPLE_KEYS)}.")
  for rate in ("short_rate", "long_rate"):
    if rate in r and not r[rate] >= 0:
      _fail(f"{prefix}.{rate}", r[rate], "rates must be >= 0 (0 drops the class, 1 keeps it).")
  if "short_threshold" in r and "long_threshold" in r and r.short_threshold > r.long_threshold:
    _fail(f"{prefix}.short_threshold", r.short_threshold,
          f"must be <= long_threshold ({r.long_threshold}).")


def _check_tfds(key: str, spec, data_dir_key: str, data_dir) -> None:
  tfds_source.parse_spec(spec, f"data.{key}")
  if not data_dir:
    _fail(data_dir_key, data_dir, "give the local TFDS data_dir that holds the dataset.")
  tfds_source.check_installed(f"data.{key}")


def validate_data_config(cfg: ml_collections.ConfigDict, process_count: int = 1) -> None:
  """Raises ValueError naming the first bad key of `cfg` and what would work."""
  stage = cfg.stage if "stage" in cfg else "missing"
  if stage not in (1, 2):
    _fail("stage", stage, "use 1 (pretrain) or 2 (SFT).")
  unknown = set(cfg.keys()) - _STAGE_KEYS[stage]
  if unknown:
    _fail(sorted(unknown)[0], "unknown key",
          f"stage {stage} takes {sorted(_STAGE_KEYS[stage])} (see default_data_config).")
  missing = _STAGE_KEYS[stage] - set(cfg.keys())
  if missing:
    _fail(sorted(missing)[0], "missing", "start from default_data_config(stage).")
  if cfg.seq_len < 2:
    _fail("seq_len", cfg.seq_len, "use a positive length of at least 2 tokens.")
  if cfg.global_batch_size < 1 or cfg.global_batch_size % process_count:
    _fail("global_batch_size", cfg.global_batch_size,
          f"use a positive multiple of the JAX process count ({process_count}).")
  if cfg.num_epochs < 0:
    _fail("num_epochs", cfg.num_epochs, "use 0 (repeat forever) or a positive count.")
  if cfg.vocab_size < 1:
    _fail("vocab_size", cfg.vocab_size, "use the model's vocabulary size (Llama 3: 128256).")
  if cfg.num_workers < 0 or cfg.worker_buffer_size < 1:
    _fail("num_workers", cfg.num_workers, "use >= 0 workers and worker_buffer_size >= 1.")
  if stage == 1:
    if not cfg.domains:
      _fail("domains", "{}", "add at least one domain: "
            "cfg.domains.web = ConfigDict(dict(path='/data/web_tok', weight=1.0)).")
    for name, dom in cfg.domains.items():
      keys = set(dom.keys())
      if keys - _DOMAIN_KEYS or ("path" in keys) == ("tfds" in keys) or (
          "path" in keys and keys & {"data_dir", "text_field"}):
        _fail(f"domains.{name}", sorted(keys),
              "a domain takes `path` (a prepared directory) or `tfds` (\"name:split\") with "
              "`data_dir` and optional `text_field`, plus `weight` and optional `resample`.")
      given = {**DOMAIN_DEFAULTS, **{k: dom[k] for k in keys - {"resample"}}}
      if "tfds" in keys:
        _check_tfds(f"domains.{name}.tfds", dom.tfds, f"domains.{name}.data_dir",
                    given["data_dir"])
        if not cfg.tokenizer:
          _fail("tokenizer", cfg.tokenizer, f"domains.{name} is tokenized on the fly: give a "
                "tokenizer path (or prepare it: python -m ultralong_jax.data.prepare --tfds_name).")
      if not given["weight"] > 0:
        _fail(f"domains.{name}.weight", given["weight"], "weights must be > 0.")
      if "resample" in dom:
        _check_resample(f"domains.{name}.resample", dom.resample)
    _check_resample("resample", cfg.resample)
    if missing_r := _RESAMPLE_KEYS - set(cfg.resample.keys()):
      _fail(f"resample.{sorted(missing_r)[0]}", "missing", "set all four resample keys.")
    if cfg.damaged_records not in ("error", "skip"):
      _fail("damaged_records", cfg.damaged_records, "use 'error' or 'skip'.")
    for key in ("separator_id", "bos_id"):
      if not -1 <= cfg[key] < cfg.vocab_size:
        _fail(key, cfg[key], f"use -1 (none) or a token id below vocab_size ({cfg.vocab_size}).")
    if cfg.packing not in PRETRAIN_PACKING:
      _fail("packing", cfg.packing, f"use one of {', '.join(map(repr, PRETRAIN_PACKING))}.")
    if cfg.num_packing_bins < 1:
      _fail("num_packing_bins", cfg.num_packing_bins, "use at least 1 bin.")
  else:
    if bool(cfg.chat_files) == bool(cfg.chat_tfds):
      _fail("chat_files", cfg.chat_files, "give comma-separated JSONL paths or globs, or "
            "data.chat_tfds (a TFDS \"name:split\") instead; exactly one of the two.")
    if cfg.chat_tfds:
      _check_tfds("chat_tfds", cfg.chat_tfds, "chat_tfds_data_dir", cfg.chat_tfds_data_dir)
    if not 1 < cfg.max_example_len <= cfg.seq_len + 1:
      _fail("max_example_len", cfg.max_example_len,
            f"use 2..seq_len + 1 ({cfg.seq_len + 1}); an example must fit in one row.")
    if cfg.over_limit not in ("drop", "truncate"):
      _fail("over_limit", cfg.over_limit, 'use "drop" or "truncate".')
    if cfg.packing not in ("first_fit", "best_fit"):
      _fail("packing", cfg.packing, 'use "first_fit" or "best_fit".')
    if cfg.num_packing_bins < 1:
      _fail("num_packing_bins", cfg.num_packing_bins, "use at least 1 bin.")
    if not cfg.tokenizer:
      _fail("tokenizer", cfg.tokenizer, "stage 2 tokenizes chats: give a tokenizer path.")
    if set(cfg.chat.keys()) != {"template", "date_preamble", "date_string"}:
      _fail("chat", sorted(cfg.chat.keys()), "chat takes template, date_preamble and date_string.")
    if cfg.chat.template not in chat_template.CHAT_TEMPLATES:
      _fail("chat.template", cfg.chat.template,
            f"use one of {sorted(chat_template.CHAT_TEMPLATES)}.")


@dataclasses.dataclass(frozen=True)
class Domain:
  """data.domains.<name>: a prepared directory (`path`) or a TFDS split (`tfds` under
  `data_dir`, its `text_field`), the domain's token share `weight`, and its resample rates (the
  global data.resample with the domain's own overrides)."""
  name: str
  path: str
  tfds: str
  data_dir: str
  text_field: str
  weight: float
  resample: resample_lib.ResampleRates


@dataclasses.dataclass(frozen=True)
class Chat:
  """data.chat: the chat template and its Llama 3.1 date options."""
  template: str
  date_preamble: bool
  date_string: str


@dataclasses.dataclass(frozen=True)
class _Data:
  stage: int
  seq_len: int
  global_batch_size: int
  seed: int
  num_epochs: int
  tokenizer: str
  vocab_size: int
  strict: bool
  num_workers: int
  worker_buffer_size: int


@dataclasses.dataclass(frozen=True)
class PretrainData(_Data):
  """A stage-1 data section (default_data_config(1) documents each key); `domains` by name, in
  name order."""
  domains: Mapping[str, Domain]
  resample: resample_lib.ResampleRates
  separator_id: int
  bos_id: int
  document_mask: bool
  packing: str
  num_packing_bins: int
  damaged_records: str

  @property
  def uses_segment_ids(self) -> bool:
    """Packed documents are masked from each other only with the document_mask ablation."""
    return self.document_mask


@dataclasses.dataclass(frozen=True)
class SftData(_Data):
  """A stage-2 data section (default_data_config(2) documents each key)."""
  chat_files: str
  chat_tfds: str
  chat_tfds_data_dir: str
  max_example_len: int
  over_limit: str
  packing: str
  num_packing_bins: int
  chat: Chat

  @property
  def uses_segment_ids(self) -> bool:
    """Packed chats never attend to each other."""
    return True


def data_piece(cfg: ml_collections.ConfigDict) -> PretrainData | SftData:
  """The typed piece of the data section `cfg`: each field read by name (a missing key names
  itself), values as given (validate_data_config checks them)."""
  stage = cfg.stage if "stage" in cfg else "missing"
  if stage not in (1, 2):
    _fail("stage", stage, "use 1 (pretrain) or 2 (SFT).")
  cls = PretrainData if stage == 1 else SftData
  values = {}
  for field in dataclasses.fields(cls):
    if field.name not in cfg:
      _fail(field.name, "missing", "start from default_data_config(stage).")
    values[field.name] = cfg[field.name]
  if stage == 1:
    if missing_r := _RESAMPLE_KEYS - set(cfg.resample.keys()):
      _fail(f"resample.{sorted(missing_r)[0]}", "missing", "set all four resample keys.")
    _check_resample("resample", cfg.resample)
    values["resample"] = rates = resample_lib.ResampleRates(**cfg.resample)
    values["domains"] = types.MappingProxyType(
        {name: _domain(name, cfg.domains[name], rates) for name in sorted(cfg.domains.keys())})
  else:
    values["chat"] = Chat(**cfg.chat)
  return cls(**values)


def _domain(name: str, dom: ml_collections.ConfigDict, rates: resample_lib.ResampleRates
            ) -> Domain:
  if unknown := set(dom.keys()) - _DOMAIN_KEYS:
    _fail(f"domains.{name}.{sorted(unknown)[0]}", "unknown key", f"use {sorted(_DOMAIN_KEYS)}.")
  given = {k: dom[k] for k in dom.keys() if k != "resample"}
  if "resample" in dom:
    _check_resample(f"domains.{name}.resample", dom.resample)
    rates = dataclasses.replace(rates, **dom.resample)
  return Domain(name=name, resample=rates, **{**DOMAIN_DEFAULTS, **given})


def resolve_data_config(cfg: ml_collections.ConfigDict, process_count: int = 1
                        ) -> PretrainData | SftData:
  """`cfg` validated (validate_data_config) and turned into its typed piece."""
  validate_data_config(cfg, process_count)
  return data_piece(cfg)
