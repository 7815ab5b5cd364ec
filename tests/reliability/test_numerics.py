"""Numerics guard: a NaN/Inf loss or gradient never reaches the weights; skip counts it, stop
names the step and the last good checkpoint."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from ultralong_jax.modeling import llama
from ultralong_jax.parallel import mesh as mesh_lib
from ultralong_jax.training import config as config_lib
from ultralong_jax.training import loop, run_config, train_step


def _batch(rng, nan=False):
  mask = np.ones((2, 64), np.float32)
  if nan:
    mask[0, 5] = np.nan  # one poisoned token: loss and every gradient become NaN
  return {"inputs": rng.randint(0, 512, (2, 64)).astype(np.int32),
          "targets": rng.randint(0, 512, (2, 64)).astype(np.int32),
          "positions": np.tile(np.arange(64, dtype=np.int32), (2, 1)),
          "segment_ids": np.ones((2, 64), np.int32), "loss_mask": mask}


def test_nonfinite_step_keeps_params_and_optimizer_state_and_counts(tiny_config):
  c = tiny_config(seq_len=64)
  model_cfg = config_lib.model_config(c)
  mesh = mesh_lib.make_mesh({"data": 1}, devices=jax.devices()[:1])
  params = nnx.to_pure_dict(nnx.state(llama.init_model(model_cfg, seed=0), nnx.Param))
  built = train_step.build(model_cfg, mesh, run_config.OptimConfig.of(c), c.train.steps,
                           seq_len=64, batch_size=2,
                           options=train_step.StepOptions(loss_chunk_size=32))
  step = built.step
  rng = np.random.RandomState(0)
  with jax.set_mesh(mesh):
    state = built.init_state(params)
    state, _ = step(state, built.put_batch(_batch(rng)))
    before = jax.device_get(state)
    state, metrics = step(state, built.put_batch(_batch(rng, nan=True)))
    after = jax.device_get(state)
    assert not np.isfinite(metrics["loss"])
    assert int(after["nonfinite_steps"]) == 1 and int(after["first_nonfinite_step"]) == 2
    assert int(after["step"]) == 2
    # Bit-identical: the skipped update is a select, not an update by zero.
    for a, b in zip(jax.tree.leaves(before["params"]), jax.tree.leaves(after["params"])):
      np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(before["opt_state"]), jax.tree.leaves(after["opt_state"])):
      np.testing.assert_array_equal(a, b)
    state, metrics = step(state, built.put_batch(_batch(rng)))  # training goes on
    assert np.isfinite(metrics["loss"]) and int(metrics["nonfinite_steps"]) == 1
    changed = jax.device_get(state["params"])
    assert any(not np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(changed), jax.tree.leaves(after["params"])))


def _poison_step(monkeypatch, bad_steps):
  """Makes the loop's batches at the given 1-based steps carry a NaN in loss_mask."""
  calls = {"n": 0}
  real = train_step.put_batch

  def put(batch, shardings):
    calls["n"] += 1
    if calls["n"] in bad_steps:
      batch = dict(batch, loss_mask=np.where(np.arange(batch["loss_mask"].shape[1]) == 3, np.nan,
                                             batch["loss_mask"]).astype(np.float32))
    return real(batch, shardings)

  monkeypatch.setattr(train_step, "put_batch", put)


def test_stop_names_the_step_and_the_last_good_checkpoint(tiny_config, tmp_path, monkeypatch):
  c = tiny_config(steps=6)
  c.train.nonfinite = "stop"
  c.checkpoint.every_steps = 2
  c.export.hf = False
  _poison_step(monkeypatch, {5})
  with pytest.raises(loop.NonFiniteError, match=r"at step 5 .*Last good checkpoint: step 4 in"):
    loop.run(c, str(tmp_path), progress=False)


def test_skip_goes_on_until_too_many_steps_were_skipped(tiny_config, tmp_path, monkeypatch,
                                                         caplog):
  c = tiny_config(steps=6)
  c.train.max_nonfinite_steps = 1  # skip (the default) tolerates one bad step, not two
  c.checkpoint.every_steps = 0  # Orbax still saves the first step (its initial-save policy)
  _poison_step(monkeypatch, {2, 4})
  with pytest.raises(loop.NonFiniteError, match=r"at step 2 .*2 skipped steps > "
                     r"train.max_nonfinite_steps=1.*Last good checkpoint: step 1 in"):
    loop.run(c, str(tmp_path), progress=False)
  assert "1 step(s) with a non-finite loss or gradient skipped (the first: step 2)" in caplog.text
  with open(tmp_path / "metrics.jsonl") as f:  # step 3 trained normally after the skipped step 2
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows] == [1, 2, 3, 4] and np.isfinite(rows[2]["loss"])
  assert [r["nonfinite_steps"] for r in rows] == [0, 1, 1, 2]
