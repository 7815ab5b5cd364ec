"""Shared command-line plumbing of the eval CLIs: model, tokenizer and mesh from flags."""

from __future__ import annotations

import argparse
import os


def add_model_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--ckpt", required=True,
                      help="Hugging Face model directory or project checkpoint (from_pretrained).")
  parser.add_argument("--tokenizer", required=True,
                      help="tokenizer.json, a directory holding it, or a SentencePiece .model.")
  parser.add_argument("--out", required=True, help="output directory (created).")
  parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"),
                      help="parameter and compute dtype (default bfloat16).")
  parser.add_argument("--mesh", default="",
                      help="mesh axis sizes, e.g. 'sequence=-1' or 'sequence=4,tensor=2' "
                           "(default: one device; sizes multiplying to fewer than all devices use the "
                           "first ones). The cache's slots split over 'sequence'.")
  parser.add_argument("--prefill-chunk", type=int, default=8192,
                      help="prompt tokens per prefill chunk (default 8192).")
  parser.add_argument("--kv-block", type=int, default=512,
                      help="keys per attention block over the cache (bounds temporaries).")


def parse_mesh(text: str, flag: str = "--mesh"):
  """'sequence=4,tensor=2' -> a mesh (None for ''), errors naming the flag."""
  if not text:
    return None
  sizes = {}
  for part in text.split(","):
    name, _, value = part.partition("=")
    try:
      sizes[name.strip()] = int(value)
    except ValueError:
      raise ValueError(f"{flag}={text!r}: expected axis=size pairs like 'sequence=4,tensor=2'.")
  import math  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from ultralong_jax.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  if all(s > 0 for s in sizes.values()) and math.prod(sizes.values()) < len(devices):
    devices = devices[:math.prod(sizes.values())]  # evaluation may use fewer devices
  try:
    return mesh_lib.make_mesh(sizes, devices=devices)
  except ValueError as e:
    raise ValueError(f"{flag}={text!r}: {e}") from None


def load(args: argparse.Namespace):
  """(model, tokenizer, mesh) from the flags of `add_model_flags`."""
  if not os.path.isdir(args.ckpt):
    raise FileNotFoundError(f"--ckpt {args.ckpt}: not a directory (give a Hugging Face model "
                            "directory or a project checkpoint).")
  import ultralong_jax  # pylint: disable=g-import-not-at-top
  from ultralong_jax.data.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top
  try:
    tokenizer = load_tokenizer(args.tokenizer)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"--tokenizer: {e}") from None
  mesh = parse_mesh(args.mesh)
  model = ultralong_jax.from_pretrained(args.ckpt, dtype=args.dtype)
  if tokenizer.vocab_size > model.config.vocab_size:
    raise ValueError(f"--tokenizer {args.tokenizer} has {tokenizer.vocab_size} tokens but the "
                     f"model in --ckpt {args.ckpt} only {model.config.vocab_size}: wrong pair?")
  return model, tokenizer, mesh
