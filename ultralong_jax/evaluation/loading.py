"""Shared command-line plumbing of the eval CLIs: model, tokenizer and mesh flags, checked before
any weights load.

A CLI parses its flags, then runs every check inside `flag_errors(parser)`: `check_model_flags`
reads the mesh, the checkpoint's config.json and the tokenizer (cheap) and checks them against each
other, so a wrong flag ends the run with `error: ...` naming it before minutes of weight loading
(and not at the first generated cell); `load_model` then loads the weights.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
  from jax.sharding import Mesh
  from ultralong_jax.modeling.config import LlamaConfig


def add_model_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--ckpt", required=True,
                      help="Hugging Face model directory or project checkpoint (from_pretrained).")
  parser.add_argument("--tokenizer", required=True,
                      help="tokenizer.json, a directory holding it, or a SentencePiece .model.")
  parser.add_argument("--out", required=True, help="output directory (created).")
  parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"),
                      help="parameter and compute dtype (default bfloat16).")
  parser.add_argument("--mesh", default="",
                      help="mesh axis sizes over data, fsdp, sequence, tensor, e.g. 'sequence=-1' "
                           "or 'data=2,sequence=4' (default: one device; sizes multiplying to "
                           "fewer than all devices use the first ones). The cache's slots split "
                           "over 'sequence', prompts over data x fsdp (batches are padded to it); "
                           "tensor must divide the model's heads.")
  parser.add_argument("--prefill-chunk", type=int, default=8192,
                      help="prompt tokens per prefill chunk (default 8192).")
  parser.add_argument("--kv-block", type=int, default=512,
                      help="keys per attention block over the cache (bounds temporaries).")


@contextlib.contextmanager
def flag_errors(parser: argparse.ArgumentParser):
  """Turns the ValueError / FileNotFoundError of flag checks into `parser.error`: usage and
  `error: <message>` on stderr, exit status 2, no traceback."""
  try:
    yield
  except (ValueError, FileNotFoundError) as e:
    parser.error(str(e))


def positive(args: argparse.Namespace, *names: str) -> None:
  """Raises naming the flag when an integer flag (by its dest name) is < 1."""
  for name in names:
    value = getattr(args, name)
    if value is not None and value < 1:
      raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}.")


def parse_mesh(text: str, flag: str = "--mesh"):
  """'sequence=4,tensor=2' -> a mesh (None for ''), errors naming the flag."""
  if not text:
    return None
  sizes = {}
  for part in text.split(","):
    name, _, value = part.partition("=")
    try:
      size = int(value)
    except ValueError:
      raise ValueError(f"{flag}={text!r}: expected axis=size pairs like 'sequence=4,tensor=2'."
                       ) from None
    if name.strip() in sizes:
      raise ValueError(f"{flag}={text!r}: axis {name.strip()!r} is given twice.")
    sizes[name.strip()] = size
  import jax  # pylint: disable=g-import-not-at-top
  from ultralong_jax.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  if all(s > 0 for s in sizes.values()) and math.prod(sizes.values()) < len(devices):
    devices = devices[:math.prod(sizes.values())]  # evaluation may use fewer devices
  try:
    return mesh_lib.make_mesh(sizes, devices=devices)
  except ValueError as e:
    raise ValueError(f"{flag}={text!r}: {e}") from None


@dataclasses.dataclass
class ModelFlags:
  """What `check_model_flags` read: the checkpoint's config, the tokenizer, the mesh (or None)."""
  config: LlamaConfig
  tokenizer: Any
  mesh: Mesh | None


def check_model_flags(args: argparse.Namespace) -> ModelFlags:
  """Checks the flags of `add_model_flags` without loading weights; errors name the flag.

  --prefill-chunk / --kv-block >= 1; --mesh: syntax, axis names, sizes against the devices;
  --ckpt: a directory with a readable config, whose heads the mesh's tensor axis divides;
  --tokenizer: loads, and its vocabulary fits the model's.
  """
  positive(args, "prefill_chunk", "kv_block")
  mesh = parse_mesh(args.mesh)
  from ultralong_jax.convert.api import load_config  # pylint: disable=g-import-not-at-top
  from ultralong_jax.data.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top
  config = _named("--ckpt", load_config, args.ckpt)
  tensor = mesh.shape["tensor"] if mesh is not None else 1
  heads = math.gcd(config.num_heads, config.num_kv_heads)
  if heads % tensor:
    fits = [t for t in range(1, heads + 1) if heads % t == 0]
    raise ValueError(f"--mesh={args.mesh!r}: tensor={tensor} does not divide the model's "
                     f"{config.num_heads} query / {config.num_kv_heads} kv heads (--ckpt "
                     f"{args.ckpt}); use tensor in {fits}.")
  tokenizer = _named("--tokenizer", load_tokenizer, args.tokenizer)
  if tokenizer.vocab_size > config.vocab_size:
    raise ValueError(f"--tokenizer {args.tokenizer} has {tokenizer.vocab_size} tokens but the "
                     f"model in --ckpt {args.ckpt} only {config.vocab_size}: wrong pair?")
  return ModelFlags(config, tokenizer, mesh)


def add_prompt_flags(p: argparse.ArgumentParser) -> None:
  """--chat-template (the needle / RULER commands; with --no-chat the family's plain prompt)."""
  from ultralong_jax.evaluation import prompt_style  # pylint: disable=g-import-not-at-top
  p.add_argument("--chat-template", default="auto",
                 choices=("auto",) + prompt_style.TEMPLATES,
                 help="the prompts' chat template (auto: Llama 3.1's for a Llama 3 tokenizer, "
                      "else by the checkpoint's model_type: qwen3, qwen2 -> chatml, mistral, "
                      "llama -> llama2); with --no-chat, whose BOS starts plain prompts")


def prompt_style_for(flags: ModelFlags, args: argparse.Namespace):
  """The PromptStyle of --chat-template / --no-chat for the model of --ckpt; a tokenizer without
  the template's special tokens is refused naming --tokenizer, before any weights load."""
  from ultralong_jax.evaluation import prompt_style  # pylint: disable=g-import-not-at-top
  try:
    return prompt_style.resolve_style(args.chat_template, flags.config.model_type,
                                      flags.tokenizer, chat=not args.no_chat)
  except ValueError as e:
    raise ValueError(f"--tokenizer {args.tokenizer}: {e} (--chat-template).") from None


def _named(flag: str, load, path: str):
  """load(path), with a FileNotFoundError / ValueError re-raised naming the flag and the path."""
  try:
    return load(path)
  except (FileNotFoundError, ValueError) as e:
    raise type(e)(f"{flag} {path}: {e}") from None


def load_model(args: argparse.Namespace):
  """The model of --ckpt in --dtype (after `check_model_flags`); a missing or damaged weights
  file is a ValueError / FileNotFoundError naming --ckpt (callers: inside `flag_errors`)."""
  import ultralong_jax  # pylint: disable=g-import-not-at-top
  return _named("--ckpt", lambda path: ultralong_jax.from_pretrained(path, dtype=args.dtype),
                args.ckpt)
