"""TFDS as a source: a tiny TFDS dataset built here in the ArrayRecord format (no TensorFlow)
trains both stages and gives exactly the batches of the same records given as JSONL.

The reference is the JSONL path of each stage (tested on its own in test_prepare, test_pretrain
and test_sft): the TFDS builders below write the records of generated JSONL files in file order
(shuffling disabled), so every TFDS route must yield the JSONL route's tokens, batch for batch.
"""

import json
import math
import os
import shutil
import sys

import ml_collections
import numpy as np
import pytest

from ultralong_jax.data import bad_input as bi
from ultralong_jax.data import config as config_lib
from ultralong_jax.data import prepare
from ultralong_jax.data import pretrain
from ultralong_jax.data import sft
from ultralong_jax.data import shards
from ultralong_jax.data import synthetic
from ultralong_jax.data import tfds_source

VOCAB = 512  # the tiny model preset's vocabulary
N_DOCS, N_CHATS = 300, 200
BAD_DOCS = {17: "", 140: "   "}  # index in the TFDS split -> text (empty documents)
BAD_CHATS = {  # index -> messages: an unsupported role, no assistant turn, no messages
    11: [{"role": "tool", "content": "42"}, {"role": "assistant", "content": "ok"}],
    57: [{"role": "user", "content": "hello?"}],
    123: []}


def _pretrain_pipeline(cfg, **kwargs):
  """build_pretrain_pipeline of a data ConfigDict, validated and resolved into its piece."""
  return pretrain.build_pretrain_pipeline(config_lib.resolve_data_config(cfg), **kwargs)


def _sft_pipeline(cfg, **kwargs):
  """build_sft_pipeline of a data ConfigDict, validated and resolved into its piece."""
  return sft.build_sft_pipeline(config_lib.resolve_data_config(cfg), **kwargs)


def _records(path: str, bad: dict) -> list[dict]:
  with open(path) as f:
    records = [json.loads(line) for line in f]
  for i in sorted(bad):
    records.insert(i, {"text": bad[i]} if isinstance(bad[i], str) else {"messages": bad[i]})
  return records


