"""The training loop end to end on 8 simulated devices: both stages, sharded == single device,
exact resume, SIGTERM, config errors."""

import json
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ultralong_jax.modeling import llama
from ultralong_jax.parallel import layout, mesh as mesh_lib
from ultralong_jax.parallel.ring_attention import make_attention_fn
from ultralong_jax.training import config as config_lib
from ultralong_jax.training import export, loop, run_config, train_step


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [(r["step"], r["loss"]) for r in map(json.loads, f)]


@pytest.mark.parametrize("stage", [1, 2])
def test_each_stage_trains_exports_and_the_loss_falls(stage, tiny_config, tmp_path):
  c = tiny_config(stage=stage, steps=8)
  summary = loop.run(c, str(tmp_path), progress=False)
  assert summary["complete"] and summary["end_step"] == 8
  losses = [loss for _, loss in _losses(str(tmp_path))]
  assert len(losses) == 8 and losses[-1] < losses[0] - 0.3, losses
  for key in ("final_checkpoint", "hf_export", "loss_plot"):
    assert os.path.exists(summary[key]), key
  assert os.path.exists(os.path.join(summary["hf_export"], "config.json"))
  events = os.listdir(os.path.join(str(tmp_path), "tensorboard"))
  assert any(name.startswith("events.out.tfevents") for name in events)
  assert summary["last_metrics"]["loss_tokens"] > 0
  if stage == 1:  # one domain: it has every token
    assert summary["data"]["realized_mix"] == {"synthetic": 1.0}


def _step_on(mesh, config, params, batch, layout_name="zigzag"):
  built = train_step.build(
      config_lib.model_config(config), mesh, run_config.OptimConfig.of(config),
      config.train.steps,
      seq_len=batch["inputs"].shape[1], batch_size=batch["inputs"].shape[0],
      options=train_step.StepOptions(microbatches=config.train.microbatches, loss_chunk_size=32),
      attention_fn=make_attention_fn(mesh, layout=layout_name))
  n = mesh.shape["sequence"]
  if n > 1:
    batch = layout.zigzag_permute(batch, n, layout=layout_name)
  with jax.set_mesh(mesh):
    state = built.init_state(params)
    for _ in range(2):
      state, metrics = built.step(state, built.put_batch(batch))
  return jax.device_get(state["params"]), jax.device_get(metrics)


def test_sharded_step_equals_single_device_step(tiny_config):
  c = tiny_config(batch=4)
  c.train.microbatches = 2  # gradient accumulation on both sides
  model_cfg = config_lib.model_config(c)
  params = nnx.to_pure_dict(nnx.state(llama.init_model(model_cfg, seed=3), nnx.Param))
  rng = np.random.RandomState(0)
  batch = {"inputs": rng.randint(0, 512, (4, 128)).astype(np.int32),
           "targets": rng.randint(0, 512, (4, 128)).astype(np.int32),
           "positions": np.tile(np.arange(128, dtype=np.int32), (4, 1)),
           "segment_ids": np.ones((4, 128), np.int32),
           "loss_mask": (rng.rand(4, 128) > 0.2).astype(np.float32)}
  one = mesh_lib.make_mesh({"data": 1}, devices=jax.devices()[:1])
  eight = mesh_lib.make_mesh(dict(data=2, fsdp=1, sequence=2, tensor=2))
  ref_params, ref_metrics = _step_on(one, c, params, batch)
  params8, metrics8 = _step_on(eight, c, params, batch)
  # float32; different reduction orders across devices: agreement to ~1e-6 relative.
  np.testing.assert_allclose(metrics8["loss"], ref_metrics["loss"], rtol=1e-5)
  np.testing.assert_allclose(metrics8["grad_norm"], ref_metrics["grad_norm"], rtol=1e-4)
  # Adam divides by sqrt(second moment): for near-zero gradients reduction-order noise is
  # amplified up to ~lr, so parameters get an absolute bound of 1% of one step (lr = 3e-3).
  for a, b in zip(jax.tree.leaves(params8), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=3e-5)


