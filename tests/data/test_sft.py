"""Stage-2 pipeline: packing conserves examples, masks/segments/positions, over-limit policy,
bad input counting and strict mode, determinism, resume, process sharding."""

import collections
import json
import os

import numpy as np
import pytest

from ultralong_jax.data import bad_input as bi
from ultralong_jax.data import chat_template
from ultralong_jax.data import config as config_lib
from ultralong_jax.data import sft
from ultralong_jax.data import tokenizer as tok_lib


def _sft_pipeline(cfg, **kwargs):
  """build_sft_pipeline of a data ConfigDict, validated and resolved into its piece."""
  return sft.build_sft_pipeline(config_lib.resolve_data_config(cfg), **kwargs)


def chats(n: int, seed: int = 0) -> list[dict]:
  rng = np.random.default_rng(seed)
  words = "the cat sat on a mat long context rivers numbers 12 345".split()
  out = []
  for i in range(n):
    turns = [{"role": "system", "content": f"chat {i}"}] if i % 3 == 0 else []
    for _ in range(rng.integers(1, 3)):
      turns.append({"role": "user", "content": " ".join(rng.choice(words, rng.integers(1, 12)))})
      turns.append({"role": "assistant",
                    "content": f"id{i} " + " ".join(rng.choice(words, rng.integers(1, 12)))})
    out.append({"messages": turns})
  return out


def make_cfg(files: str, tokenizer: str, **kw):
  cfg = config_lib.default_data_config(2)
  cfg.chat_files, cfg.tokenizer, cfg.vocab_size = files, tokenizer, 600
  cfg.seq_len, cfg.global_batch_size, cfg.max_example_len, cfg.num_epochs = 256, 2, 200, 1
  for k, v in kw.items():
    cfg[k] = v
  return cfg


def unpack(batches, expected=None):
  """Packed rows -> list of (example ids, loss_mask over the example's inputs).

  An example's tokens are its inputs, plus the row's extra last token (row[L], seen only as
  the final target) when the example runs to the end of the row; `expected` (a set of id
  tuples) decides that case, which the features alone cannot.
  """
  examples = []
  for b in batches:
    for i in range(len(b["inputs"])):
      seg, inputs, targets = b["segment_ids"][i], b["inputs"][i], b["targets"][i]
      for s in np.unique(seg[seg > 0]):
        idx = np.flatnonzero(seg == s)
        assert (np.diff(idx) == 1).all()  # an example is contiguous in its row
        assert (b["positions"][i][idx] == np.arange(len(idx))).all()
        ids = tuple(int(t) for t in inputs[idx])
        if expected is not None and ids not in expected and idx[-1] == len(seg) - 1:
          ids += (int(targets[-1]),)
        examples.append((ids, b["loss_mask"][i][idx]))
  return examples


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory, jsonl_writer):
  path = str(tmp_path_factory.mktemp("chats") / "chats.jsonl.gz")
  return jsonl_writer(path, chats(40)), chats(40)


def test_packing_keeps_every_example_once_with_assistant_only_loss(chat_file, hf_tokenizer_path):
  path, data = chat_file
  cfg = make_cfg(path, hf_tokenizer_path)
  pipe = _sft_pipeline(cfg, process_index=0, process_count=1)
  batches = list(pipe.iterator())
  template = chat_template.Llama31ChatTemplate(tok_lib.load_tokenizer(hf_tokenizer_path))
  expected = {}
  for c in data:
    ids, trainable = template.render(c["messages"])
    expected[tuple(ids)] = trainable
  got = unpack(batches, expected)
  assert sorted(e[0] for e in got) == sorted(expected)
  for ids, loss in got:
    # loss_mask[t] trains target t + 1 of the same example: exactly the assistant tokens; an
    # example's last token has no target inside the example.
    want = np.append(expected[ids][1:], 0)[: len(loss)]
    assert (loss == want).all()
  for b in batches:
    assert (b["loss_mask"][b["segment_ids"] == 0] == 0).all()
    assert b["inputs"].shape == (2, 256) and b["loss_mask"].dtype == np.float32


def test_best_fit_also_conserves(chat_file, hf_tokenizer_path):
  path, data = chat_file
  cfg = make_cfg(path, hf_tokenizer_path, packing="best_fit", global_batch_size=1)
  got = unpack(_sft_pipeline(cfg, process_index=0, process_count=1).iterator())
  assert len({ids for ids, _ in got}) == len(got) == len(data)


