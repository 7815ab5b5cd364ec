"""The whole UltraLong recipe in miniature, offline on CPU with 8 simulated devices.

  python -m ultralong_jax.demo [--workdir runs/demo] [--quick]

1. data: a generated corpus (filler prose with pass keys), chats and a byte-level BPE tokenizer
   with Llama 3's special tokens, trained here; the corpus is tokenized into ArrayRecord shards;
2. base: a 4-layer Llama trained at 128 tokens (data parallel over 8 devices);
3. stage 1: its context extended 8x to 1,024 tokens with the paper's YaRN RoPE scaling, on packed
   documents with separators, ring attention over sequence=4 x data=2 devices;
4. stage 2: chat SFT with loss on assistant tokens only, examples packed with per-example masks;
5. needle-in-a-haystack heatmaps of the base, stage-1 and stage-2 models (lengths up to 1,024);
6. the final model exported as a Hugging Face directory (stage2/hf).
Configs: ultralong_jax/configs/demo.py (configs/demo.py re-exports it for the train CLI).
Everything lands under --workdir.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import shutil
import time

def load_demo_configs(root: str):
  """(get_config(stage), the ultralong_jax.configs.demo module) with the configs' run paths moved
  under `root`; the demo and notebooks/demo_walkthrough.ipynb build their stages from it."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from ultralong_jax.configs import demo as module  # pylint: disable=import-outside-toplevel

  def get(stage: str):
    c = module.get_config(stage)
    return ml_collections.ConfigDict(json.loads(json.dumps(c.to_dict()).replace("runs/demo", root)))

  return get, module


def _make_documents(data_dir: str, domain: str, spec: dict, tokenizer_path: str, quick: bool,
                    progress: bool) -> None:
  """One domain of the corpus: generated documents (JSONL), tokenized into ArrayRecord shards."""
  from ultralong_jax.data import prepare, synthetic  # pylint: disable=import-outside-toplevel
  n = spec["docs"] // 10 if quick else spec["docs"]
  docs = synthetic.write_documents(
      os.path.join(data_dir, f"{domain}.jsonl"), n, seed=spec["seed"],
      min_sentences=spec["min_sentences"], max_sentences=spec["max_sentences"],
      passkey_fraction=spec["passkey_fraction"], repeat=spec["repeat"],
      tokens=spec.get("tokens", 0), tokenizer=tokenizer_path, recalls=spec.get("recalls", 0))
  prepare.prepare([docs], os.path.join(data_dir, domain), tokenizer_path, num_shards=4,
                  num_workers=1, domain=domain, progress=progress)


def make_data(data_dir: str, separator_id: int, quick: bool, corpus: dict | None = None) -> dict:
  """The generated corpus (`corpus`, default ultralong_jax/configs/demo.py CORPUS: documents per
  domain, their lengths in sentences, the share with a pass key; chats), tokenized into
  ArrayRecord shards. The first domain is made here (with a progress bar), the others meanwhile
  in one background process (each domain has its own seed: the files are the same either way)."""
  if corpus is None:
    corpus = load_demo_configs(data_dir)[1].CORPUS
  from ultralong_jax.data import synthetic  # pylint: disable=import-outside-toplevel
  from ultralong_jax.data.tokenizer import load_tokenizer  # pylint: disable=import-outside-toplevel
  os.makedirs(data_dir, exist_ok=True)
  tokenizer_path = synthetic.build_tokenizer(os.path.join(data_dir, "tokenizer.json"),
                                             corpus["vocab_size"])
  tokenizer = load_tokenizer(tokenizer_path)
  if tokenizer.token_id("<|end_of_text|>") != separator_id:
    raise RuntimeError("configs/demo.py: data.separator_id does not match the demo tokenizer's "
                       f"<|end_of_text|> ({tokenizer.token_id('<|end_of_text|>')}).")
  (first, first_spec), *others = corpus["documents"].items()
  with concurrent.futures.ProcessPoolExecutor(
      1, mp_context=multiprocessing.get_context("spawn")) as pool:
    background = [pool.submit(_make_documents, data_dir, domain, spec, tokenizer_path, quick,
                              False) for domain, spec in others]
    _make_documents(data_dir, first, first_spec, tokenizer_path, quick, progress=True)
    chats = corpus["chats"]
    synthetic.write_chats(os.path.join(data_dir, "chats.jsonl"),
                          chats["count"] // 6 if quick else chats["count"], seed=chats["seed"],
                          max_sentences=chats["max_sentences"])
    for future in background:
      future.result()
  names = ",".join(corpus["documents"])
  return {"tokenizer": tokenizer_path, "documents": os.path.join(data_dir, f"{{{names}}}.jsonl")}


