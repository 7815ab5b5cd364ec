"""Stage-1 pipeline: conservation, separators, features, resampling, mix, determinism, resume,
multi-process sharding. Corpora are synthetic token documents written in the prepared format,
so every expectation is computed by hand from the documents."""

import collections
import json
import os

import grain
import ml_collections
import numpy as np
import pytest

from ultralong_jax.data import config as config_lib
from ultralong_jax.data import features
from ultralong_jax.data import pretrain
from ultralong_jax.data import resample
from ultralong_jax.data import shards

SEP = 1
VOCAB = 1000


def _pretrain_pipeline(cfg, **kwargs):
  """build_pretrain_pipeline of a data ConfigDict, validated and resolved into its piece."""
  return pretrain.build_pretrain_pipeline(config_lib.resolve_data_config(cfg), **kwargs)


def write_prepared(path: str, docs: list[np.ndarray], domain: str, num_shards: int = 2) -> None:
  """Writes documents in the format prepare produces (document k -> shard k % num_shards)."""
  from array_record.python import array_record_module as arm
  os.makedirs(path, exist_ok=True)
  info = []
  for s in range(num_shards):
    name = shards.shard_name(s, num_shards)
    w = arm.ArrayRecordWriter(os.path.join(path, name), "group_size:1")
    mine = docs[s::num_shards]
    for d in mine:
      w.write(shards.encode_doc(d))
    w.close()
    np.save(os.path.join(path, shards.lengths_name(name)), np.asarray([len(d) for d in mine]))
    info.append(dict(file=name, lengths=shards.lengths_name(name), num_documents=len(mine),
                     num_tokens=int(sum(len(d) for d in mine))))
  manifest = dict(format_version=shards.FORMAT_VERSION, domain=domain, tokenizer="synthetic",
                  vocab_size=VOCAB, max_token_id=int(max(d.max() for d in docs)),
                  num_documents=len(docs), num_tokens=int(sum(map(len, docs))), shards=info,
                  bad_input={})
  with open(os.path.join(path, shards.MANIFEST), "w") as f:
    json.dump(manifest, f)


def make_docs(n: int, seed: int, low: int = 2, high: int = 120, first_id: int = 10
              ) -> list[np.ndarray]:
  """Documents whose first token is a unique id, so each can be recognized in the stream."""
  rng = np.random.default_rng(seed)
  docs = []
  for i in range(n):
    body = rng.integers(first_id + n, VOCAB, size=rng.integers(low, high))
    docs.append(np.concatenate([[first_id + i], body]).astype(np.int32))
  return docs


def stored_order(docs):
  """Global record order of a prepared directory: shard 0's documents, then shard 1's."""
  return docs[0::2] + docs[1::2]


def make_cfg(domains: dict[str, str], seq_len: int = 64, batch: int = 2, **kw):
  cfg = config_lib.default_data_config(1)
  cfg.seq_len, cfg.global_batch_size, cfg.vocab_size, cfg.separator_id = seq_len, batch, VOCAB, SEP
  cfg.resample.short_rate = cfg.resample.long_rate = 1.0
  for name, path in domains.items():
    cfg.domains[name] = ml_collections.ConfigDict(dict(path=path, weight=1.0))
  for k, v in kw.items():
    cfg[k] = v
  return cfg


def rows_of(batches):
  """Batches -> list of (row tokens [<= L + 1], real mask) with padding removed."""
  rows = []
  for b in batches:
    for i in range(len(b["inputs"])):
      real = b["segment_ids"][i] > 0
      row = np.concatenate([b["inputs"][i][real], b["targets"][i][-1:]])
      if b["loss_mask"][i][-1] == 0 or not real.all():  # the row ends in padding
        row = row[:-1]
      rows.append(row)
  return rows


def all_batches(pipe, limit=10_000):
  it = pipe.iterator()
  out = []
  for b in it:
    out.append(b)
    assert len(out) < limit
  return out, it


def split_docs(stream: np.ndarray) -> list[tuple]:
  """Cuts the token stream at separators; each document is followed by exactly one."""
  assert stream[-1] == SEP
  cuts = np.flatnonzero(stream == SEP)
  return [tuple(d) for d in np.split(stream, cuts + 1)[:-1]]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("prepared") / "web")
  docs = make_docs(60, seed=0)
  write_prepared(path, docs, "web")
  return path, docs