@pytest.mark.parametrize("policy", ["drop", "truncate"])
def test_over_limit_examples_dropped_or_truncated_and_counted(policy, tmp, hf_tokenizer_path, jsonl_writer):
  long_chat = {"messages": [{"role": "user", "content": "hi"},
                            {"role": "assistant", "content": "the cat " * 200}]}
  path = jsonl_writer(os.path.join(tmp, "c.jsonl"), chats(5) + [long_chat])
  cfg = make_cfg(path, hf_tokenizer_path, over_limit=policy, global_batch_size=1)
  pipe = _sft_pipeline(cfg, process_index=0, process_count=1)
  it = pipe.iterator()
  got = unpack(list(it))
  counts = pipe.stats(it)["sft"]
  if policy == "drop":
    assert len(got) == 5 and counts[bi.OVER_LIMIT_DROPPED] == 1
  else:
    assert len(got) == 6 and counts["over_limit_truncated"] == 1
    assert max(len(ids) for ids, _ in got) == cfg.max_example_len


def test_bad_lines_are_counted_by_kind(tmp, hf_tokenizer_path, jsonl_writer):
  lines = chats(3) + [
      "{not json", b"\xff\xfe", {"msgs": []}, {"messages": []},
      {"messages": [{"role": "user", "content": "no answer"}]},
      {"messages": [{"role": "tool", "content": "x"}]}, ""]
  path = jsonl_writer(os.path.join(tmp, "c.jsonl"), lines)
  empty = jsonl_writer(os.path.join(tmp, "empty.jsonl"), [])
  cfg = make_cfg(f"{path},{empty}", hf_tokenizer_path, global_batch_size=1, num_packing_bins=1)
  pipe = _sft_pipeline(cfg, process_index=0, process_count=1)
  it = pipe.iterator()
  assert len(unpack(list(it))) == 3
  # Direct check of the per-record decisions (the packer's state may lag at the very end).
  render = sft.RenderChat(chat_template.Llama31ChatTemplate(
      tok_lib.load_tokenizer(hf_tokenizer_path)), 200, "drop", 600, strict=False)
  from ultralong_jax.data.jsonl_source import JsonlSource
  src = JsonlSource([path])
  kinds = collections.Counter(r.kind for r in map(render, (src[i] for i in range(len(src))))
                              if isinstance(r, bi.Dropped))
  assert kinds == {bi.MALFORMED_JSON: 1, bi.INVALID_UTF8: 1, bi.MISSING_FIELD: 1,
                   bi.EMPTY_DOCUMENT: 2, bi.NO_ASSISTANT_TOKENS: 1, bi.INVALID_FIELD: 1}
  assert pipe.build_stats["bad_input"] == {bi.EMPTY_SOURCE: 1}
  counted = pipe.stats(it)["sft"]
  assert counted["examples"] == 3 and sum(counted.get(k, 0) for k in kinds) == 7


def test_strict_mode_names_file_and_line(tmp, hf_tokenizer_path, jsonl_writer):
  path = jsonl_writer(os.path.join(tmp, "c.jsonl"), chats(2) + ["{oops"])
  cfg = make_cfg(path, hf_tokenizer_path, strict=True, global_batch_size=1)
  with pytest.raises(Exception, match=r"c\.jsonl:3: malformed_json"):
    list(_sft_pipeline(cfg, process_index=0, process_count=1).iterator())


def test_out_of_vocab_ids_dropped(chat_file, hf_tokenizer_path):
  path, _ = chat_file
  render = sft.RenderChat(chat_template.Llama31ChatTemplate(
      tok_lib.load_tokenizer(hf_tokenizer_path)), 200, "drop", vocab_size=50, strict=False)
  line = json.dumps(chats(1)[0]).encode()
  assert render((line, "x:1")).kind == bi.TOKEN_OUT_OF_VOCAB


def test_deterministic_resumable_and_sharded(chat_file, hf_tokenizer_path):
  path, data = chat_file
  cfg = make_cfg(path, hf_tokenizer_path, global_batch_size=1, num_epochs=0)

  def build(p=0, n=1, c=cfg):
    return _sft_pipeline(c, process_index=p, process_count=n).iterator()

  a, b = build(), build()
  first = [next(a) for _ in range(3)]
  assert all((x["inputs"] == next(b)["inputs"]).all() for x in first)
  state = a.get_state()
  want = [next(a) for _ in range(3)]
  fresh = build()
  fresh.set_state(json.loads(json.dumps(state)))
  assert all((w["inputs"] == next(fresh)["inputs"]).all() for w in want)
  # Two processes, one epoch: disjoint examples that together are all of them.
  one_epoch = make_cfg(path, hf_tokenizer_path, global_batch_size=2)
  parts = [{e[0] for e in unpack(build(p, 2, one_epoch))} for p in range(2)]
  assert not parts[0] & parts[1] and len(parts[0] | parts[1]) == len(data)
