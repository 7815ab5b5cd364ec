"""The jit-compiled, sharded train step: explicit in/out shardings, donated state, microbatches.

  built = build(model_config, mesh, optim, total_steps, seq_len=T, batch_size=B)
  built = from_config(run)        # the same, as a resolved training config (RunConfig) says
  state = built.init_state(built.random_params(seed))
  state, metrics = built.step(state, built.put_batch(batch))

`build` is the one place a train step is assembled: the training loop (through `from_config`),
the memory estimate's XLA plan and the benchmarks (training/compile_plan.py) and the tests call it.

The train state is a plain pytree {"params", "opt_state", "step", "nonfinite_steps",
"first_nonfinite_step"}: parameters as the model's pure dict (nnx.to_pure_dict), so Orbax, optax
and the sharding rules all see ordinary nested dicts.

Numerics guard: a step whose loss or gradient norm is NaN/Inf keeps the old parameters and
optimizer state (selected on device with `jnp.where`, no host sync) and counts itself in
`nonfinite_steps`; `first_nonfinite_step` remembers the first such step (-1: none). The host reads
both only when it logs, so a healthy run pays nothing for the check.
The step rebuilds the NNX model inside the trace with `nnx.merge(graphdef, params)` (the
functional pattern the Flax performance guide recommends over nnx.jit in hot loops).

Batch features (from ultralong_jax.data): inputs, targets, positions, segment_ids [B, T] int32 and
loss_mask [B, T]; B is split over data x fsdp, T over sequence (already in zigzag order when the
sequence axis is > 1).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ultralong_jax.modeling import llama
from ultralong_jax.modeling.config import LlamaConfig
from ultralong_jax.parallel import mesh as mesh_lib, sharding
from ultralong_jax.parallel.ring_attention import make_attention_fn
from ultralong_jax.training import loss as loss_lib, optimizer
from ultralong_jax.training.run_config import OptimConfig, RunConfig

FEATURES = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


@dataclasses.dataclass(frozen=True)
class StepOptions:
  microbatches: int = 1
  loss_chunk_size: int = 4096
  z_loss_weight: float = 0.0
  use_segment_ids: bool = False  # document masking / SFT packing; False: one causal row


def init_state(params: dict, tx: optax.GradientTransformation) -> dict:
  return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
          "nonfinite_steps": jnp.zeros((), jnp.int32),
          "first_nonfinite_step": jnp.full((), -1, jnp.int32)}


def _microbatches(batch: dict, m: int) -> dict:
  """[B, T] -> [m, B/m, T] taking rows b = j*m + i into microbatch i: each device's contiguous
  rows spread evenly over microbatches, so no microbatch gathers rows from other devices."""
  def split(x):
    b = x.shape[0]
    return jnp.moveaxis(x.reshape(b // m, m, *x.shape[1:]), 1, 0)
  return jax.tree.map(split, batch)


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule: Callable,
                    options: StepOptions) -> Callable[[dict, dict], tuple[dict, dict]]:
  """The un-jitted step function (state, batch) -> (new state, metrics)."""

  def loss_fn(params, mb):
    model = nnx.merge(graphdef, params)
    segment_ids = mb["segment_ids"] if options.use_segment_ids else None
    hidden = model.hidden_states(mb["inputs"], mb["positions"], segment_ids)
    sums = loss_lib.chunked_cross_entropy(hidden, model.lm_head_weight(), mb["targets"],
                                          mb["loss_mask"], chunk_size=options.loss_chunk_size)
    return sums.loss + options.z_loss_weight * sums.z_loss, sums

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state, batch):
    params = state["params"]
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    zero_sums = loss_lib.LossSums(*(jnp.zeros((), jnp.float32) for _ in range(4)))

    def accumulate(carry, mb):
      grads, sums = carry
      (_, mb_sums), mb_grads = grad_fn(params, mb)
      return (jax.tree.map(jnp.add, grads, mb_grads), jax.tree.map(jnp.add, sums, mb_sums)), None

    if options.microbatches == 1:
      (_, sums), grads = grad_fn(params, batch)
    else:
      (grads, sums), _ = jax.lax.scan(accumulate, (zero_grads, zero_sums),
                                      _microbatches(batch, options.microbatches))
    # Gradients of token *sums*, normalized once by the tokens of the whole global batch, so
    # microbatches (and rows with different numbers of loss tokens) weigh every token equally.
    weight = jnp.maximum(sums.weight, 1.0)
    grads = jax.tree.map(lambda g: g / weight, grads)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    # One NaN/Inf anywhere in the gradients makes their global norm non-finite, so two scalars
    # cover every leaf. The bad update is dropped on device (like optax.apply_if_finite, but the
    # counters live in our state so the host can read them at log steps only).
    finite = jnp.isfinite(sums.loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    step_index = state["step"] + 1  # 1-based, as the loop and metrics.jsonl count steps
    new_state = {
        "params": keep(optax.apply_updates(params, updates), params),
        "opt_state": keep(opt_state, state["opt_state"]),
        "step": step_index,
        "nonfinite_steps": state["nonfinite_steps"] + (~finite).astype(jnp.int32),
        "first_nonfinite_step": jnp.where(
            (state["first_nonfinite_step"] < 0) & ~finite, step_index,
            state["first_nonfinite_step"]),
    }
    metrics = {
        "loss": sums.loss / weight,
        "z_loss": sums.z_loss / weight,
        "accuracy": sums.correct / weight,
        "loss_tokens": sums.weight,
        "grad_norm": grad_norm,
        "learning_rate": schedule(state["step"]),
        "nonfinite_steps": new_state["nonfinite_steps"],
        "first_nonfinite_step": new_state["first_nonfinite_step"],
    }
    return new_state, metrics

  return step



@dataclasses.dataclass(frozen=True)
class TrainStep:
  """A sharded, jit-compiled train step and what its state and batches need (from `build`)."""
  model_config: LlamaConfig
  mesh: Mesh
  tx: optax.GradientTransformation
  abstract_params: dict     # ShapeDtypeStructs of the parameters (pure dict)
  shardings: dict           # NamedShardings of the train state {"params", "opt_state", ...}
  batch_shardings: dict     # NamedShardings of the global batch {feature: ...}
  seq_len: int
  batch_size: int           # global rows
  step: Callable            # jitted (state, batch) -> (state, metrics); the state is donated

  def abstract_state(self) -> dict:
    """The train state as ShapeDtypeStructs carrying their shardings (restore / compile target)."""
    shapes = jax.eval_shape(lambda p: init_state(p, self.tx), self.abstract_params)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        shapes, self.shardings)

  def abstract_batch(self) -> dict:
    return {k: jax.ShapeDtypeStruct((self.batch_size, self.seq_len), jnp.int32, sharding=s)
            for k, s in self.batch_shardings.items()}

  def random_params(self, seed: int) -> dict:
    """HF-style random parameters, created sharded inside a jit (never whole on one host)."""
    make = lambda: nnx.to_pure_dict(nnx.state(llama.init_model(self.model_config, seed),
                                              nnx.Param))
    return jax.jit(make, out_shardings=self.shardings["params"])()

  def init_state(self, params: dict) -> dict:
    """The step-0 train state of `params` (fresh optimizer moments), placed by `shardings`."""
    return jax.jit(lambda p: init_state(p, self.tx), out_shardings=self.shardings)(params)

  def put_batch(self, batch: dict) -> dict:
    return put_batch(batch, self.batch_shardings)


def build(model_config: LlamaConfig, mesh: Mesh, optim: OptimConfig, total_steps: int, *,
          seq_len: int, batch_size: int, options: StepOptions = StepOptions(),
          attention_fn: Callable | None = None) -> TrainStep:
  """The train step of `model_config` on `mesh`: AdamW per `optim` (its schedule over
  `total_steps`), parameters and Adam moments sharded by the logical-axis rules
  (parallel/sharding.py), the batch [batch_size, seq_len] split over data x fsdp and sequence.
  `attention_fn` is the model's attention (None: the plain full attention)."""
  abstract = llama.abstract_model(model_config, attention_fn=attention_fn,
                                  constrain_fn=sharding.constrain_fn(mesh))
  graphdef, abstract_state = nnx.split(abstract)
  abstract_params = nnx.to_pure_dict(abstract_state)
  tx, schedule = optimizer.make_optimizer(optim, total_steps)
  shardings = _train_state_shardings(
      mesh, tx, nnx.to_pure_dict(sharding.state_shardings(mesh, abstract_state)), abstract_params)
  example = {k: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32) for k in FEATURES}
  batch_shardings = sharding.batch_shardings(mesh, example)  # checks divisibility
  replicated = NamedSharding(mesh, P())
  step = jax.jit(make_train_step(graphdef, tx, schedule, options),
                 in_shardings=(shardings, batch_shardings),
                 out_shardings=(shardings, replicated), donate_argnums=(0,))
  return TrainStep(model_config, mesh, tx, abstract_params, shardings, batch_shardings, seq_len,
                   batch_size, step)


