"""The Llama 3.1 chat template against transformers' apply_chat_template and hand-built ids."""

import os

import numpy as np
import pytest

from ultralong_jax.data import bad_input as bi
from ultralong_jax.data import chat_template
from ultralong_jax.data import tokenizer as tok_lib

# The official template of meta-llama/Llama-3.1-8B-Instruct (tokenizer_config.json).
TEMPLATE = os.path.join(os.path.dirname(__file__), "fixtures", "llama31_chat_template.jinja")

CHATS = {
    "no_system": [{"role": "user", "content": "What is 12 + 345?"},
                  {"role": "assistant", "content": "It is 357."}],
    "system_multi_turn": [
        {"role": "system", "content": "  You read whole books.\n"},
        {"role": "user", "content": "the cat sat"},
        {"role": "assistant", "content": "on a mat!\n\n"},
        {"role": "user", "content": " ünïcödé 漢字 🙂 questions?"},
        {"role": "assistant", "content": "answers: 6789; rivers"}],
    "newlines_and_tabs": [{"role": "user", "content": "tab\tnew\nline\n\n"},
                          {"role": "assistant", "content": "\n numbers 12\n345"}],
}


@pytest.fixture(scope="module")
def hf_reference(hf_tokenizer_path):
  from transformers import PreTrainedTokenizerFast
  ref = PreTrainedTokenizerFast(tokenizer_file=hf_tokenizer_path, bos_token="<|begin_of_text|>")
  with open(TEMPLATE) as f:
    ref.chat_template = f.read()
  return ref


@pytest.mark.parametrize("name", sorted(CHATS))
def test_matches_transformers_apply_chat_template(name, hf_tokenizer_path, hf_reference):
  messages = CHATS[name]
  expected = hf_reference.apply_chat_template(messages, tokenize=True)
  expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
  template = chat_template.Llama31ChatTemplate(tok_lib.load_tokenizer(hf_tokenizer_path))
  ids, trainable = template.render(messages)
  assert ids.tolist() == expected
  # The loss covers exactly each assistant message's trimmed content and its <|eot_id|>.
  tok = template.tokenizer
  trained = tok.decode(ids[trainable == 1])
  assert trained == "".join(m["content"].strip() + "<|eot_id|>" for m in messages
                            if m["role"] == "assistant")


def test_date_string_matches_transformers(hf_tokenizer_path, hf_reference):
  messages = CHATS["no_system"]
  expected = hf_reference.apply_chat_template(messages, tokenize=True, date_string="01 Jan 2026")
  expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
  template = chat_template.Llama31ChatTemplate(tok_lib.load_tokenizer(hf_tokenizer_path),
                                               date_string="01 Jan 2026")
  assert template.render(messages)[0].tolist() == expected


@pytest.mark.parametrize("backend", ["hf", "sp"])
def test_hand_built_ids_without_preamble(backend, hf_tokenizer_path, sp_model_path):
  tok = tok_lib.load_tokenizer(hf_tokenizer_path if backend == "hf" else sp_model_path)
  sid = {s: tok.token_id(s) for s in tok_lib.LLAMA3_SPECIAL_TOKENS}
  bos, start, end, eot = (sid["<|begin_of_text|>"], sid["<|start_header_id|>"],
                          sid["<|end_header_id|>"], sid["<|eot_id|>"])
  template = chat_template.Llama31ChatTemplate(tok, date_preamble=False)

  def turn(role, content):
    return [start, *tok.encode(role), end, *tok.encode("\n\n" + content), eot]

  # Without a system message and without the preamble there is no system block at all.
  ids, trainable = template.render([{"role": "user", "content": "hi"},
                                    {"role": "assistant", "content": " the cat "}])
  assert ids.tolist() == [bos] + turn("user", "hi") + turn("assistant", "the cat")
  gap = len(tok.encode("\n\n"))
  body = tok.encode("\n\nthe cat")
  expected_mask = ([0] * (1 + len(turn("user", "hi")))            # BOS + the user turn
                   + [0] * (2 + len(tok.encode("assistant")) + gap)  # header and its "\n\n"
                   + [1] * (len(body) - gap) + [1])                  # content and <|eot_id|>
  if body[:gap] == tok.encode("\n\n"):  # always for the HF BPE; SentencePiece may merge
    assert trainable.tolist() == expected_mask
  # With a system message it gets a block without the preamble.
  ids, _ = template.render([{"role": "system", "content": "sys"},
                            {"role": "user", "content": "hi"}])
  assert ids.tolist() == [bos] + turn("system", "sys") + turn("user", "hi")


def test_official_preamble_on_every_chat(hf_tokenizer_path):
  tok = tok_lib.load_tokenizer(hf_tokenizer_path)
  template = chat_template.Llama31ChatTemplate(tok)
  ids, _ = template.render(CHATS["no_system"])
  assert tok.decode(ids).startswith(
      "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
      "December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user")


@pytest.mark.parametrize("messages,kind", [
    ([], bi.EMPTY_DOCUMENT),
    ("not a list", bi.INVALID_FIELD),
    ([{"role": "user"}], bi.MISSING_FIELD),
    ([{"role": "tool", "content": "x"}], bi.INVALID_FIELD),
    ([{"role": "user", "content": 3}], bi.INVALID_FIELD),
])
def test_bad_chats_raise_with_kind(messages, kind, hf_tokenizer_path):
  template = chat_template.Llama31ChatTemplate(tok_lib.load_tokenizer(hf_tokenizer_path))
  with pytest.raises(chat_template.ChatFormatError) as e:
    template.render(messages)
  assert e.value.kind == kind


def test_trainable_mask_is_0_1(hf_tokenizer_path):
  template = chat_template.Llama31ChatTemplate(tok_lib.load_tokenizer(hf_tokenizer_path))
  ids, trainable = template.render(CHATS["system_multi_turn"])
  assert ids.dtype == np.int32 and trainable.shape == ids.shape
  assert set(np.unique(trainable)) == {0, 1}
