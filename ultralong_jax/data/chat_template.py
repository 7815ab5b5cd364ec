"""Chat templates rendered straight to token ids with an assistant-token mask, one per family:
`llama31` (Llama 3.x), `chatml` (Qwen2 / Qwen2.5), `qwen3` (ChatML with think blocks), `mistral`
(Mistral v0.3 `[INST]`), `llama2` (Llama 2 `[INST]` / `<<SYS>>`); `make_chat_template(name,
tokenizer)` picks one (`data.chat.template`). Each equals transformers' `apply_chat_template` with the model's official
template, token for token (tests/data/test_chat_template*.py embed the templates).

Llama 3.1 is rendered run by run:

Token for token what `tokenizer.apply_chat_template(messages)` gives with the official template
of meta-llama/Llama-3.1-8B-Instruct (tokenizer_config.json, `chat_template`; no tools):

  <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n
  Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n{system content|trim}<|eot_id|>
  <|start_header_id|>{role}<|end_header_id|>\\n\\n{content|trim}<|eot_id|>   (each other message)

The official template always emits that system block with its date preamble, also when the
chat has no system message (then the block holds only the preamble). `date_preamble=False`
instead emits a system block only for chats with a system message, without the preamble (the
Llama 3.0 behaviour). Hugging Face tokenizes the rendered string by first splitting it at special
tokens and then tokenizing each text run whole; we tokenize the same runs, so the ids agree.
The loss mask covers each assistant message's content and its `<|eot_id|>` (the model must learn
to stop), not its header or the "\\n\\n" that ends the header.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from ultralong_jax.data import tokenizer as tok_lib

ROLES = ("system", "user", "assistant")


class ChatFormatError(ValueError):
  """A chat the template cannot render; `kind` is a bad_input kind."""

  def __init__(self, kind: str, detail: str):
    super().__init__(detail)
    self.kind = kind


@dataclasses.dataclass
class Llama31ChatTemplate:
  """Renders `[{"role", "content"}, ...]` to (ids [n] int32, trainable [n] int32 0/1)."""
  tokenizer: tok_lib.Tokenizer
  date_preamble: bool = True
  date_string: str = "26 Jul 2024"
  bos_token = "<|begin_of_text|>"
  stop_tokens = ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>")

  def __post_init__(self):
    t = self.tokenizer
    self._bos, self._start, self._end, self._eot = (
        t.token_id(s) for s in ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                "<|eot_id|>"))
    self._header_gap = t.encode("\n\n")

  def render(self, messages: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and trainable mask of one chat; raises ChatFormatError (kind, detail)."""
    _check_messages(messages)
    # (role, text run after the header, trainable) in template order.
    turns: list[tuple[str, str, bool]] = []
    rest = list(messages)
    if rest[0]["role"] == "system":
      system = rest.pop(0)["content"].strip()
      has_system = True
    else:
      system, has_system = "", False
    if self.date_preamble:
      preamble = f"Cutting Knowledge Date: December 2023\nToday Date: {self.date_string}\n\n"
      turns.append(("system", "\n\n" + preamble + system, False))
    elif has_system:
      turns.append(("system", "\n\n" + system, False))
    for m in rest:
      turns.append((m["role"], "\n\n" + m["content"].strip(), m["role"] == "assistant"))
    encoded = tok_lib.encode_batch(self.tokenizer, [t for r, body, _ in turns for t in (r, body)])
    ids, trainable = [self._bos], [0]
    for k, (_, _, train) in enumerate(turns):
      role_ids, body_ids = encoded[2 * k], encoded[2 * k + 1]
      ids += [self._start, *role_ids, self._end, *body_ids, self._eot]
      gap = _gap_length(body_ids, self._header_gap) if train else len(body_ids)
      body_mask = [0] * gap + [int(train)] * (len(body_ids) - gap)
      trainable += [0] * (len(role_ids) + 2) + body_mask + [int(train)]
    return np.asarray(ids, np.int32), np.asarray(trainable, np.int32)


def _check_messages(messages) -> None:
  from ultralong_jax.data import bad_input as bi  # pylint: disable=import-outside-toplevel
  if not isinstance(messages, (list, tuple)):
    raise ChatFormatError(bi.INVALID_FIELD, "'messages' is not a list")
  if not messages:
    raise ChatFormatError(bi.EMPTY_DOCUMENT, "'messages' is empty")
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
      raise ChatFormatError(bi.MISSING_FIELD, f"message {i} lacks 'role' or 'content'")
    if m["role"] not in ROLES:
      raise ChatFormatError(bi.INVALID_FIELD, f"message {i} has role {m['role']!r}; "
                            f"supported: {ROLES} (tool calls are not)")
    if not isinstance(m["content"], str):
      raise ChatFormatError(bi.INVALID_FIELD, f"message {i} content is not a string")


def _split_system(messages) -> tuple[str | None, list[dict[str, Any]]]:
  if messages[0]["role"] == "system":
    return messages[0]["content"], list(messages[1:])
  return None, list(messages)