def test_every_token_kept_once_and_separators_between_documents(corpus):
  path, docs = corpus
  cfg = make_cfg({"web": path}, num_epochs=1, global_batch_size=1)
  pipe = _pretrain_pipeline(cfg, process_index=0, process_count=1)
  batches, it = all_batches(pipe)
  assert all(b["inputs"].shape == (1, 64) for b in batches)
  stream = np.concatenate(rows_of(batches))
  # Every row but the last is exactly L + 1 real tokens (concat-then-split never pads).
  assert all(len(r) == 65 for r in rows_of(batches)[:-1])
  got = split_docs(stream)
  assert sorted(got) == sorted(tuple(d) + (SEP,) for d in docs)
  assert len(stream) == sum(len(d) + 1 for d in docs)
  # Counters are as of the packer's last checkpoint, which lags the documents of its final
  # rows (stats.collect_stats); the stream above is the exact check.
  mix = pipe.stats(it)["mix"]
  assert 60 - 3 <= mix["web/documents"] <= 60 and mix["web/tokens"] <= sum(map(len, docs))
  assert pretrain.realized_mix(pipe.stats(it)) == {"web": 1.0}


@pytest.mark.parametrize("packing", ["first_fit", "best_fit"])
def test_fit_packing_keeps_every_document_whole_in_one_row(corpus, packing):
  path, docs = corpus
  cfg = make_cfg({"web": path}, seq_len=128, num_epochs=1, global_batch_size=1, packing=packing,
                 num_packing_bins=4)
  batches, _ = all_batches(_pretrain_pipeline(cfg, process_index=0,
                                                            process_count=1))
  whole = []
  for b in batches:
    real = b["segment_ids"][0] > 0
    row = b["inputs"][0][real]
    if real.all() and b["loss_mask"][0][-1]:  # a full row: its last token is the last target
      row = np.concatenate([row, b["targets"][0][-1:]])
    assert row[-1] == SEP  # a row ends at a document's end, never inside one
    whole += split_docs(row)
    # padding is never a target, and no target crosses from padding into text
    assert not b["loss_mask"][0][~real].any()
  assert sorted(whole) == sorted(tuple(d) + (SEP,) for d in docs)
  assert len(batches) < len(docs)  # rows hold several documents
  too_short = make_cfg({"web": path}, seq_len=64, packing=packing)
  longest = max(map(len, docs))
  with pytest.raises(ValueError, match=rf"data.packing='{packing}': \d+ document.*longest has "
                     rf"{longest} tokens.*packing='concat'"):
    _pretrain_pipeline(too_short, process_index=0, process_count=1)


def test_features_cross_document_hand_case():
  # Row of L + 1 = 7 tokens: doc A = [5, 6] + sep, doc B = [7, 8, 9], then padding (0).
  row = np.array([5, 6, SEP, 7, 8, 9, 0])
  seg = np.array([1, 1, 1, 2, 2, 2, 0])
  pos = np.array([0, 1, 2, 0, 1, 2, 0])
  f = features.pretrain_features(row, seg, pos, document_mask=False)
  assert f["inputs"].tolist() == [5, 6, SEP, 7, 8, 9]
  assert f["targets"].tolist() == [6, SEP, 7, 8, 9, 0]
  assert f["positions"].tolist() == [0, 1, 2, 3, 4, 5]
  assert f["segment_ids"].tolist() == [1, 1, 1, 1, 1, 1]
  assert f["loss_mask"].tolist() == [1, 1, 1, 1, 1, 0]
  f = features.pretrain_features(row, seg, pos, document_mask=True)
  assert f["positions"].tolist() == [0, 1, 2, 0, 1, 2]
  assert f["segment_ids"].tolist() == [1, 1, 1, 2, 2, 2]
  # The separator's target is the next document's first token, which it cannot see.
  assert f["loss_mask"].tolist() == [1, 1, 0, 1, 1, 0]
  assert {k: v.dtype for k, v in f.items()} == {
      "inputs": np.int32, "targets": np.int32, "positions": np.int32, "segment_ids": np.int32,
      "loss_mask": np.float32}


