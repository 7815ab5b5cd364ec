"""The lm-evaluation-harness backend against lm_eval's own `hf` backend (transformers, float32).

A tiny random Llama saved with transformers' `save_pretrained` (its tokenizer adds
<|begin_of_text|> as Llama 3's does) is evaluated on three local tasks written here as lm_eval task
YAML + JSONL (multiple choice, generation with stop strings, rolling perplexity), once through
lm_eval's `hf` backend (batch 1: no padding on the reference side) and once through ours (batched,
bucketed, chunked prefill; sharded in the CLI test). Request by request: identical choices, greedy
flags and generations; log-likelihoods within 1e-4 (float32 sums of at most a few dozen token
log-probabilities).
"""

import json
import os

import numpy as np
import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm_eval's hf backend needs it

# No network: datasets reads these when it is first imported.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")

MAX_LENGTH = 48  # short, so that the rolling task needs several windows
TASKS = ["tiny_mc", "tiny_gen", "tiny_ppl"]
CHAT_TEMPLATE = os.path.join(os.path.dirname(__file__), "..", "data", "fixtures",
                             "llama31_chat_template.jinja")  # meta-llama/Llama-3.1-8B-Instruct's


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tokenizer_path):
  """A tiny random transformers Llama and its tokenizer (BOS added on encode) in one directory."""
  import tokenizers
  import torch
  import transformers
  tok = tokenizers.Tokenizer.from_file(tokenizer_path)
  bos = tok.token_to_id("<|begin_of_text|>")
  tok.post_processor = tokenizers.processors.TemplateProcessing(
      single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
      special_tokens=[("<|begin_of_text|>", bos)])
  out = tmp_path_factory.mktemp("hf_llama")
  hf_tok = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
  with open(CHAT_TEMPLATE) as f:
    hf_tok.chat_template = f.read()
  hf_tok.save_pretrained(out)
  config = transformers.LlamaConfig(
      vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
      rope_theta=10000.0, bos_token_id=bos,
      eos_token_id=[tok.token_to_id("<|eot_id|>"), tok.token_to_id("<|end_of_text|>")])
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():  # larger than the default init: logits far from ties
    for name, p in model.named_parameters():
      p.mul_(4.0) if not name.endswith("norm.weight") else p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(out)
  return str(out)


def _write_tasks(root) -> str:
  from ultralong_jax.evaluation import haystack
  words = haystack.filler_text(n_words=600, seed=3).split()
  root.mkdir(exist_ok=True)
  mc = [{"question": " ".join(words[i:i + 6 + i % 5]) + "?",
         "choices": [" " + " ".join(words[i + 20 + k:i + 21 + k + (k % 3)]) for k in range(4)],
         "answer": i % 4} for i in range(0, 60, 10)]
  gen = [{"question": " ".join(words[i:i + 5 + i % 7]), "answer": words[i + 12]}
         for i in range(100, 172, 12)]
  ppl = [{"text": " ".join(words[i:i + n])} for i, n in ((300, 12), (320, 40), (380, 90))]
  specs = {
      "tiny_mc": (mc, {"output_type": "multiple_choice", "doc_to_text": "{{question}}",
                       "doc_to_choice": "choices", "doc_to_target": "answer",
                       "metric_list": [{"metric": "acc"}]}),
      "tiny_gen": (gen, {"output_type": "generate_until", "doc_to_text": "{{question}}",
                         "doc_to_target": "{{answer}}",
                         "generation_kwargs": {"until": [".", "\n\n", "e", "ps"],
                                               "max_gen_toks": 10, "do_sample": False},
                         "metric_list": [{"metric": "exact_match"}]}),
      "tiny_ppl": (ppl, {"output_type": "loglikelihood_rolling", "doc_to_text": "",
                         "doc_to_target": "{{text}}",
                         "metric_list": [{"metric": "word_perplexity"}]}),
  }
  for name, (docs, spec) in specs.items():
    data = root / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    spec = {"task": name, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)},
                               "cache_dir": str(root / "hf_datasets_cache")},
            "test_split": "test", **spec}
    # lm_eval reads YAML; JSON is YAML.
    (root / f"{name}.yaml").write_text(json.dumps(spec, indent=1))
  return str(root)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> str:
  return _write_tasks(tmp_path_factory.mktemp("lm_eval_tasks"))