def _build_tfds(data_dir: str, name: str, features, records: list[dict]) -> None:
  """A GeneratorBasedBuilder written to ArrayRecord; records in order (shuffling disabled)."""
  import tensorflow_datasets as tfds

  class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")
    code_path = None  # no checksums file to look up next to this module: nothing is downloaded

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True)

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i, r in enumerate(records):
        yield i, r

  Builder.name = name
  Builder(data_dir=data_dir, file_format="array_record").download_and_prepare()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  import tensorflow_datasets as tfds
  d = str(tmp_path_factory.mktemp("tfds_corpus"))
  tok = synthetic.build_tokenizer(os.path.join(d, "tokenizer.json"), vocab_size=VOCAB)
  docs = _records(synthetic.write_documents(os.path.join(d, "raw_docs.jsonl"), N_DOCS, seed=0,
                                            max_sentences=40), BAD_DOCS)
  chats = _records(synthetic.write_chats(os.path.join(d, "raw_chats.jsonl"), N_CHATS, seed=1,
                                         max_sentences=8), BAD_CHATS)
  for name, records in (("docs.jsonl", docs), ("chats.jsonl", chats)):
    with open(os.path.join(d, name), "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in records)
  data_dir = os.path.join(d, "tfds")
  text = tfds.features.Text()
  _build_tfds(data_dir, "tiny_docs", tfds.features.FeaturesDict({"text": text, "id": np.int64}),
              [{"text": r["text"], "id": r.get("id", -1)} for r in docs])
  _build_tfds(data_dir, "tiny_chats", tfds.features.FeaturesDict(
      {"messages": tfds.features.Sequence({"role": text, "content": text})}), chats)
  return {"dir": d, "tokenizer": tok, "data_dir": data_dir, "docs": os.path.join(d, "docs.jsonl"),
          "chats": os.path.join(d, "chats.jsonl"), "num_docs": len(docs)}


def stage1_cfg(corpus, domain: dict, seq_len: int = 128, batch: int = 2):
  cfg = config_lib.default_data_config(1)
  cfg.seq_len, cfg.global_batch_size, cfg.vocab_size = seq_len, batch, VOCAB
  cfg.tokenizer, cfg.separator_id = corpus["tokenizer"], 1
  # Thresholds inside this corpus's length range, so both rates draw (0.5 / 2.0 by default).
  cfg.resample.short_threshold, cfg.resample.long_threshold = 100, 250
  cfg.domains.docs = ml_collections.ConfigDict(dict(weight=1.0, **domain))
  return cfg


def stage2_cfg(corpus, **source):
  cfg = config_lib.default_data_config(2)
  cfg.tokenizer, cfg.vocab_size = corpus["tokenizer"], VOCAB
  cfg.seq_len, cfg.global_batch_size, cfg.max_example_len, cfg.num_epochs = 256, 2, 256, 1
  for k, v in source.items():
    cfg[k] = v
  return cfg


def take(pipe, n: int, it=None):
  it = it if it is not None else pipe.iterator()
  return [next(it) for _ in range(n)], it


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_stage1_tfds_domain_gives_the_jsonl_batches(corpus, tmp_path):
  """prepare(JSONL), prepare --tfds_name and the on-the-fly TFDS domain: the same documents in
  the same order, the same bad-input counts, so the same resampling plan and batches."""
  d = str(tmp_path)
  m_jsonl = prepare.prepare([corpus["docs"]], f"{d}/jsonl", corpus["tokenizer"], num_shards=1,
                            num_workers=1, progress=False)
  prepare.main([f"--tfds_name=tiny_docs", f"--tfds_data_dir={corpus['data_dir']}",
                f"--tokenizer={corpus['tokenizer']}", f"--output_dir={d}/tfds", "--num_shards=1",
                "--num_workers=1"])
  m_tfds = shards.load_prepared(f"{d}/tfds").manifest
  assert m_jsonl["bad_input"] == m_tfds["bad_input"] == {bi.EMPTY_DOCUMENT: len(BAD_DOCS)}
  assert m_tfds["num_documents"] == m_jsonl["num_documents"] == corpus["num_docs"] - len(BAD_DOCS)
  assert m_tfds["sources"] == ["tfds:tiny_docs/train"]
  for a, b in zip(shards.load_prepared(f"{d}/jsonl").shard_paths,
                  shards.load_prepared(f"{d}/tfds").shard_paths):
    with open(a, "rb") as fa, open(b, "rb") as fb:
      assert fa.read() == fb.read()

  on_the_fly = dict(tfds="tiny_docs:train", data_dir=corpus["data_dir"])
  domains = {"jsonl": dict(path=f"{d}/jsonl"), "prepared": dict(path=f"{d}/tfds"),
             "tfds": on_the_fly}
  pipes = {name: _pretrain_pipeline(stage1_cfg(corpus, dom), process_index=0,
                                                  process_count=1, cache_dir=f"{d}/cache")
           for name, dom in domains.items()}
  plan = pipes["jsonl"].build_stats["domains"]["docs"]
  assert plan["short_documents_after"] != plan["short_documents_before"]  # rates drew
  assert plan["long_documents_after"] != plan["long_documents_before"]
  for p in pipes.values():
    assert p.build_stats["domains"]["docs"] == plan
  want, _ = take(pipes["jsonl"], 6)
  for name in ("prepared", "tfds"):
    got, it = take(pipes[name], 6)
    assert_same_batches(got, want)
  counts = pipes["tfds"].stats(it)["mix"]
  assert counts["docs/tokens"] > 6 * 2 * 128 - 1000 and counts["docs/documents"] > 0
  # In a Grain worker process: the pickled reader reopens the dataset and tokenizes there.
  cfg = stage1_cfg(corpus, on_the_fly)
  cfg.num_workers = 1
  it = _pretrain_pipeline(cfg, process_index=0, process_count=1,
                                        cache_dir=f"{d}/cache").iterator()
  got, _ = take(None, 6, it)
  assert_same_batches(got, want)
  it.close()


def test_stage1_tfds_domain_resumes_caches_and_pickles(corpus, tmp_path):
  d = str(tmp_path)
  cfg = stage1_cfg(corpus, dict(tfds="tiny_docs:train", data_dir=corpus["data_dir"]))
  pipe = _pretrain_pipeline(cfg, process_index=0, process_count=1, cache_dir=d)
  _, it = take(pipe, 3)
  state = it.get_state()
  want, _ = take(pipe, 3, it)
  fresh = pipe.iterator()
  fresh.set_state(state)
  got, _ = take(pipe, 3, fresh)
  assert_same_batches(got, want)
  assert pipe.stats(fresh)["mix"] == pipe.stats(it)["mix"]
  # The token counts are cached: a second build reads them instead of tokenizing again.
  cached = os.listdir(d)
  assert len(cached) == 1 and cached[0].startswith("tiny_docs-")
  docs = tfds_source.TfdsDocuments("tiny_docs:train", corpus["data_dir"], "text",
                                   corpus["tokenizer"], "key", strict=False, cache_dir=d)
  assert docs.bad_input == {bi.EMPTY_DOCUMENT: len(BAD_DOCS)}
  assert not set(BAD_DOCS) & set(docs.index.tolist())
  # What a Grain worker process gets: a pickled reader that reopens the dataset itself.
  import pickle
  clone = pickle.loads(pickle.dumps(docs))
  assert clone.source._source is None
  for k in (0, 100, len(docs.index) - 1):
    np.testing.assert_array_equal(clone(k), docs(k))
    assert len(clone(k)) == docs.lengths[k]


def test_stage2_tfds_chats_give_the_jsonl_batches_and_counts(corpus):
  jsonl = _sft_pipeline(stage2_cfg(corpus, chat_files=corpus["chats"]),
                                 process_index=0, process_count=1)
  tfds_cfg = stage2_cfg(corpus, chat_tfds="tiny_chats:train",
                        chat_tfds_data_dir=corpus["data_dir"])
  pipe = _sft_pipeline(tfds_cfg, process_index=0, process_count=1)
  jsonl_it = jsonl.iterator()
  want = list(jsonl_it)
  it = pipe.iterator()
  got = list(it)
  assert len(want) > 5
  assert_same_batches(got, want)
  counts = pipe.stats(it)["sft"]
  assert counts == jsonl.stats(jsonl_it)["sft"]
  assert counts["examples"] == N_CHATS
  assert {k: counts[k] for k in (bi.INVALID_FIELD, bi.NO_ASSISTANT_TOKENS, bi.EMPTY_DOCUMENT)} == {
      bi.INVALID_FIELD: 1, bi.NO_ASSISTANT_TOKENS: 1, bi.EMPTY_DOCUMENT: 1}
  # Resume mid-epoch from the iterator state.
  two = stage2_cfg(corpus, chat_tfds="tiny_chats:train", chat_tfds_data_dir=corpus["data_dir"])
  two.num_epochs = 0
  pipe = _sft_pipeline(two, process_index=0, process_count=1)
  _, it = take(pipe, 2)
  state = it.get_state()
  want, _ = take(pipe, 2, it)
  fresh = pipe.iterator()
  fresh.set_state(state)
  got, _ = take(pipe, 2, fresh)
  assert_same_batches(got, want)


def test_chat_feature_shapes():
  """Columns (a Sequence feature), a list of dicts, or JSON text: all the same chat."""
  chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
  want = {"messages": chat}
  columns = {"role": [b"user", b"assistant"], "content": np.asarray([b"hi", b"yo"], object)}
  assert tfds_source.chat_from_example({"messages": columns}, "w", False) == want
  as_bytes = [{k: v.encode() for k, v in m.items()} for m in chat]
  assert tfds_source.chat_from_example({"messages": as_bytes}, "w", False) == want
  assert tfds_source.chat_from_example({"messages": json.dumps(chat).encode()}, "w", False) == want
  bad = tfds_source.chat_from_example({"messages": {"role": [b"\xff"], "content": [b"x"]}}, "w",
                                      False)
  assert isinstance(bad, bi.Dropped) and bad.kind == bi.INVALID_UTF8
  assert tfds_source.chat_from_example({"text": b"x"}, "w", False).kind == bi.MISSING_FIELD
  with pytest.raises(bi.BadInputError, match="w: malformed_json"):
    tfds_source.chat_from_example({"messages": b"[{"}, "w", True)


def test_strict_mode_names_the_tfds_record(corpus, tmp_path):
  cfg = stage1_cfg(corpus, dict(tfds="tiny_docs:train", data_dir=corpus["data_dir"]))
  cfg.strict = True
  with pytest.raises(bi.BadInputError, match=rf"tfds:tiny_docs/train:{min(BAD_DOCS)}: "
                                             "empty_document"):
    _pretrain_pipeline(cfg, process_index=0, process_count=1,
                                     cache_dir=str(tmp_path))


def test_config_and_dataset_errors_name_the_key_and_the_fix(corpus, tmp_path, monkeypatch):
  good = dict(tfds="tiny_docs:train", data_dir=corpus["data_dir"])
  for domain, match in ((dict(tfds="tiny_docs"), r"data.domains.docs.tfds: .*name:split"),
                        (dict(tfds="tiny_docs:train"), r"data.domains.docs.data_dir"),
                        (dict(good, path="/x"), r"data.domains.docs: .*`path`.* or `tfds`")):
    with pytest.raises(ValueError, match=match):
      config_lib.validate_data_config(stage1_cfg(corpus, domain))
  with pytest.raises(ValueError, match="exactly one"):
    config_lib.validate_data_config(stage2_cfg(corpus, chat_files="a.jsonl",
                                               chat_tfds="tiny_chats:train"))
  cfg = stage1_cfg(corpus, dict(tfds="nope:train", data_dir=corpus["data_dir"]))
  with pytest.raises(FileNotFoundError, match=r"data.domains.docs.tfds: no TFDS dataset 'nope'.*"
                                              "tfds.builder\\('nope'.*array_record"):
    _pretrain_pipeline(cfg, process_index=0, process_count=1,
                                     cache_dir=str(tmp_path))
  cfg = stage2_cfg(corpus, chat_tfds="tiny_chats:test", chat_tfds_data_dir=corpus["data_dir"])
  with pytest.raises(ValueError, match=r"data.chat_tfds: 'tiny_chats:test': .*split"):
    _sft_pipeline(cfg, process_index=0, process_count=1)

  # A dataset stored as TFRecord only: the error gives the conversion command.
  data_dir = str(tmp_path / "tfrecord")
  shutil.copytree(os.path.join(corpus["data_dir"], "tiny_chats"),
                  os.path.join(data_dir, "tiny_chats"))
  info_path = os.path.join(data_dir, "tiny_chats", "1.0.0", "dataset_info.json")
  with open(info_path) as f:
    info = json.load(f)
  info["fileFormat"] = "tfrecord"
  with open(info_path, "w") as f:
    json.dump(info, f)
  version_dir = os.path.dirname(info_path)
  cfg = stage2_cfg(corpus, chat_tfds="tiny_chats:train", chat_tfds_data_dir=data_dir)
  convert = ("tfds convert_format --dataset_version_dir=" + version_dir +
             " --out_file_format=array_record")
  with pytest.raises(ValueError, match="data.chat_tfds: .*tfrecord.*") as e:
    _sft_pipeline(cfg, process_index=0, process_count=1)
  assert convert in str(e.value)
  if "tensorflow" not in sys.modules and not _has_tensorflow():
    with pytest.raises(ValueError, match="--tfds_name: .*tensorflow-cpu") as e:
      prepare.prepare([], str(tmp_path / "out"), corpus["tokenizer"], text_field="messages",
                      tfds_spec=("tiny_chats", data_dir, "train"), num_workers=1, progress=False)
    assert convert in str(e.value)

  # tensorflow-datasets missing: the config check names the key and the requirements file.
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  monkeypatch.setattr(tfds_source.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(ImportError, match=r"data.domains.docs.tfds .*requirements-tfds.txt"):
    config_lib.validate_data_config(stage1_cfg(corpus, good))
  with pytest.raises(ImportError, match=r"--tfds_name .*requirements-tfds.txt"):
    prepare.prepare([], str(tmp_path / "out2"), corpus["tokenizer"],
                    tfds_spec=("tiny_docs", corpus["data_dir"], "train"), num_workers=1,
                    progress=False)
  assert not os.path.exists(tmp_path / "out2")  # nothing started


def _has_tensorflow() -> bool:
  import importlib.util
  return importlib.util.find_spec("tensorflow") is not None


@pytest.mark.parametrize("stage", [1, 2])
def test_each_stage_trains_from_tfds(stage, corpus, tmp_path):
  """A few train steps of the real loop on the tiny model, fed from TFDS only."""
  from ultralong_jax.training import config as train_config
  from ultralong_jax.training import loop
  c = train_config.base_config(stage)
  c.model.preset, c.model.dtype, c.model.remat_policy, c.model.ultralong = (
      "tiny", "float32", "none", "")
  c.model.rope_scaling_json = ('{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, '
                               '"high_freq_factor": 4.0, "original_max_position_embeddings": 64}')
  c.init.mode = "random"
  for axis, size in dict(data=2, fsdp=1, sequence=2, tensor=2).items():
    c.mesh[axis] = size
  data = (stage1_cfg(corpus, dict(tfds="tiny_docs:train", data_dir=corpus["data_dir"]))
          if stage == 1 else stage2_cfg(corpus, chat_tfds="tiny_chats:train",
                                        chat_tfds_data_dir=corpus["data_dir"]))
  data.seq_len, data.num_epochs = 128, 0
  if stage == 2:
    data.max_example_len = 128
  c.data = data
  c.train.steps, c.train.loss_chunk_size = 3, 32
  c.checkpoint.every_steps = 3
  c.export.hf = False
  summary = loop.run(c, str(tmp_path), progress=False)
  assert summary["complete"] and summary["end_step"] == 3
  with open(os.path.join(str(tmp_path), "metrics.jsonl")) as f:
    losses = [json.loads(line)["loss"] for line in f]
  assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
  assert abs(losses[0] - math.log(VOCAB)) < 1.0  # a random model starts near ln V
  if stage == 1:
    assert summary["data"]["realized_mix"] == {"docs": 1.0}
