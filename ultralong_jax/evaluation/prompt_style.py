"""How an evaluation prompt is wrapped for a model family: its chat template (or a plain prompt
with the family's BOS) and the tokens that end its answer.

The needle and RULER prompts are assembled from token ids (a context of exactly N tokens goes
between a head and a tail), so a style gives the ids before and after the context:

  chat:   template's user turn opening | head | context | tail | user turn end + generation prompt
  plain:  BOS (where the family has one) | head | context | tail

`llama31` keeps Llama 3.1's layout run by run (`haystack.chat_turn`); the other templates render
`apply_chat_template(..., add_generation_prompt=True)`'s text around a placeholder user message
(`data.chat_template`, token-equal to transformers with the official templates) and tokenize the
part before the context with the head and the part after it with the tail. Qwen3 prompts close an
empty think block (`enable_thinking=False`) so the model answers at once, as string-match scoring
needs.
"""

from __future__ import annotations

import dataclasses

from ultralong_jax.data import chat_template

TEMPLATES = tuple(chat_template.CHAT_TEMPLATES)
# Special tokens a tokenizer must have for each template's chat prompts.
CHAT_TOKENS = {
    "llama31": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "qwen3": ("<|im_start|>", "<|im_end|>"),
    "mistral": ("<s>", "</s>"),
    "llama2": ("<s>", "</s>"),
}
_PLACEHOLDER = "\x00CONTEXT\x00"


def detect_template(model_type: str, tokenizer) -> str:
  """The chat template of a model: Llama 3's when the tokenizer has its header tokens, else by
  `model_type` (qwen3 -> qwen3, qwen2 -> chatml, mistral -> mistral, llama -> llama2)."""
  if _has(tokenizer, "<|start_header_id|>"):
    return "llama31"
  by_type = {"qwen3": "qwen3", "qwen2": "chatml", "mistral": "mistral", "llama": "llama2"}
  if model_type in by_type:
    return by_type[model_type]
  return "chatml" if _has(tokenizer, "<|im_start|>") else "llama31"


@dataclasses.dataclass(frozen=True)
class PromptStyle:
  """template: a `data.chat_template.CHAT_TEMPLATES` name; chat=False: plain prompts (BOS, when
  the family has one, + text) for base models."""
  template: str = "llama31"
  chat: bool = True

  def __post_init__(self):
    if self.template not in TEMPLATES:
      raise ValueError(f"chat template {self.template!r}: use one of {', '.join(TEMPLATES)}.")

  def missing_tokens(self, tokenizer) -> list[str]:
    """The special tokens these prompts need that `tokenizer` lacks."""
    needed = CHAT_TOKENS[self.template] if self.chat else self._bos_names()
    return [t for t in needed if not _has(tokenizer, t)]

  def wrap(self, tokenizer, head: str, tail: str, answer_prefix: str = "") -> tuple[list[int],
                                                                                   list[int]]:
    """(ids before the context, ids after it): the user message is head + context + tail; the
    answer prefix, if any, opens the model's reply (plain prompts: it ends the text)."""
    if not self.chat:
      bos = [tokenizer.token_id(t) for t in self._bos_names()]
      return bos + tokenizer.encode(head), tokenizer.encode(tail + answer_prefix)
    if self.template == "llama31":
      from ultralong_jax.evaluation import haystack  # pylint: disable=g-import-not-at-top
      before, after = haystack.chat_turn(tokenizer)
      prefix, suffix = before + tokenizer.encode("\n\n" + head), tokenizer.encode(tail) + after
    else:
      template = chat_template.make_chat_template(self.template, tokenizer)
      options = {"enable_thinking": False} if self.template == "qwen3" else {}
      text = template.generation_text([{"role": "user", "content": _PLACEHOLDER}], **options)
      before, after = text.split(_PLACEHOLDER)
      prefix, suffix = tokenizer.encode(before + head), tokenizer.encode(tail + after)
    return prefix, suffix + (tokenizer.encode(answer_prefix) if answer_prefix else [])

  def stop_ids(self, tokenizer) -> list[int]:
    """The ids that end an answer: the template's end-of-turn / end-of-text tokens the tokenizer
    has."""
    names = chat_template.CHAT_TEMPLATES[self.template].stop_tokens
    return [tokenizer.token_id(t) for t in names if _has(tokenizer, t)]

  def _bos_names(self) -> tuple[str, ...]:
    bos = chat_template.CHAT_TEMPLATES[self.template].bos_token
    return (bos,) if bos else ()


def resolve_style(template: str, model_type: str, tokenizer, *, chat: bool = True) -> PromptStyle:
  """The PromptStyle of `template` ("auto": `detect_template`) for a model of `model_type`;
  raises ValueError when the template is unknown or the tokenizer lacks its special tokens."""
  if template not in ("auto",) + TEMPLATES:
    raise ValueError(f"chat_template={template!r}: use auto or one of {', '.join(TEMPLATES)}.")
  name = detect_template(model_type, tokenizer) if template == "auto" else template
  style = PromptStyle(name, chat=chat)
  missing = style.missing_tokens(tokenizer)
  if missing:
    how = f"detected for model_type {model_type!r}" if template == "auto" else "chosen"
    raise ValueError(f"the {name!r} prompts ({how}) need the special tokens {missing}, which "
                     "the tokenizer lacks; give the model's own tokenizer or the right chat "
                     "template")
  return style


def as_style(chat: bool | PromptStyle) -> PromptStyle:
  """A PromptStyle from the `chat` argument of the prompt builders: True / False are Llama 3.1's
  chat / plain prompts."""
  return chat if isinstance(chat, PromptStyle) else PromptStyle("llama31", bool(chat))


def _has(tokenizer, token: str) -> bool:
  try:
    tokenizer.token_id(token)
  except KeyError:
    return False
  return True