def _evaluate(model, task_dir, tasks=tuple(TASKS), **kwargs) -> dict:
  import lm_eval
  from lm_eval.tasks import TaskManager
  # include_defaults=False: indexing lm_eval's ~10K built-in task files costs ~8 s of CPU.
  return lm_eval.simple_evaluate(model=model, tasks=list(tasks), task_manager=TaskManager(
      include_path=task_dir, include_defaults=False), log_samples=True, **kwargs)


@pytest.fixture(scope="module")
def hf_results(hf_dir, task_dir) -> dict:
  return _evaluate("hf", task_dir, model_args=f"pretrained={hf_dir},dtype=float32,"
                   f"max_length={MAX_LENGTH}", batch_size=1, device="cpu")


def _responses(results: dict) -> dict:
  """task -> per document its responses: [(loglikelihood, greedy)] per choice (tiny_mc), [text]
  (tiny_gen), [loglikelihood] (tiny_ppl). Samples written by the CLI hold them as strings."""
  parse = {"tiny_mc": lambda r: (float(r[0]), str(r[1]) == "True"), "tiny_gen": str,
           "tiny_ppl": float}
  return {task: [[parse[task](r[0]) for r in s["resps"]]
                 for s in sorted(samples, key=lambda s: s["doc_id"])]
          for task, samples in results["samples"].items()}


def _assert_same(ours: dict, ref: dict) -> None:
  ours, ref = _responses(ours), _responses(ref)
  assert sorted(ours) == sorted(ref) == sorted(TASKS)
  for (doc_a, doc_b) in zip(ours["tiny_mc"], ref["tiny_mc"], strict=True):
    np.testing.assert_allclose([ll for ll, _ in doc_a], [ll for ll, _ in doc_b], atol=1e-4)
    assert [g for _, g in doc_a] == [g for _, g in doc_b]
    assert np.argmax([ll for ll, _ in doc_a]) == np.argmax([ll for ll, _ in doc_b])
  assert ours["tiny_gen"] == ref["tiny_gen"]
  np.testing.assert_allclose(np.ravel(ours["tiny_ppl"]), np.ravel(ref["tiny_ppl"]), atol=1e-4)


def test_matches_hf_backend_sharded(hf_dir, task_dir, hf_results):
  from ultralong_jax.evaluation.lm_eval_backend import UltraLongLM
  # 8 simulated devices, 4 used: batch over data, cache slots over sequence. prefill_chunk 16 <
  # the bucket (64): the first chunk runs ring attention, later ones the sharded cache.
  lm = UltraLongLM(ckpt=hf_dir, dtype="float32", max_length=MAX_LENGTH, batch_size=4,
                   mesh="data=2:sequence=2", prefill_chunk=16, min_bucket=64, kv_block=8)
  rows = []
  generate = lm.runner.generate
  lm.runner.generate = lambda *a, **k: rows.extend(out := generate(*a, **k)) or out
  ours = _evaluate(lm, task_dir)
  _assert_same(ours, hf_results)
  assert any(len(t) > 0 for doc in _responses(ours)["tiny_gen"] for t in doc)
  # Some rows stopped on device before max_gen_toks (10) at a token holding an `until` string, and
  # their texts still equal the reference's (which generated on and cut the text afterwards).
  assert any(len(r) < 10 and r[-1] not in lm._eos for r in rows)
  # Programs compile per bucket (cache shape) and chunk kind, not per request length: one bucket
  # here, so scoring compiles 2 (ring first chunk, cache chunks), generation 3 (+ one-token step).
  compiled = {key: fn._cache_size() for key, fn in lm.runner._compiled.items()}
  assert sum(compiled.values()) == 5, compiled