def from_config(run: RunConfig) -> TrainStep:
  """The train step a resolved training config describes (config.resolve): its model, mesh,
  attention, optimizer and step options."""
  mesh = mesh_lib.make_mesh(run.mesh.sizes)
  a = run.attention
  attention_fn = make_attention_fn(mesh, strategy=a.strategy, layout=a.layout, kernel=a.kernel,
                                   chunk_size=a.chunk_size)
  options = StepOptions(microbatches=run.train.microbatches,
                        loss_chunk_size=min(run.train.loss_chunk_size, run.seq_len),
                        z_loss_weight=run.train.z_loss_weight,
                        use_segment_ids=run.uses_segment_ids)
  return build(run.model, mesh, run.optim, run.train.steps, seq_len=run.seq_len,
               batch_size=run.global_batch_size, options=options, attention_fn=attention_fn)


def _train_state_shardings(mesh: Mesh, tx: optax.GradientTransformation, params_shardings: dict,
                           abstract_params: dict) -> dict:
  """Shardings of the whole train state: Adam moments follow their parameter, scalars replicate."""
  replicated = NamedSharding(mesh, P())
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, params_shardings,
                              transform_non_params=lambda _: replicated,
                              is_leaf=lambda x: isinstance(x, NamedSharding))
  return {"params": params_shardings, "opt_state": opt, "step": replicated,
          "nonfinite_steps": replicated, "first_nonfinite_step": replicated}


def put_batch(batch: dict, shardings: dict) -> dict:
  """This process's rows (numpy) -> global jax arrays laid out by `shardings` (multi-host safe)."""
  return {k: jax.make_array_from_process_local_data(shardings[k], batch[k]) for k in FEATURES}
