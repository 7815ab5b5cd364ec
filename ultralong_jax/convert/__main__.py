"""Convert checkpoints between Hugging Face safetensors and the project's Orbax format.

  python -m ultralong_jax.convert hf-to-jax --hf-dir Llama-3.1-8B-Instruct --out ckpt/llama31_8b \
      [--dtype bfloat16] [--ultralong 1m | --rope-scaling '{"rope_type": "llama3", ...}']
  python -m ultralong_jax.convert jax-to-hf --ckpt ckpt/llama31_8b --out hf/UltraLong-8B-1M \
      [--dtype bfloat16] [--tokenizer-dir Llama-3.1-8B-Instruct]

hf-to-jax holds one copy of the model (as numpy) and never two; jax-to-hf restores one
parameter at a time and holds one stacked parameter plus the safetensors shard being written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ultralong_jax.convert import api, checkpoint, hf
from ultralong_jax.modeling import presets, rope
from ultralong_jax.modeling.llama import abstract_model


def _rope_arg(args) -> dict | None:
  if args.ultralong and args.rope_scaling:
    raise SystemExit("error: pass --ultralong or --rope-scaling, not both.")
  if args.ultralong:
    # The paper's extension for the checkpoint's family: llama3 by parts for Llama 3.x (factor
    # 128/256/512 over 8K), yarn alpha=1 beta=4 over the native context otherwise.
    native = api.load_config(args.hf_dir)
    return rope.long_context_rope_scaling(native.rope_scaling, native.max_position_embeddings,
                                          presets.ULTRALONG_LENGTHS[args.ultralong])
  if args.rope_scaling:
    try:
      return json.loads(args.rope_scaling)
    except json.JSONDecodeError as e:
      raise SystemExit(f"error: --rope-scaling is not valid JSON ({e.msg}).") from None
  return None


def hf_to_jax(args) -> None:
  dtype = np.dtype(args.dtype) if args.dtype else None
  config = api.load_config(args.hf_dir, _rope_arg(args), args.max_position_embeddings)
  if dtype is not None:
    config = config.replace(param_dtype=dtype.name, dtype=dtype.name)
  reader = hf.SafetensorsReader(args.hf_dir)
  # Each stacked parameter becomes a jax array as soon as it is assembled and its numpy copy is
  # dropped: Orbax would otherwise copy a numpy tree once more while saving.
  params = hf.load_hf_params(reader, config, dtype=dtype, put=lambda _, a: jnp.asarray(a))
  stored = np.dtype(params["embed"].dtype).name
  config = config.replace(param_dtype=stored, dtype=config.dtype if dtype else stored)
  checkpoint.save_params(args.out, config, params)


def jax_to_hf(args) -> None:
  config = checkpoint.read_config(args.ckpt)
  abstract = nnx.to_pure_dict(nnx.state(abstract_model(config), nnx.Param))
  # One parameter restored at a time: the host never holds the whole model.
  api.export_hf(args.out, config, checkpoint.param_getter(args.ckpt, abstract),
                tokenizer_dir=args.tokenizer_dir, dtype=args.dtype)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m ultralong_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  a = sub.add_parser("hf-to-jax", help="HF directory -> project Orbax checkpoint")
  a.add_argument("--hf-dir", required=True)
  a.add_argument("--out", required=True)
  a.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                 help="parameter dtype to store (default: as in the safetensors)")
  a.add_argument("--ultralong", choices=sorted(presets.ULTRALONG_LENGTHS), default=None,
                 help="extend RoPE to this length the paper's way (llama3 by parts for Llama 3.x, "
                 "else yarn)")
  a.add_argument("--rope-scaling", default=None, help="a HF rope_scaling dict as JSON")
  a.add_argument("--max-position-embeddings", type=int, default=None)
  b = sub.add_parser("jax-to-hf", help="project Orbax checkpoint -> HF directory")
  b.add_argument("--ckpt", required=True)
  b.add_argument("--out", required=True)
  b.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
  b.add_argument("--tokenizer-dir", default=None, help="copy tokenizer files from here")
  args = parser.parse_args(argv)
  start = time.time()
  try:
    (hf_to_jax if args.command == "hf-to-jax" else jax_to_hf)(args)
  except (FileNotFoundError, FileExistsError, ValueError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"{args.command}: wrote {os.path.abspath(args.out)} in {time.time() - start:.1f}s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