def test_interrupted_and_resumed_run_logs_the_same_losses(tiny_config, tmp_path):
  c = tiny_config(steps=6)
  c.checkpoint.every_steps = 0  # only the forced save at the end of each invocation
  loop.run(c, str(tmp_path / "straight"), progress=False)
  first = loop.run(c, str(tmp_path / "resumed"), max_steps=3, progress=False)
  assert first["end_step"] == 3 and not first["complete"]
  second = loop.run(c, str(tmp_path / "resumed"), progress=False)
  assert second["start_step"] == 3 and second["complete"]
  straight, resumed = _losses(str(tmp_path / "straight")), _losses(str(tmp_path / "resumed"))
  assert [s for s, _ in resumed] == list(range(1, 7))
  # Same data, same state: identical losses (float32 equality up to summation noise).
  np.testing.assert_allclose([l for _, l in resumed], [l for _, l in straight], rtol=1e-6)


def _final_params(path):
  from ultralong_jax.convert import api as convert_api  # pylint: disable=import-outside-toplevel
  return jax.tree.map(np.asarray, convert_api.model_params(convert_api.from_pretrained(path)))


def test_resuming_a_finished_run_with_more_steps_rewrites_every_output(tiny_config, tmp_path):
  """final/ (what stage 2 starts from), hf/, summary.json and loss.png all describe the step the
  resumed run ended at, not the first run's."""
  straight = loop.run(tiny_config(steps=8), str(tmp_path / "straight"), progress=False)
  workdir = str(tmp_path / "resumed")
  loop.run(tiny_config(steps=4), workdir, progress=False)
  at_4 = _final_params(os.path.join(workdir, "final"))
  summary = loop.run(tiny_config(steps=8), workdir, progress=False)
  assert summary["start_step"] == 4 and summary["end_step"] == 8 and summary["complete"]
  with open(os.path.join(workdir, "summary.json")) as f:
    assert json.load(f)["end_step"] == 8
  final = _final_params(os.path.join(workdir, "final"))
  hf = _final_params(os.path.join(workdir, "hf"))
  reference = _final_params(straight["final_checkpoint"])
  for got, exported, old, want in zip(*map(jax.tree.leaves, (final, hf, at_4, reference))):
    np.testing.assert_array_equal(exported, got)  # the HF export is the same step, bit for bit
    assert not np.array_equal(got, old)
    # resumed == straight up to float32 summation noise (the losses agree to 1e-6)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  with open(os.path.join(workdir, "final", export.RUN_INFO)) as f:
    assert json.load(f)["step"] == 8
  leftovers = [n for n in os.listdir(workdir) if n.endswith((".partial", ".old"))]
  assert not leftovers, leftovers
  again = loop.run(tiny_config(steps=8), workdir, progress=False)  # the same command, once more
  assert again["start_step"] == again["end_step"] == 8 and again["complete"]
  for got, want in zip(*map(jax.tree.leaves, (_final_params(os.path.join(workdir, "final")),
                                              final))):
    np.testing.assert_array_equal(got, want)


def test_resume_on_a_different_mesh(tiny_config, tmp_path):
  c = tiny_config(steps=4)
  loop.run(c, str(tmp_path / "straight"), progress=False)
  loop.run(c, str(tmp_path / "moved"), max_steps=2, progress=False)
  c2 = tiny_config(steps=4, mesh=dict(data=1, fsdp=2, sequence=4, tensor=1))
  summary = loop.run(c2, str(tmp_path / "moved"), progress=False)
  assert summary["start_step"] == 2 and summary["mesh"]["sequence"] == 4
  np.testing.assert_allclose([l for _, l in _losses(str(tmp_path / "moved"))],
                             [l for _, l in _losses(str(tmp_path / "straight"))], rtol=1e-5)


