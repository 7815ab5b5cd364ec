"""The Llama 3.1 chat template, rendered straight to token ids with an assistant-token mask.

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

  def __post_init__(self):
    t = self.tokenizer
    self._bos, self._start, self._end, self._eot = (
        t.token_id(s) for s in ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                "<|eot_id|>"))
    self._header_gap = t.encode("\n\n")

  def render(self, messages: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and trainable mask of one chat; raises ChatFormatError (kind, detail)."""
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


def _gap_length(body_ids: list[int], gap_ids: list[int]) -> int:
  """Tokens of the header's "\\n\\n" at the start of a body run.

  With Llama 3's pre-tokenizer "\\n\\n" never merges with trimmed content, so the run starts
  with exactly those tokens; should a tokenizer merge them, the merged token is trained on.
  """
  n = 0
  while n < min(len(gap_ids), len(body_ids)) and body_ids[n] == gap_ids[n]:
    n += 1
  return n if n == len(gap_ids) else 0