def test_chat_template_generation_matches_hf_backend(hf_dir, task_dir):
  from ultralong_jax.evaluation.lm_eval_backend import UltraLongLM
  kwargs = dict(tasks=["tiny_gen"], apply_chat_template=True)
  ref = _evaluate("hf", task_dir, model_args=f"pretrained={hf_dir},dtype=float32,"
                  f"max_length={MAX_LENGTH * 4}", batch_size=1, device="cpu", **kwargs)
  ours = _evaluate(UltraLongLM(ckpt=hf_dir, dtype="float32", max_length=MAX_LENGTH * 4,
                               batch_size=3, min_bucket=128), task_dir, **kwargs)
  prompts = [[s["arguments"][0][0]  # (context, gen_kwargs) of the one request
              for s in sorted(r["samples"]["tiny_gen"], key=lambda s: s["doc_id"])]
             for r in (ours, ref)]
  assert prompts[0] == prompts[1] and prompts[0][0].startswith("<|begin_of_text|><|start_header")
  assert _responses(ours)["tiny_gen"] == _responses(ref)["tiny_gen"]
  assert any(t for doc in _responses(ours)["tiny_gen"] for t in doc)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
  """A tiny random transformers Qwen2 with a ChatML tokenizer (no BOS) and Qwen2.5's official
  chat template."""
  import torch
  import transformers
  from tokenizers import Regex, decoders, pre_tokenizers
  from ..data import test_chat_template_families as fam
  from .test_prompt_style import QWEN_SPLIT
  out = tmp_path_factory.mktemp("hf_qwen")
  path = fam._train(str(out / "tokenizer.json"), pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), decoders.ByteLevel(),
      ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], vocab_size=500)
  hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=path, eos_token="<|im_end|>",
                                                pad_token="<|endoftext|>")
  hf_tok.chat_template = fam.QWEN25_TEMPLATE
  hf_tok.save_pretrained(out)
  config = transformers.Qwen2Config(
      vocab_size=500, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
      rope_theta=10000.0, eos_token_id=hf_tok.convert_tokens_to_ids("<|im_end|>"),
      tie_word_embeddings=False)
  torch.manual_seed(0)
  model = transformers.Qwen2ForCausalLM(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.mul_(4.0) if not name.endswith("norm.weight") else p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(out)
  return str(out)


def test_qwen_chat_template_generation_matches_hf_backend(qwen_dir, task_dir):
  """--apply_chat_template on a Qwen2 checkpoint: chat_template auto picks ChatML, and the
  prompts and generations equal lm_eval's hf backend (transformers' apply_chat_template)."""
  from ultralong_jax.evaluation.lm_eval_backend import UltraLongLM
  kwargs = dict(tasks=["tiny_gen"], apply_chat_template=True)
  ref = _evaluate("hf", task_dir, model_args=f"pretrained={qwen_dir},dtype=float32,"
                  f"max_length={MAX_LENGTH * 4}", batch_size=1, device="cpu", **kwargs)
  ours = _evaluate(UltraLongLM(ckpt=qwen_dir, dtype="float32", max_length=MAX_LENGTH * 4,
                               batch_size=3, min_bucket=128), task_dir, **kwargs)
  prompts = [[s["arguments"][0][0]
              for s in sorted(r["samples"]["tiny_gen"], key=lambda s: s["doc_id"])]
             for r in (ours, ref)]
  assert prompts[0] == prompts[1] and prompts[0][0].startswith("<|im_start|>system\n")
  assert _responses(ours)["tiny_gen"] == _responses(ref)["tiny_gen"]
  assert any(t for doc in _responses(ours)["tiny_gen"] for t in doc)
  with pytest.raises(ValueError, match="chat_template='vicuna'"):
    UltraLongLM(ckpt=qwen_dir, chat_template="vicuna")


def test_score_matches_transformers(hf_dir):
  """CachedModel.score: log p(target) and argmax flags equal a transformers forward (rows ending
  in the model's own greedy tokens, so the flags are not all False)."""
  import torch
  import transformers
  import ultralong_jax
  from ultralong_jax.evaluation import generate as gen
  hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
  rng = np.random.RandomState(0)
  rows = []
  for n in (5, 9, 20):
    prompt = torch.tensor([rng.randint(10, 500, n)])
    out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                      max_new_tokens=6, eos_token_id=None, pad_token_id=0)
    rows.append(out[0].tolist())
  logp, greedy = gen.CachedModel(ultralong_jax.from_pretrained(hf_dir), kv_block=8).score(
      rows, 32, chunk=16)
  for b, row in enumerate(rows):
    with torch.no_grad():
      ref = torch.log_softmax(hf(torch.tensor([row[:-1]])).logits[0].float(), -1)
    targets = torch.tensor(row[1:])
    np.testing.assert_allclose(logp[b, :len(row) - 1],
                               ref.gather(1, targets[:, None])[:, 0].numpy(), atol=1e-5)
    np.testing.assert_array_equal(greedy[b, :len(row) - 1], (ref.argmax(-1) == targets).numpy())
    assert greedy[b, len(row) - 7:len(row) - 1].all()  # the generated tokens are the greedy ones
    assert not logp[b, len(row) - 1:].any() and not greedy[b, len(row) - 1:].any()