def run_needle_evals(root: str, tokenizer_path: str, get_config, quick: bool, *,
                     lengths: list[int] | None = None, depths: list[float] | None = None,
                     progress: bool = True, workers: int | None = None) -> dict:
  """Needle-in-a-haystack grids for the base (trained at 128 tokens), stage-1 and stage-2 models
  over lengths up to the extended 1,024, with the corpus's pass-key phrasing.

  lengths / depths replace the grid that `quick` picks (notebooks/demo_walkthrough.ipynb runs a
  small one); `workers`: lengths run at once (niah.run_niah; default: one per core, at most 4).
  Stage 2 has stage 1's architecture and prompt lengths: it runs the programs stage 1 compiled.
  Returns {stage: niah.NiahResults}.
  """
  import ultralong_jax  # pylint: disable=import-outside-toplevel
  from ultralong_jax.data import synthetic  # pylint: disable=import-outside-toplevel
  from ultralong_jax.data.tokenizer import load_tokenizer  # pylint: disable=import-outside-toplevel
  from ultralong_jax.evaluation import haystack, niah  # pylint: disable=import-outside-toplevel
  import random  # pylint: disable=import-outside-toplevel

  tokenizer = load_tokenizer(tokenizer_path)
  long_len = get_config("stage1").data.seq_len
  if lengths is None:
    lengths = [long_len // 4, long_len] if quick else list(range(long_len // 8, long_len + 1,
                                                                  long_len // 8))
  if depths is None:
    depths = [0.0, 1.0] if quick else [0.0, 0.25, 0.5, 0.75, 1.0]

  def needle(seed: int) -> haystack.Needle:
    key = random.Random(seed).randint(10000, 99999)
    return haystack.Needle(text=synthetic.passkey_sentence(key), question=synthetic.QUESTION,
                           answer=str(key), kind="passkey")

  filler = synthetic.filler(random.Random(7), 400)
  results = {}
  for stage, chat in (("base", False), ("stage1", False), ("stage2", True)):
    model = ultralong_jax.from_pretrained(os.path.join(root, stage, "final"))
    print(f"\n[niah {stage}] {len(lengths)} lengths x {len(depths)} depths, "
          f"{'chat' if chat else 'plain'} prompts")
    results[stage] = niah.run_niah(
        model, tokenizer, lengths=lengths, depths=depths, out_dir=os.path.join(root, stage, "niah"),
        needle=needle, haystack_text=filler, chat=chat, max_new_tokens=12,
        training_length=get_config(stage).data.seq_len,
        title=f"demo {stage}: pass key retrieval", progress=progress,
        workers=workers or min(4, os.cpu_count() or 1))
  return results


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default="runs/demo")
  parser.add_argument("--quick", action="store_true", help="a few steps per stage (smoke test)")
  args = parser.parse_args(argv)
  from ultralong_jax.parallel import host_devices  # pylint: disable=import-outside-toplevel
  host_devices.simulate(8)  # the stages' meshes take 8 devices; before JAX initializes
  host_devices.keep_freed_memory()  # XLA's per-step CPU buffers reused, not re-mapped
  import jax  # pylint: disable=import-outside-toplevel
  from ultralong_jax.training import loop  # pylint: disable=import-outside-toplevel

  start = time.time()
  root = args.workdir.rstrip("/")
  if os.path.exists(root):
    shutil.rmtree(root)
  get_config, module = load_demo_configs(root)
  base_cfg = get_config("base")
  print(f"[data] generating corpus, chats and tokenizer under {root}/data")
  data = make_data(os.path.join(root, "data"), base_cfg.data.separator_id, args.quick,
                   module.CORPUS)
  summaries = {}
  for stage in ("base", "stage1", "stage2"):
    c = get_config(stage)
    if args.quick:
      c.train.steps = 6
    print(f"\n[{stage}] seq_len {c.data.seq_len}, batch {c.data.global_batch_size}, "
          f"mesh {dict(c.mesh)}, {c.train.steps} steps")
    summaries[stage] = loop.run(c, os.path.join(root, stage))
  niah = run_needle_evals(root, data["tokenizer"], get_config, quick=args.quick)
  elapsed = time.time() - start

  print(f"\nUltraLong recipe in miniature: done in {elapsed / 60:.1f} min on "
        f"{jax.device_count()} simulated {jax.devices()[0].platform} devices\n")
  print(f"  {'stage':<8} {'length':>7} {'first loss':>10} {'last loss':>10} {'wall s':>7} "
        f"{'compile s':>9} {'goodput':>7}  loss curve")
  for stage, s in summaries.items():
    rows = [json.loads(line) for line in open(s["metrics"])]
    t = s["time"]  # where the stage's time went (training/goodput.py)
    print(f"  {stage:<8} {get_config(stage).data.seq_len:>7} {rows[0]['loss']:>10.3f} "
          f"{rows[-1]['loss']:>10.3f} {t['wall_s']:>7.0f} {t['compile_s']:>9.1f} "
          f"{t['goodput']:>7.0%}  {s.get('loss_plot', '-')}")
  print("\n  needle in a haystack (pass key retrieval, exact match; lengths x depths):")
  base_len = get_config("base").data.seq_len
  for name, result in niah.items():
    bands = "  ".join(f"{b['band']}: {b['score']:.0%}"
                      for b in result.by_distance([base_len, 2 * base_len]))
    print(f"  {name:<8} mean {result.mean:6.1%}   by needle-to-question tokens  {bands}")
    print(f"  {'':<8} {result.paths['heatmap']}")
  print(f"\n  tokenizer        {data['tokenizer']}")
  print(f"  corpus           {data['documents']}")
  for stage, s in summaries.items():
    print(f"  {stage + ' model':<16} {s.get('final_checkpoint', '-')}")
  print(f"  HF export        {summaries['stage2'].get('hf_export', '-')}  "
        "(transformers.AutoModelForCausalLM.from_pretrained loads it)")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