def test_document_mask_positions_restart_after_separator(corpus):
  path, _ = corpus
  cfg = make_cfg({"web": path}, document_mask=True)
  b = next(_pretrain_pipeline(cfg, process_index=0, process_count=1).iterator())
  for i in range(2):
    inputs, pos, seg = b["inputs"][i], b["positions"][i], b["segment_ids"][i]
    starts = np.flatnonzero(np.diff(seg) != 0) + 1
    assert (inputs[starts - 1] == SEP).all()  # every new segment follows a separator
    assert (pos[starts] == 0).all() and pos[0] == 0
    assert (np.diff(pos)[np.diff(seg) == 0] == 1).all()
  cross = make_cfg({"web": path})
  b = next(_pretrain_pipeline(cross, process_index=0, process_count=1).iterator())
  assert (b["positions"] == np.arange(64)).all() and (b["segment_ids"] == 1).all()
  assert (b["loss_mask"] == 1).all()


def test_resampling_copies_match_plan(tmp_path):
  docs = make_docs(80, seed=1, low=1, high=40)
  path = str(tmp_path / "web")
  write_prepared(path, docs, "web")
  cfg = make_cfg({"web": path}, num_epochs=1, global_batch_size=1)
  cfg.resample = ml_collections.ConfigDict(dict(short_threshold=10, short_rate=0.5,
                                                long_threshold=25, long_rate=2.0))
  batches, _ = all_batches(_pretrain_pipeline(cfg, process_index=0,
                                                            process_count=1))
  got = collections.Counter(split_docs(np.concatenate(rows_of(batches))))
  ordered = stored_order(docs)
  plan = resample.plan_domain("web", np.array([len(d) for d in ordered]),
                              config_lib.resolve_data_config(cfg).domains["web"].resample, cfg.seed)
  expected = collections.Counter()
  for d, c in zip(ordered, plan.copies):
    if c:
      expected[tuple(d) + (SEP,)] = int(c)
  assert got == expected
  lengths = np.array([len(d) for d in ordered])
  assert (plan.copies[lengths > 25] == 2).all()
  assert (plan.copies[(lengths >= 10) & (lengths <= 25)] == 1).all()
  assert set(plan.copies[lengths < 10]) <= {0, 1}


def test_same_seed_same_batches_and_other_seed_differs(corpus):
  path, _ = corpus

  def take(seed, n=4):
    it = _pretrain_pipeline(make_cfg({"web": path}, seed=seed), process_index=0,
                                          process_count=1).iterator()
    return [next(it)["inputs"] for _ in range(n)]

  a, b, c = take(0), take(0), take(1)
  assert all((x == y).all() for x, y in zip(a, b))
  assert not all((x == y).all() for x, y in zip(a, c))


def test_resume_from_iterator_state_gives_next_batches(corpus):
  path, _ = corpus
  cfg = make_cfg({"web": path}, seq_len=48)
  pipe = _pretrain_pipeline(cfg, process_index=0, process_count=1)
  it = pipe.iterator()
  for _ in range(5):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  fresh = _pretrain_pipeline(cfg, process_index=0, process_count=1).iterator()
  fresh.set_state(json.loads(json.dumps(state)))  # the state must survive JSON (Orbax) as is
  for want in expected:
    got = next(fresh)
    assert all((got[k] == want[k]).all() for k in features.FEATURES)


def test_orbax_checkpoint_round_trip(corpus, tmp_path):
  import orbax.checkpoint as ocp
  path, _ = corpus
  cfg = make_cfg({"web": path}, seq_len=48)
  it = _pretrain_pipeline(cfg, process_index=0, process_count=1).iterator()
  for _ in range(3):
    next(it)
  mngr = ocp.CheckpointManager(str(tmp_path / "ckpt"), item_names=("data_iter",),
                               item_handlers={"data_iter": grain.checkpoint.CheckpointHandler()})
  mngr.save(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  want = next(it)
  fresh = _pretrain_pipeline(cfg, process_index=0, process_count=1).iterator()
  mngr.restore(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(fresh)))
  mngr.close()
  assert (next(fresh)["inputs"] == want["inputs"]).all()