def test_bucket():
  from ultralong_jax.evaluation.lm_eval_backend import bucket
  assert [bucket(n, 16) for n in (1, 16, 17, 32, 33, 1000)] == [16, 16, 32, 32, 64, 1024]


def test_cli_matches_hf_backend(hf_dir, task_dir, hf_results, tmp_path):
  from ultralong_jax.evaluation import lm_eval_backend
  out = tmp_path / "out"
  lm_eval_backend.main([
      "--model", "ultralong_jax", "--model_args",
      f"ckpt={hf_dir},tokenizer={hf_dir},dtype=float32,max_length={MAX_LENGTH},min_bucket=64",
      "--tasks", "tiny_mc", "--include_path", task_dir, "--batch_size", "4", "--log_samples",
      "--output_path", str(out)])
  paths = [os.path.join(d, n) for d, _, names in os.walk(out) for n in names
           if n.startswith("samples_tiny_mc")]
  assert len(paths) == 1
  with open(paths[0]) as f:
    samples = [json.loads(line) for line in f]
  ours = _responses({"samples": {"tiny_mc": samples}})["tiny_mc"]
  ref = _responses(hf_results)["tiny_mc"]
  np.testing.assert_allclose([[ll for ll, _ in d] for d in ours],
                             [[ll for ll, _ in d] for d in ref], atol=1e-4)
  assert [[g for _, g in d] for d in ours] == [[g for _, g in d] for d in ref]


def test_bad_model_args_name_the_key(hf_dir):
  from ultralong_jax.evaluation.lm_eval_backend import UltraLongLM
  with pytest.raises(ValueError, match="mesh"):
    UltraLongLM(ckpt=hf_dir, mesh="sequence=3:tensor=5")
  with pytest.raises(ValueError, match="batch_size"):
    UltraLongLM(ckpt=hf_dir, batch_size="auto")
  with pytest.raises(FileNotFoundError, match="tokenizer"):
    UltraLongLM(ckpt=hf_dir, tokenizer=hf_dir + "/missing")


def test_decode_skips_special_tokens_as_transformers(tokenizer, hf_dir):
  import transformers
  hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
  ids = tokenizer.encode("The special magic number is 12345.")
  row = [tokenizer.token_id("<|begin_of_text|>"), *ids, tokenizer.token_id("<|eot_id|>"), *ids]
  assert tokenizer.decode(row, skip_special_tokens=True) == hf_tok.decode(
      row, skip_special_tokens=True) == 2 * tokenizer.decode(ids)
  assert tokenizer.decode(row) == hf_tok.decode(row, skip_special_tokens=False)