def test_sigterm_saves_and_exits_cleanly(tiny_config, tmp_path):
  c = tiny_config(steps=10_000)
  c.checkpoint.every_steps = 0
  workdir = str(tmp_path)

  def kill_after_first_metrics():
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and not (os.path.exists(path) and os.path.getsize(path)):
      time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)

  threading.Thread(target=kill_after_first_metrics, daemon=True).start()
  summary = loop.run(c, workdir, progress=False)
  assert summary["preempted"] and not summary["complete"]
  saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert saved == [summary["end_step"]] and 1 <= summary["end_step"] < 10_000


@pytest.mark.parametrize("change, key", [
    (lambda c: setattr(c.data, "seq_len", 102), "data.seq_len"),  # not divisible by 2 x sequence
    (lambda c: setattr(c.mesh, "tensor", 3), "mesh"),
    (lambda c: setattr(c.data, "global_batch_size", 3), "data.global_batch_size"),
    (lambda c: setattr(c.model, "overrides_json", '{"num_heads": 6, "num_kv_heads": 3}'),
     "num_kv_heads"),
    (lambda c: setattr(c.data, "seq_len", 4096), "max_position_embeddings"),
    (lambda c: setattr(c.init, "mode", "hf"), "init.path"),
    (lambda c: setattr(c.train, "loss_chunk_size", 48), "loss_chunk_size"),
    (lambda c: setattr(c.data, "vocab_size", 1000), "vocab_size"),
])
def test_config_errors_name_the_key(change, key, tiny_config):
  c = tiny_config()
  change(c)
  with pytest.raises(ValueError, match=key):
    config_lib.validate(c, num_devices=8)


def test_mfu_flop_count_by_hand():
  from ultralong_jax.modeling import presets
  from ultralong_jax.training import metrics
  cfg = presets.tiny()  # V=512, D=64, F=128, L=2, N=4, K=2, H=32, untied
  matmul = 2 * (64 * 32 * (2 * 4 + 2 * 2) + 3 * 64 * 128 + 2 * 64) + 64 + 512 * 64
  attention = 3 * 4 * 2 * 4 * 32 * (1024 / 2)
  assert metrics.train_flops_per_token(cfg, 1024) == 6 * matmul + attention
  assert metrics.peak_tflops(override=123.0) == 123.0


@pytest.mark.parametrize("key", sorted(config_lib.CHOICES))
def test_every_enumerated_key_is_checked_before_anything_is_read(key, tiny_config):
  """A value outside the allowed set fails validate() with the full key and the allowed values,
  before init.path is opened (it does not exist here) and before anything compiles."""
  c = tiny_config()
  c.init.mode, c.init.path = "checkpoint", "/nonexistent/checkpoint"
  section, name = key.split(".")
  c[section][name] = "flash3" if key != "init.mode" else "pretrained"
  with pytest.raises(ValueError) as e:
    config_lib.validate(c, num_devices=8)
  message = str(e.value)
  assert message.startswith(f"{key}=") and "nonexistent" not in message, message
  assert all(repr(v) in message for v in config_lib.CHOICES[key]), message


def test_a_kernel_without_segment_ids_is_refused_for_stage_2(tiny_config):
  c = tiny_config(stage=2)
  c.attention.kernel = "cudnn"
  with pytest.raises(ValueError, match=r"attention.kernel='cudnn' cannot mask by segment ids"):
    config_lib.validate(c, num_devices=8)


def test_the_progress_bar_names_what_runs(tiny_config, tmp_path, capsys):
  c = tiny_config(steps=1)
  c.train.run_name = "base"
  loop.run(c, str(tmp_path / "base"), progress=True)
  err = capsys.readouterr().err
  assert "base: 100%" in err and "stage 1" not in err, err
  loop.run(tiny_config(steps=1), str(tmp_path / "stage1"), progress=True)
  assert "stage 1: 100%" in capsys.readouterr().err
