"""The embedded demo (until the training loop lands): a tiny UltraLong-style Llama, exported to a
Hugging Face directory, converted to the project's Orbax checkpoint and back, with logits printed
at every hop so a reader sees that nothing changed.

  python -m ultralong_jax.demo [--workdir runs/demo]
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np

import ultralong_jax
from ultralong_jax.convert import __main__ as convert_cli
from ultralong_jax.modeling import llama, presets, rope


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default="runs/demo")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  start = time.time()
  if os.path.exists(args.workdir):
    shutil.rmtree(args.workdir)
  hf_dir, ckpt_dir, back_dir = (os.path.join(args.workdir, d) for d in ("hf", "ckpt", "hf_back"))

  # A tiny Llama with the paper's 1M RoPE setting (llama3, factor 128 over 8K).
  config = presets.tiny(rope_theta=500000.0, rope_scaling=rope.ultralong_rope_scaling(128),
                        max_position_embeddings=1 << 20)
  model = llama.init_model(config, seed=args.seed)
  print(f"model: {config.num_params:,} parameters, {config.num_layers} layers, "
        f"rope_scaling={dict(config.rope_scaling)}")

  ids = jnp.asarray(np.random.RandomState(args.seed).randint(0, config.vocab_size, (1, 16)))
  positions = jnp.arange(16, dtype=jnp.int32)[None] + 1_000_000  # far past the 8K pretraining length
  reference = np.asarray(model(ids, positions=positions))

  ultralong_jax.save_pretrained(model, hf_dir)
  from_hf = ultralong_jax.from_pretrained(hf_dir)
  convert_cli.main(["hf-to-jax", "--hf-dir", hf_dir, "--out", ckpt_dir])
  from_ckpt = ultralong_jax.from_pretrained(ckpt_dir)
  convert_cli.main(["jax-to-hf", "--ckpt", ckpt_dir, "--out", back_dir])
  from_back = ultralong_jax.from_pretrained(back_dir)

  print(f"\nlogits of the last token at position {int(positions[0, -1]):,} (first 6 of "
        f"{config.vocab_size}):")
  print(f"  {'model':<28} {'logits':<60} max|Δ|")
  for name, m in [("original (Flax NNX)", model), ("-> HF safetensors", from_hf),
                  ("-> Orbax checkpoint", from_ckpt), ("-> HF again", from_back)]:
    logits = np.asarray(m(ids, positions=positions))
    shown = " ".join(f"{x:+.4f}" for x in logits[0, -1, :6])
    print(f"  {name:<28} {shown:<60} {np.abs(logits - reference).max():.1e}")
    assert np.array_equal(logits, reference), f"{name}: logits changed in conversion"
  top = np.argsort(-reference[0, -1])[:5]
  print(f"\ntop-5 next tokens: {top.tolist()}  (random weights: no meaning yet)")
  print(f"outputs under {os.path.abspath(args.workdir)}; jax {jax.__version__} on "
        f"{jax.devices()[0].platform}; {time.time() - start:.1f}s")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
