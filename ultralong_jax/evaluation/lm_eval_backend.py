"""lm-evaluation-harness backend: EleutherAI's `lm_eval` tasks (MMLU, GSM8K, RULER, ...) on our
model, mesh and KV cache.

  python -m ultralong_jax.evaluation.lm_eval_backend --model ultralong_jax \\
      --model_args ckpt=DIR,tokenizer=TOK,mesh=sequence=4 --tasks gsm8k --batch_size 8 \\
      [any other lm_eval flag: --num_fewshot, --include_path, --output_path, --log_samples, ...]

lm_eval 0.4.x looks models up in its own table only (it has no plugin entry point), so a plain
`lm_eval --model ultralong_jax` cannot find this backend; this module's command registers the
`ultralong_jax` model, then runs lm_eval's own command line with the same arguments. From Python:

  import lm_eval
  from ultralong_jax.evaluation.lm_eval_backend import UltraLongLM
  lm = UltraLongLM(ckpt=DIR, tokenizer=TOK, mesh="sequence=4")
  lm_eval.simple_evaluate(model=lm, tasks=[...])

(after the import, `simple_evaluate(model="ultralong_jax", model_args="ckpt=...")` works too).

model_args: ckpt (Hugging Face directory or project checkpoint), tokenizer (default: ckpt),
mesh ('sequence=4'; several axes joined by ':' since ',' separates model_args, e.g.
'data=2:sequence=4'), dtype (bfloat16 | float32), max_length (default: the model's
max_position_embeddings), max_gen_toks (256), prefill_chunk (8192), kv_block (512),
add_bos_token (default: whether the tokenizer has <|begin_of_text|> or <s>), min_bucket (16),
seed (0); dtype applies when loading ckpt. lm_eval's --batch_size is the number of requests
per forward (an integer).

The requests are answered as lm_eval's `hf` backend answers them (tokens, truncation, stop
handling), which the parity test checks request by request:
- loglikelihood: context + continuation tokens are teacher-forced through the cache
  (`CachedModel.score`); the answer is the continuation's summed log-probability and whether
  every continuation token is the greedy one.
- loglikelihood_rolling: the text's tokens in disjoint windows of max_length (lm_eval's
  `get_rolling_token_windows`), each scored as a loglikelihood request, summed per text.
- generate_until: greedy or sampled (do_sample, temperature, top_p) decoding of at most
  max_gen_toks tokens, cut at the first `until` string. Rows stop on device at the model's end
  tokens and at every token whose text contains an `until` string (the text after such a token is
  cut anyway); a stop string spread over several tokens is cut after decoding.
- --apply_chat_template: Llama 3.1's chat prompt (`generate.chat_prompt`) as text, for generation
  tasks; prompts that continue a final assistant message (loglikelihood tasks) are refused.

Batching: requests are sorted by length, longest first (lm_eval's Collator), taken `batch_size` at
a time (a short last batch is filled with copies of its last request, whose results are dropped),
and their lengths rounded up to buckets (min_bucket x a power of two), so a run compiles one
program per bucket, not one per length. Prompts longer than prefill_chunk run chunk by chunk; every
chunk is split over the mesh's `sequence` axis (the first one through ring attention).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Sequence

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models import utils as model_utils
import numpy as np

from ultralong_jax.data import chat_template
from ultralong_jax.data.tokenizer import load_tokenizer
from ultralong_jax.evaluation import generate as gen_lib, loading, prompt_style

NAME = "ultralong_jax"
_BOS_TOKENS = ("<|begin_of_text|>", "<s>")


def bucket(length: int, min_bucket: int) -> int:
  """The smallest min_bucket x 2^k >= length: lengths that share a bucket share compiled shapes."""
  size = min_bucket
  while size < length:
    size *= 2
  return size


def _model_arg_error(e: Exception) -> Exception:
  """A flag-check error restated for model_args (the checks name the CLI flags of loading.py)."""
  return type(e)(f"{NAME} model_args: {e}".replace("--prefill-chunk", "prefill_chunk")
                 .replace("--kv-block", "kv_block").replace("--", ""))


def _eos_ids(ckpt: str | None, tokenizer) -> list[int]:
  """The end tokens generation stops at: the checkpoint's generation_config.json eos_token_id (as
  transformers' generate uses it), else Llama 3.1's end tokens that the tokenizer has."""
  path = os.path.join(ckpt, "generation_config.json") if ckpt else ""
  if path and os.path.isfile(path):
    with open(path) as f:
      eos = json.load(f).get("eos_token_id")
    if eos is not None:
      return [int(i) for i in (eos if isinstance(eos, list) else [eos])]
  return gen_lib.stop_ids(tokenizer)


@register_model(NAME)
class UltraLongLM(TemplateLM):
  """An lm_eval model over `CachedModel`: pass `ckpt` (a path) or an already loaded `model`."""

  def __init__(self, ckpt: str | None = None, tokenizer: Any = None, *, model=None,
               mesh: Any = "", dtype: str = "bfloat16", batch_size: int | str = 1,
               max_length: int | None = None, max_gen_toks: int = 256,
               prefill_chunk: int = 8192, kv_block: int = 512,
               add_bos_token: bool | None = None, min_bucket: int = 16, seed: int = 0,
               chat_template: str = "auto", device: str | None = None,
               max_batch_size: int | None = None):
    super().__init__()
    # Every argument is checked before the weights load; errors name the model_args key.
    if device is not None:  # lm_eval's command line always passes one (default cuda:0)
      logging.info("%s: device=%r is not used: JAX places the model on model_args mesh=...",
                   NAME, device)
    if str(batch_size).startswith("auto") or max_batch_size is not None:
      raise ValueError(f"{NAME}: batch_size must be an integer (got {batch_size!r}"
                       f"{', max_batch_size' if max_batch_size is not None else ''}): "
                       "automatic batch sizes are not supported.")
    self.batch_size = int(batch_size)
    for key, value in (("batch_size", self.batch_size), ("max_gen_toks", max_gen_toks),
                       ("min_bucket", min_bucket), ("max_length", max_length or 1)):
      if int(value) < 1:
        raise ValueError(f"{NAME} model_args: {key} must be >= 1, got {value}.")
    if dtype not in ("float32", "bfloat16"):
      raise ValueError(f"{NAME} model_args: dtype must be float32 or bfloat16, got {dtype!r}.")
    if model is None and ckpt is None:
      raise ValueError(f"{NAME} model_args: give ckpt=DIR (a Hugging Face directory or project "
                       "checkpoint), or pass model= from Python.")
    mesh_text = mesh.replace(":", ",") if isinstance(mesh, str) else ""
    args = argparse.Namespace(ckpt=ckpt, tokenizer=ckpt if tokenizer is None else tokenizer,
                              mesh=mesh_text, dtype=dtype, prefill_chunk=int(prefill_chunk),
                              kv_block=int(kv_block))
    try:
      if model is None:
        flags = loading.check_model_flags(args)
        tokenizer = flags.tokenizer
      else:
        loading.positive(args, "prefill_chunk", "kv_block")
        if tokenizer is None or isinstance(tokenizer, str):
          if args.tokenizer is None:
            raise ValueError("tokenizer: give a tokenizer (a path or a loaded tokenizer).")
          tokenizer = load_tokenizer(args.tokenizer)
      if isinstance(mesh, str):
        mesh = loading.parse_mesh(mesh_text)
      model_type = flags.config.model_type if model is None else model.config.model_type
      self._chat_style = prompt_style.resolve_style(chat_template, model_type, tokenizer)
    except (ValueError, FileNotFoundError) as e:
      raise _model_arg_error(e) from None
    self._bos = self._bos_text = None
    for token in _BOS_TOKENS:
      try:
        self._bos, self._bos_text = tokenizer.token_id(token), token
        break
      except KeyError:
        pass
    if add_bos_token and self._bos is None:
      raise ValueError(f"{NAME} model_args: add_bos_token=True but the tokenizer has none of "
                       f"{_BOS_TOKENS}.")
    self.add_bos_token = self._bos is not None if add_bos_token is None else bool(add_bos_token)
    self._eos = _eos_ids(ckpt, tokenizer)
    if not self._eos:
      raise ValueError(f"{NAME}: no end token found (no eos_token_id in {ckpt}/"
                       "generation_config.json, and the tokenizer has no Llama 3.1 end tokens).")
    if model is None:
      model = loading.load_model(args)
    self.tokenizer = tokenizer
    self.config = model.config
    self.runner = gen_lib.CachedModel(model, mesh, kv_block=int(kv_block))
    self.max_length = int(max_length or self.config.max_position_embeddings)
    self.max_gen_toks = int(max_gen_toks)
    self.prefill_chunk = int(prefill_chunk)
    self.min_bucket = int(min_bucket)
    self.seed = int(seed)
    self._token_texts: list[str] | None = None
    self._stops: dict[tuple[str, ...], list[int]] = {}
    import jax  # pylint: disable=g-import-not-at-top
    # Every JAX process runs every request (one SPMD program); only process 0 reports results.
    self._rank = jax.process_index()

  # Tokens, as lm_eval's HFLM makes them.
  @property
  def eot_token_id(self) -> int:
    return self._eos[0]

  @property
  def prefix_token_id(self) -> int:
    """The context of a loglikelihood request with an empty context: BOS, else the end token."""
    return self._bos if self._bos is not None else self.eot_token_id

  def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                 left_truncate_len: int | None = None, **kwargs) -> list[int]:
    """Token ids of `string`, BOS first when `add_special_tokens` (default: add_bos_token) asks
    for it and the text does not start with BOS already."""
    ids = self.tokenizer.encode(string)
    add = self.add_bos_token if add_special_tokens is None else add_special_tokens
    if add_special_tokens is None and self._bos_text and string.startswith(self._bos_text):
      add = False
    if add and self._bos is not None:
      ids = [self._bos] + ids
    return ids[-left_truncate_len:] if left_truncate_len else ids

  def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

  def _fill_batch(self, rows: list) -> list:
    """rows followed by copies of the last one up to batch_size (fixed shapes)."""
    return rows + rows[-1:] * (self.batch_size - len(rows))

  # Log-likelihoods.
  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs
                            ) -> list[tuple[float, bool]]:
    """requests: ((context, continuation) | None, context ids, continuation ids) -> per request
    (log p(continuation | context), whether the continuation is the greedy one)."""
    collator = model_utils.Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]),
                                                                 tuple(r[1] + r[2])))
    results = []
    for chunk in collator.get_batched(n=self.batch_size):
      rows, cont_lens = [], []
      for _, context, continuation in chunk:
        if not context or not continuation:
          raise ValueError(f"{NAME}: a loglikelihood request has an empty context or continuation.")
        if len(continuation) > self.max_length:
          raise ValueError(f"{NAME}: a continuation of {len(continuation)} tokens is longer than "
                           f"max_length {self.max_length}.")
        # As HFLM: keep the last max_length + 1 tokens (the inputs are all but the last).
        rows.append((context + continuation)[-(self.max_length + 1):])
        cont_lens.append(len(continuation))
      length = bucket(max(len(r) - 1 for r in rows), self.min_bucket)
      logp, greedy = self.runner.score(self._fill_batch(rows), length, chunk=self.prefill_chunk)
      for b, (key, _, _) in enumerate(chunk):
        end = len(rows[b]) - 1
        scored = slice(end - cont_lens[b], end)
        answer = (float(logp[b, scored].sum()), bool(greedy[b, scored].all()))
        results.append(answer)
        if key is not None:
          self.cache_hook.add_partial("loglikelihood", key, answer)
    return collator.get_original(results)

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Each text's log-likelihood over disjoint windows of max_length tokens, each window
    conditioned on the tokens before it (lm_eval's rolling windows, as HFLM)."""
    windows, owners = [], []
    for i, (text,) in enumerate(req.args for req in requests):
      for context, continuation in map(lm_utils.make_disjoint_window,
                                       lm_utils.get_rolling_token_windows(
                                           token_list=self.tok_encode(text),
                                           prefix_token=self.prefix_token_id,
                                           max_seq_len=self.max_length, context_len=1)):
        windows.append((None, context, continuation))
        owners.append(i)
    totals = [0.0] * len(requests)
    for i, (logp, _) in zip(owners, self._loglikelihood_tokens(windows)):
      totals[i] += logp
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals

  # Generation.
  def _stop_tokens(self, until: Sequence[str]) -> list[int]:
    """End tokens plus every token whose text (special tokens excluded, as the generated text is
    decoded without them) contains an `until` string: a row that emits one is cut there anyway."""
    key = tuple(until)
    if key not in self._stops:
      if self._token_texts is None:
        self._token_texts = [self.tok_decode([i]) for i in range(self.tokenizer.vocab_size)]
      hits = {i for i, text in enumerate(self._token_texts) if any(s and s in text for s in until)}
      self._stops[key] = sorted(set(self._eos) | hits)
    return self._stops[key]

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Per request (context, gen_kwargs): the generated text before the first `until` string."""
    encoded: dict[str, list[int]] = {}

    def ids(context: str) -> list[int]:
      if context not in encoded:
        encoded[context] = self.tok_encode(context)
      return encoded[context]

    collator = model_utils.Collator([req.args for req in requests],
                                    sort_fn=lambda r: (-len(ids(r[0])), r[0]),
                                    group_by="gen_kwargs", group_fn=lambda r: r[1])
    eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
    results = []
    for batch_index, chunk in enumerate(collator.get_batched(n=self.batch_size)):
      contexts, all_kwargs = zip(*chunk)
      kwargs = dict(model_utils.normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks))
      until = model_utils.handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
      max_gen_toks = int(kwargs.pop("max_gen_toks"))
      do_sample = bool(kwargs.pop("do_sample", False))
      temperature = float(kwargs.pop("temperature", 0.0))
      temperature = temperature if do_sample else 0.0  # lm_eval: do_sample=False is greedy
      top_p = float(kwargs.pop("top_p", 1.0))
      if kwargs:
        raise ValueError(f"{NAME}: generation kwargs {sorted(kwargs)} are not supported (known: "
                         "until, max_gen_toks, do_sample, temperature, top_p).")
      max_context = self.max_length - max_gen_toks
      if max_context < 1:
        raise ValueError(f"{NAME}: max_gen_toks {max_gen_toks} leaves no room for a context in "
                         f"max_length {self.max_length}.")
      prompts = [ids(c)[-max_context:] for c in contexts]  # left truncation, as HFLM
      tokens = self.runner.generate(
          self._fill_batch(prompts), max_new_tokens=max_gen_toks, temperature=temperature,
          top_p=top_p, stop_tokens=self._stop_tokens(until), seed=self.seed + batch_index,
          prefill_chunk=self.prefill_chunk,
          prompt_slots=bucket(max(len(p) for p in prompts), self.min_bucket))
      for context, gen_kwargs, row in zip(contexts, all_kwargs, tokens):
        text = model_utils.postprocess_generated_text(self.tok_decode(row), until, None)
        results.append(text)
        self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
    return collator.get_original(results)

  # Chat prompts (lm_eval --apply_chat_template).
  @property
  def tokenizer_name(self) -> str:
    """Names the tokenizer in lm_eval's request-cache keys."""
    return str(getattr(self.tokenizer, "path", type(self.tokenizer).__name__)).replace("/", "__")

  def apply_chat_template(self, chat_history: list[dict[str, str]],
                          add_generation_prompt: bool = True) -> str:
    """The messages in the model's chat format (model_args chat_template, default auto: as the
    needle / RULER commands pick it) as text, with the generation prompt; lm_eval tokenizes it
    with `tok_encode`. Llama 3.1: `generate.chat_prompt` (BOS, the date preamble, each turn, the
    assistant header); the others: `data.chat_template`'s rendering of the official template."""
    if not add_generation_prompt:
      raise NotImplementedError(
          f"{NAME}: chat prompts that continue a final assistant message (lm_eval asks for them "
          "for multiple-choice / loglikelihood tasks with --apply_chat_template) are not "
          "supported; run those tasks without --apply_chat_template.")
    if self._chat_style.template != "llama31":
      return chat_template.make_chat_template(self._chat_style.template, self.tokenizer
                                              ).generation_text(chat_history)
    return self.tok_decode(gen_lib.chat_prompt(self.tokenizer, chat_history),
                           skip_special_tokens=False)

  def get_model_info(self) -> dict:
    return {"model_num_layers": self.config.num_layers, "model_width": self.config.hidden_size,
            "max_length": self.max_length}


def main(argv: Sequence[str] | None = None) -> None:
  """lm_eval's command line, with the `ultralong_jax` model registered (by this module's import)."""
  from lm_eval.__main__ import cli_evaluate  # pylint: disable=g-import-not-at-top
  saved = sys.argv
  sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
  try:
    cli_evaluate()
  finally:
    sys.argv = saved


if __name__ == "__main__":
  main()