def test_processes_partition_documents(corpus):
  path, docs = corpus
  seen = []
  for p in range(2):
    cfg = make_cfg({"web": path}, num_epochs=1, global_batch_size=2)
    batches, _ = all_batches(_pretrain_pipeline(cfg, process_index=p,
                                                              process_count=2))
    assert all(b["inputs"].shape == (1, 64) for b in batches)  # 2 rows over 2 processes
    seen.append(set(split_docs(np.concatenate(rows_of(batches)))))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == {tuple(d) + (SEP,) for d in docs}


def test_domain_mix_follows_token_weights(tmp_path):
  short_docs = make_docs(200, seed=2, low=5, high=20, first_id=10)
  long_docs = make_docs(100, seed=3, low=60, high=120, first_id=300)
  write_prepared(str(tmp_path / "a"), short_docs, "a")
  write_prepared(str(tmp_path / "b"), long_docs, "b")
  cfg = make_cfg({"a": str(tmp_path / "a"), "b": str(tmp_path / "b")}, seq_len=256)
  cfg.domains.a.weight, cfg.domains.b.weight = 3.0, 1.0
  pipe = _pretrain_pipeline(cfg, process_index=0, process_count=1)
  it = pipe.iterator()
  for _ in range(40):
    next(it)
  mix = pretrain.realized_mix(pipe.stats(it))
  # Weights are token shares although "a" has ~6x shorter documents.
  assert mix["a"] == pytest.approx(0.75, abs=0.03)
  # The mixed stream resumes exactly too.
  state = it.get_state()
  want = [next(it)["inputs"] for _ in range(3)]
  fresh = pipe.iterator()
  fresh.set_state(state)
  assert all((next(fresh)["inputs"] == w).all() for w in want)


def test_vocab_mismatch_is_a_config_error(corpus):
  path, _ = corpus
  cfg = make_cfg({"web": path}, vocab_size=50)
  with pytest.raises(ValueError, match=r"data.domains.web.path"):
    _pretrain_pipeline(cfg, process_index=0, process_count=1)


def test_workers_resume_and_count(corpus):
  """mp_prefetch workers: deterministic, resumable, counters summed over workers."""
  path, docs = corpus
  cfg = make_cfg({"web": path}, seq_len=48, num_workers=2)
  pipe = _pretrain_pipeline(cfg, process_index=0, process_count=1)
  it = pipe.iterator()
  first = [next(it) for _ in range(3)]
  state = it.get_state()
  want = [next(it) for _ in range(2)]
  counted = pipe.stats(it)["mix"]["web/tokens"]
  fresh = pipe.iterator()
  again = [next(fresh) for _ in range(3)]
  assert all((a["inputs"] == b["inputs"]).all() for a, b in zip(first, again))
  fresh.set_state(state)
  got = [next(fresh) for _ in range(2)]
  assert all((a["inputs"] == b["inputs"]).all() for a, b in zip(got, want))
  # 5 batches of 2 rows x 49 tokens went out; the counters lag behind documents that the
  # workers' packers still buffer, never ahead.
  assert 0 < counted <= 5 * 2 * 49
  it.close()
  fresh.close()


def test_corrupt_document_counted_or_fatal_with_shard_and_record(tmp_path):
  docs = make_docs(10, seed=4)
  docs[3] = docs[3].copy()
  docs[3][-1] = VOCAB + 5  # an id the manifest does not admit: a corrupt record
  path = str(tmp_path / "web")
  write_prepared(path, docs, "web")
  manifest_path = os.path.join(path, shards.MANIFEST)
  with open(manifest_path) as f:
    manifest = json.load(f)
  manifest["max_token_id"] = VOCAB - 1
  with open(manifest_path, "w") as f:
    json.dump(manifest, f)
  cfg = make_cfg({"web": path}, num_epochs=1, global_batch_size=1, seq_len=16)
  pipe = _pretrain_pipeline(cfg, process_index=0, process_count=1)
  batches, it = all_batches(pipe)
  got = split_docs(np.concatenate(rows_of(batches)))
  assert sorted(got) == sorted(tuple(d) + (SEP,) for i, d in enumerate(docs) if i != 3)
  assert pipe.stats(it)["mix"]["token_out_of_vocab"] == 1
  cfg.strict = True
  # Document 3 is record 1 of shard 1 (document k -> shard k % 2).
  with pytest.raises(Exception, match=r"docs-00001-of-00002.arrayrecord:1: token_out_of_vocab"):
    all_batches(_pretrain_pipeline(cfg, process_index=0, process_count=1))