def _check_alternation(turns, template: str) -> None:
  """The [INST] templates' `raise_exception('Conversation roles must alternate ...')`."""
  from ultralong_jax.data import bad_input as bi  # pylint: disable=import-outside-toplevel
  for i, m in enumerate(turns):
    if (m["role"] == "user") != (i % 2 == 0) or m["role"] == "system":
      raise ChatFormatError(bi.INVALID_FIELD, f"the {template} template needs roles alternating "
                            f"user/assistant after an optional first system message; turn {i} "
                            f"is {m['role']!r}")


def _text(pieces: Sequence[tuple[str, bool]]) -> str:
  return "".join(piece for piece, _ in pieces)


def _encode_pieces(tokenizer, pieces: Sequence[tuple[str, bool]]) -> tuple[np.ndarray, np.ndarray]:
  """Tokenizes the concatenated text once, as `apply_chat_template` does (so merges across piece
  boundaries and a SentencePiece tokenizer's leading-space handling are exactly the reference's);
  a token is trainable when its characters overlap a trainable piece."""
  text, spans, start = "", [], 0
  for piece, trainable in pieces:
    if trainable and piece:
      spans.append((start, start + len(piece)))
    text += piece
    start += len(piece)
  ids, offsets = tokenizer.encode_with_offsets(text)
  trainable = [int(any(s < e_span and e > s_span for s_span, e_span in spans))
               if e > s else 0 for s, e in offsets]
  return np.asarray(ids, np.int32), np.asarray(trainable, np.int32)


QWEN25_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


