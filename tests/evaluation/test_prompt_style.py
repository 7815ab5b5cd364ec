"""Needle / RULER prompts in each family's chat template, against transformers'
`apply_chat_template(..., add_generation_prompt=True)` with the official templates (embedded in
tests/data/test_chat_template_families.py), on tiny tokenizers trained here."""

import json

import pytest
from tokenizers import Regex, decoders, pre_tokenizers

from ultralong_jax.data import tokenizer as tok_lib
from ultralong_jax.evaluation import haystack as hay, niah, prompt_style, ruler_tasks

from ..data import test_chat_template_families as fam

# The context's edges fall where Qwen's pre-tokenizer splits anyway (a letter, then "\n\n"), so
# separately tokenized parts equal the whole string's tokens.
HEAD, CONTEXT, TAIL = "read the document below.\n\n", "The cat sat on a mat", "\n\nWhere?"
# Qwen2 / Qwen3's tokenizer.json pre-tokenizer split.
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
              r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@pytest.fixture(scope="module")
def family_tokenizers(tmp_path_factory):
  d = tmp_path_factory.mktemp("eval_family_tokenizers")
  return {
      "chatml": fam._train(
          str(d / "qwen.json"), pre_tokenizers.Sequence([
              pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
              pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
          decoders.ByteLevel(), ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>",
                                 "</think>"], vocab_size=500),
      "mistral": fam._train(str(d / "mistral.json"), pre_tokenizers.Metaspace(),
                            decoders.Metaspace(), ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]),
      "llama2": fam._train(str(d / "llama2.json"), pre_tokenizers.Metaspace(),
                           decoders.Metaspace(), ["<unk>", "<s>", "</s>"]),
  }


def _reference(path, name, messages, **kwargs):
  ref = fam._reference(path, name)
  options = dict(add_generation_prompt=True, **kwargs)
  ids = ref.apply_chat_template(messages, tokenize=True, **options)
  ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
  return ids, ref.apply_chat_template(messages, tokenize=False, **options)


@pytest.mark.parametrize("name", ["chatml", "qwen3", "mistral", "llama2"])
def test_wrapped_prompt_is_the_official_generation_prompt(name, family_tokenizers):
  """prefix | context | suffix is the generation prompt of one user message head+context+tail:
  token-equal for the byte-level (Qwen) tokenizers, whose splits fall at the context's edges;
  for SentencePiece-style tokenizers (a word may span a newline there) the same text."""
  path = family_tokenizers["chatml" if name == "qwen3" else name]
  tokenizer = tok_lib.load_tokenizer(path)
  style = prompt_style.PromptStyle(name)
  prefix, suffix = style.wrap(tokenizer, HEAD, TAIL)
  ids = prefix + tokenizer.encode(CONTEXT) + suffix
  extra = {"enable_thinking": False} if name == "qwen3" else {}
  expected_ids, expected_text = _reference(
      path, name, [{"role": "user", "content": HEAD + CONTEXT + TAIL}], **extra)
  if name in ("chatml", "qwen3"):
    assert ids == expected_ids
    if name == "qwen3":  # the reply opens with an empty think block: the model answers at once
      assert tokenizer.decode(suffix).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
  else:
    assert "".join(tokenizer.decode(ids).split()) == "".join(expected_text.split())
    assert ids[0] == tokenizer.token_id("<s>") == expected_ids[0]
  # An answer prefix opens the reply.
  _, with_answer = style.wrap(tokenizer, HEAD, TAIL, "The answer is")
  assert with_answer == suffix + tokenizer.encode("The answer is")


def test_plain_prompts_and_stop_tokens_follow_the_family(family_tokenizers):
  qwen = tok_lib.load_tokenizer(family_tokenizers["chatml"])
  mistral = tok_lib.load_tokenizer(family_tokenizers["mistral"])
  prefix, _ = prompt_style.PromptStyle("chatml", chat=False).wrap(qwen, HEAD, TAIL)
  assert prefix == qwen.encode(HEAD)  # Qwen has no BOS
  prefix, suffix = prompt_style.PromptStyle("mistral", chat=False).wrap(mistral, HEAD, TAIL, "A:")
  assert prefix == [mistral.token_id("<s>")] + mistral.encode(HEAD)
  assert suffix == mistral.encode(TAIL + "A:")
  assert prompt_style.PromptStyle("qwen3").stop_ids(qwen) == [
      qwen.token_id("<|im_end|>"), qwen.token_id("<|endoftext|>")]
  assert prompt_style.PromptStyle("mistral").stop_ids(mistral) == [mistral.token_id("</s>")]


def test_llama31_style_is_the_llama3_prompt(tokenizer):
  """True / False and PromptStyle("llama31") build the same ids (the Llama 3.1 layout)."""
  for chat in (True, False):
    style = prompt_style.PromptStyle("llama31", chat=chat)
    assert hay.prompt_parts(tokenizer, "Q?", chat=chat) == hay.prompt_parts(tokenizer, "Q?",
                                                                            chat=style)
    assert (ruler_tasks.frame(tokenizer, "H {context} T", "A:", 500, chat=chat, what="x")
            == ruler_tasks.frame(tokenizer, "H {context} T", "A:", 500, chat=style, what="x"))
  assert prompt_style.PromptStyle("llama31").stop_ids(tokenizer)[0] == tokenizer.token_id(
      "<|eot_id|>")


def test_detect_template(tokenizer, family_tokenizers):
  qwen = tok_lib.load_tokenizer(family_tokenizers["chatml"])
  mistral = tok_lib.load_tokenizer(family_tokenizers["mistral"])
  assert prompt_style.detect_template("llama", tokenizer) == "llama31"
  assert prompt_style.detect_template("qwen3", qwen) == "qwen3"
  assert prompt_style.detect_template("qwen2", qwen) == "chatml"
  assert prompt_style.detect_template("mistral", mistral) == "mistral"
  assert prompt_style.detect_template("llama", mistral) == "llama2"
  with pytest.raises(ValueError, match="chat template 'vicuna'"):
    prompt_style.PromptStyle("vicuna")


def test_niah_cli_runs_a_qwen_style_model_and_refuses_a_wrong_pair(tiny_model_dir, tmp_path,
                                                                   family_tokenizers, flag_error):
  """A ChatML tokenizer: --chat-template chatml runs the grid in ChatML prompts (recorded in
  niah.json); auto-detection for this llama-type checkpoint picks llama2, whose tokens the
  tokenizer lacks: refused before any weights load, naming --tokenizer."""
  path = family_tokenizers["chatml"]
  base = ["--ckpt", tiny_model_dir, "--tokenizer", path, "--lengths", "200", "--depths", "50",
          "--max-new-tokens", "2"]
  results = niah.main(base + ["--out", str(tmp_path / "chatml"), "--chat-template", "chatml"])
  with open(results.paths["json"]) as f:
    settings = json.load(f)["settings"]
  assert settings["chat_template"] == "chatml" and settings["chat"] is True
  assert results.cells[0]["prompt_tokens"] == 200
  message = flag_error(niah.main, base + ["--out", str(tmp_path / "auto")])
  assert message.startswith(f"--tokenizer {path}: the 'llama2' prompts"), message
  assert "'<s>'" in message and "--chat-template" in message, message