@dataclasses.dataclass
class ChatMLTemplate:
  """Qwen2.5-Instruct's official template (no tools): a system block (the chat's first system
  message, else `default_system`), then `<|im_start|>{role}\n{content}<|im_end|>\n` per message,
  contents untrimmed. Trained: each assistant content and its `<|im_end|>` (where generation stops),
  not the header or the newline after it."""
  tokenizer: tok_lib.Tokenizer
  default_system: str | None = QWEN25_DEFAULT_SYSTEM

  bos_token = None  # prompts start with the first block, no BOS
  stop_tokens = ("<|im_end|>", "<|endoftext|>")

  def render(self, messages: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    return _encode_pieces(self.tokenizer, self._pieces(messages))

  def generation_text(self, messages: Sequence[dict[str, Any]]) -> str:
    """The prompt text of `apply_chat_template(messages, add_generation_prompt=True)`."""
    return _text(self._pieces(messages)) + "<|im_start|>assistant\n"

  def _pieces(self, messages):
    _check_messages(messages)
    system, rest = _split_system(messages)
    if system is None:
      system = self.default_system
    pieces = [] if system is None else [(f"<|im_start|>system\n{system}<|im_end|>\n", False)]
    for m in rest:
      pieces.append((f"<|im_start|>{m['role']}\n", False))
      assistant = m["role"] == "assistant"
      pieces += [(m["content"] + "<|im_end|>", assistant), ("\n", False)]
    return pieces


@dataclasses.dataclass
class Qwen3Template:
  """Qwen3's official template (no tools): ChatML without a default system prompt, where the
  assistant turns after the last user message carry a `<think>...</think>` block (empty when the
  reply has none; always on the final turn) and earlier turns drop their reasoning. A reply may
  hold its reasoning as `<think>...</think>` in its content. Trained: everything after each
  `<|im_start|>assistant\n` up to and including `<|im_end|>` (think block included)."""
  tokenizer: tok_lib.Tokenizer
  bos_token = None
  stop_tokens = ("<|im_end|>", "<|endoftext|>")

  def render(self, messages: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    return _encode_pieces(self.tokenizer, self._pieces(messages))

  def generation_text(self, messages: Sequence[dict[str, Any]], *,
                      enable_thinking: bool = True) -> str:
    """The prompt text of `apply_chat_template(messages, add_generation_prompt=True,
    enable_thinking=...)`: enable_thinking=False opens the reply with an empty think block (the
    model answers directly)."""
    empty_think = "" if enable_thinking else "<think>\n\n</think>\n\n"
    return _text(self._pieces(messages)) + "<|im_start|>assistant\n" + empty_think

  def _pieces(self, messages):
    _check_messages(messages)
    last_query = len(messages) - 1
    for i in range(len(messages) - 1, -1, -1):
      c = messages[i]["content"]
      if messages[i]["role"] == "user" and not (c.startswith("<tool_response>")
                                                and c.endswith("</tool_response>")):
        last_query = i
        break
    pieces = []
    for i, m in enumerate(messages):
      content = m["content"]
      if m["role"] != "assistant":
        pieces.append((f"<|im_start|>{m['role']}\n{content}<|im_end|>\n", False))
        continue
      reasoning = ""
      if "</think>" in content:
        reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
        content = content.split("</think>")[-1].lstrip("\n")
      if i > last_query and (i == len(messages) - 1 or reasoning):
        reasoning, content = reasoning.strip("\n"), content.lstrip("\n")
        body = f"<think>\n{reasoning}\n</think>\n\n{content}"
      else:
        body = content
      pieces += [("<|im_start|>assistant\n", False), (body + "<|im_end|>", True), ("\n", False)]
    return pieces


@dataclasses.dataclass
class MistralTemplate:
  """Mistral-7B-Instruct-v0.3's official template (no tools): `<s>`, then `[INST] {user}[/INST]`
  and ` {assistant|trim}</s>` alternating. The system message goes into the LAST user turn
  only, and only when that turn ends the chat, as the official template does: a training chat
  ending with an assistant reply carries no system text. Trained: assistant content and `</s>`."""
  tokenizer: tok_lib.Tokenizer
  bos_token: str = "<s>"
  eos_token: str = "</s>"

  stop_tokens = ("</s>",)

  def render(self, messages: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    return _encode_pieces(self.tokenizer, self._pieces(messages))

  def generation_text(self, messages: Sequence[dict[str, Any]]) -> str:
    """The prompt text of `apply_chat_template(messages, add_generation_prompt=True)` (the
    template has no generation header: a chat ending with a user turn ends with `[/INST]`)."""
    return _text(self._pieces(messages))

  def _pieces(self, messages):
    _check_messages(messages)
    system, turns = _split_system(messages)
    _check_alternation(turns, "mistral")
    pieces = [(self.bos_token, False)]
    for i, m in enumerate(turns):
      if m["role"] == "user":
        if i == len(turns) - 1 and system is not None:
          pieces.append((f"[INST] {system}\n\n{m['content']}[/INST]", False))
        else:
          pieces.append((f"[INST] {m['content']}[/INST]", False))
      else:
        pieces += [(" ", False), (m["content"].strip() + self.eos_token, True)]
    return pieces


@dataclasses.dataclass
class Llama2Template:
  """Llama-2-chat's official template: per exchange `<s>[INST] {user|trim} [/INST]
  {assistant|trim} </s>`, the system message wrapped in `<<SYS>>\n...\n<</SYS>>\n\n` at the
  start of the first user turn. Trained: assistant content, the space and `</s>`."""
  tokenizer: tok_lib.Tokenizer
  bos_token: str = "<s>"
  eos_token: str = "</s>"

  stop_tokens = ("</s>",)

  def render(self, messages: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    return _encode_pieces(self.tokenizer, self._pieces(messages))

  def generation_text(self, messages: Sequence[dict[str, Any]]) -> str:
    """The prompt text of `apply_chat_template(messages, add_generation_prompt=True)` (ends with
    `[/INST]` after a user turn, as the official template)."""
    return _text(self._pieces(messages))

  def _pieces(self, messages):
    _check_messages(messages)
    system, turns = _split_system(messages)
    _check_alternation(turns, "llama2")
    pieces = []
    for i, m in enumerate(turns):
      content = m["content"]
      if i == 0 and system is not None:
        content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
      if m["role"] == "user":
        pieces.append((f"{self.bos_token}[INST] {content.strip()} [/INST]", False))
      else:
        pieces += [(" ", False), (f"{content.strip()} {self.eos_token}", True)]
    return pieces


CHAT_TEMPLATES = {"llama31": Llama31ChatTemplate, "chatml": ChatMLTemplate,
                  "qwen3": Qwen3Template, "mistral": MistralTemplate, "llama2": Llama2Template}


def make_chat_template(name: str, tokenizer: tok_lib.Tokenizer, *, date_preamble: bool = True,
                       date_string: str = "26 Jul 2024"):
  """The template `name` (a CHAT_TEMPLATES key) over `tokenizer`; the date options are Llama
  3.1's. Every template has `render(messages) -> (ids [n] int32, trainable [n] int32 0/1)`."""
  if name not in CHAT_TEMPLATES:
    raise ValueError(f"data.chat.template={name!r}; use one of {sorted(CHAT_TEMPLATES)}.")
  if name == "llama31":
    return Llama31ChatTemplate(tokenizer, date_preamble=date_preamble, date_string=date_string)
  if not hasattr(tokenizer, "encode_with_offsets"):
    raise ValueError(f"data.tokenizer: the {name} chat template needs a Hugging Face "
                     "tokenizer.json (character offsets for the assistant mask), not a "
                     "SentencePiece .model.")
  return CHAT_TEMPLATES[name](tokenizer)


def _gap_length(body_ids: list[int], gap_ids: list[int]) -> int:
  """Tokens of the header's "\\n\\n" at the start of a body run.

  With Llama 3's pre-tokenizer "\\n\\n" never merges with trimmed content, so the run starts
  with exactly those tokens; should a tokenizer merge them, the merged token is trained on.
  """
  n = 0
  while n < min(len(gap_ids), len(body_ids)) and body_ids[n] == gap_ids[n]:
    n += 1
  return n if n == len(gap_ids) else 0
