"""Cached generation against transformers' `generate` and against the unsharded cache.

References: transformers' LlamaForCausalLM.generate (greedy, eager attention, float32) run prompt
by prompt (so no padding on its side); our run batches the prompts left-padded with chunked
prefill. Sharded runs (8 simulated devices) are compared with the single-device cache path.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ultralong_jax
from ultralong_jax.evaluation import generate as gen, sampling
from ultralong_jax.parallel import mesh as mesh_lib

ROPE_CASES = {
    "default": dict(),
    "llama3": dict(rope_theta=500000.0, max_position_embeddings=131072,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192}),
    "yarn": dict(rope_scaling={"rope_type": "yarn", "factor": 4.0,
                               "original_max_position_embeddings": 512},
                 max_position_embeddings=2048),
}
NEW_TOKENS = 8


def _prompts(seed=0, lengths=(5, 11, 17)):
  rng = np.random.RandomState(seed)
  return [rng.randint(1, 256, n).tolist() for n in lengths]


def _hf_greedy(hf_model, prompts, max_new_tokens=NEW_TOKENS):
  import torch
  out = []
  for p in prompts:
    ids = torch.tensor([p])
    o = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                          max_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0)
    out.append(o[0, len(p):].tolist())
  return out


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_greedy_matches_transformers(case, make_hf_llama):
  hf_model, path = make_hf_llama(**ROPE_CASES[case])
  prompts = _prompts()
  model = gen.CachedModel(ultralong_jax.from_pretrained(path), kv_block=8)
  # prefill_chunk 8 -> three chunks per prompt: later chunks attend to the cache so far.
  assert model.generate(prompts, max_new_tokens=NEW_TOKENS, prefill_chunk=8) == _hf_greedy(
      hf_model, prompts)


def test_stop_tokens_end_rows(make_hf_llama):
  hf_model, path = make_hf_llama()
  prompts = _prompts(seed=1)
  ref = _hf_greedy(hf_model, prompts)
  stop = ref[0][2]
  out = gen.generate(ultralong_jax.from_pretrained(path), prompts, max_new_tokens=NEW_TOKENS,
                     stop_tokens=[stop])
  for row, expected in zip(out, ref):
    cut = expected.index(stop) + 1 if stop in expected else len(expected)
    assert row == expected[:cut]  # the stop token is kept, nothing after it


MESHES = {
    "seq4_tp2": {"sequence": 4, "tensor": 2},
    "dp2_seq2_tp2": {"data": 2, "sequence": 2, "tensor": 2},
}


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_sharded_prefill_and_decode_match_single_device(mesh_name, make_hf_llama):
  _, path = make_hf_llama()
  model = ultralong_jax.from_pretrained(path)
  prompts = _prompts(seed=2, lengths=(13, 30))
  ref = gen.CachedModel(model, kv_block=8)
  mesh = mesh_lib.make_mesh(MESHES[mesh_name])
  sharded = gen.CachedModel(model, mesh, kv_block=8)
  for chunk in (8, 32):  # several chunks (first by ring, then the cache) / one ring chunk
    batch = gen.left_pad(prompts, 32)
    caches, logits = [], []
    for m in (ref, sharded):
      cache = m.new_cache(2, 40)
      lg, cache = m.prefill(batch, cache, chunk)
      # Two decode steps through the sharded cache.
      for step in range(2):
        tokens = np.asarray(jnp.argmax(lg, -1), np.int32)[:, None]
        positions = (batch.lengths + step)[:, None]
        lg, cache = m.step(cache, tokens, positions, np.ones_like(tokens), 32 + step)
      logits.append(np.asarray(lg))
      caches.append(np.asarray(cache.k))
    scale = np.abs(logits[0]).max()
    assert np.abs(logits[1] - logits[0]).max() / scale < 1e-5
    np.testing.assert_allclose(caches[1][:, :, :34], caches[0][:, :, :34], atol=1e-5)
  assert sharded.generate(prompts, max_new_tokens=4) == ref.generate(prompts, max_new_tokens=4)
  # Sampling in the compiled loop on the mesh draws what the single-device host loop draws.
  sampled = dict(max_new_tokens=4, temperature=1.0, top_p=0.9, seed=1)
  assert sharded.generate(prompts, **sampled) == ref.generate(prompts, loop="host", **sampled)


# data x fsdp = 2, 8, 4: batches of 1, 3 and 5 prompts divide none of them, so generate pads the
# batch with rows of its own and must return exactly the callers' rows.
DATA_MESHES = {
    "dp2_seq4": {"data": 2, "sequence": 4},
    "dp8": {"data": 8},
    "dp2_fsdp2_seq2": {"data": 2, "fsdp": 2, "sequence": 2},
}


@pytest.mark.parametrize("mesh_name", sorted(DATA_MESHES))
def test_batches_not_dividing_the_data_axes_are_padded(mesh_name, make_hf_llama):
  hf_model, path = make_hf_llama()
  model = ultralong_jax.from_pretrained(path)
  prompts = _prompts(seed=3, lengths=(9, 4, 15, 7, 12))
  expected = _hf_greedy(hf_model, prompts, max_new_tokens=3)  # the single-device cache equals it
  sharded = gen.CachedModel(model, mesh_lib.make_mesh(DATA_MESHES[mesh_name]), kv_block=8)
  for n in (1, 3, 5):
    assert sharded.generate(prompts[:n], max_new_tokens=3) == expected[:n]


def test_device_loop_samples_as_the_host_loop(make_hf_llama):
  # The on-device loop splits the key and samples exactly as the per-token host loop, so a seed
  # gives the same tokens; a stop token drawn mid-way ends its row in both.
  _, path = make_hf_llama()
  model = gen.CachedModel(ultralong_jax.from_pretrained(path), kv_block=8)
  prompts = _prompts(seed=4)
  options = dict(max_new_tokens=NEW_TOKENS, temperature=0.8, top_p=0.9, seed=7)
  host = model.generate(prompts, loop="host", **options)
  assert host != model.generate(prompts, loop="host", max_new_tokens=NEW_TOKENS)  # not greedy
  assert model.generate(prompts, **options) == host
  stop = host[1][3]
  host_stopped = model.generate(prompts, loop="host", stop_tokens=[stop], **options)
  assert len(host_stopped[1]) <= 4 and host_stopped[1][-1] == stop
  assert model.generate(prompts, stop_tokens=[stop], **options) == host_stopped


def test_device_loop_ends_when_unfinished_rows_are_done(make_hf_llama):
  # Rows that start done (the mesh's padding rows) never hold the loop open: row 0 draws the stop
  # token 7 at once, row 1 (greedy token 9, never a stop at step 0) stops the loop only if counted.
  _, path = make_hf_llama()
  model = gen.CachedModel(ultralong_jax.from_pretrained(path), kv_block=8)
  logits = jnp.zeros((2, 256)).at[0, 7].set(1.0).at[1, 9].set(1.0)
  loop = model.decode_loop(6, 0.0, 1.0)

  def run(done):
    tokens, counts, steps, _ = loop(model.params, model.new_cache(2, 8), logits,
                                    jnp.array([1, 1]), jnp.array(done), jnp.array([7]),
                                    jax.random.PRNGKey(0), jnp.int32(2))
    return np.asarray(tokens), np.asarray(counts).tolist(), int(steps)

  tokens, counts, steps = run([False, True])
  assert (steps, counts, tokens[0, 0]) == (1, [1, 0], 7)
  tokens, counts, steps = run([False, False])
  assert steps >= 2 and counts[0] == 1 and counts[1] == steps and tokens[1, 0] == 9


def test_top_p_filter_hand_computed():
  # probabilities 0.5, 0.3, 0.15, 0.05 (token order shuffled)
  logits = jnp.log(jnp.array([[0.15, 0.5, 0.05, 0.3]]))
  keep = lambda p: np.isfinite(np.asarray(sampling.top_p_filter(logits, p)))[0].tolist()  # noqa: E731
  assert keep(0.4) == [False, True, False, False]   # the top token alone reaches 0.4
  assert keep(0.8) == [False, True, False, True]    # 0.5 + 0.3 = 0.8 >= 0.8
  assert keep(0.81) == [True, True, False, True]
  assert keep(1.0) == [True, True, True, True]


def test_sampling_seeded_and_nucleus_respected():
  logits = jnp.log(jnp.array([[0.15, 0.5, 0.05, 0.3]] * 256))
  key = jax.random.PRNGKey(0)
  a = np.asarray(sampling.sample(logits, key, 1.0, 0.8))
  assert set(a.tolist()) == {1, 3}                  # only the 0.8 nucleus is ever drawn
  np.testing.assert_array_equal(a, sampling.sample(logits, key, 1.0, 0.8))
  frac = (a == 1).mean()                            # renormalized: 0.5 / 0.8 = 0.625
  assert abs(frac - 0.625) < 0.1
  assert (np.asarray(sampling.sample(logits, key, 0.0, 1.0)) == 1).all()


def test_chat_prompt_matches_transformers_generation_prompt(tokenizer, tokenizer_path):
  from transformers import PreTrainedTokenizerFast
  template = os.path.join(os.path.dirname(__file__), "..", "data", "fixtures",
                          "llama31_chat_template.jinja")
  ref = PreTrainedTokenizerFast(tokenizer_file=tokenizer_path, bos_token="<|begin_of_text|>")
  with open(template) as f:
    ref.chat_template = f.read()
  messages = [{"role": "system", "content": "Answer briefly."},
              {"role": "user", "content": "What is the special magic number?"}]
  expected = ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
  expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
  assert gen.chat_prompt(tokenizer, messages) == expected
  assert gen.stop_ids(tokenizer) == [tokenizer.token_id("<|eot_id|>"),
                                     tokenizer.token_id("<|end_of_text|>")]


def test_bad_arguments_are_named(make_hf_llama):
  _, path = make_hf_llama()
  model = gen.CachedModel(ultralong_jax.from_pretrained(path))
  with pytest.raises(ValueError, match="max_new_tokens"):
    model.generate([[1, 2]], max_new_tokens=0)
  with pytest.raises(ValueError, match="top_p"):
    model.generate([[1, 2]], max_new_tokens=2, top_p=0.0)
  with pytest.raises(ValueError, match="loop"):
    model.generate([[1, 2]], max_new_tokens=2, loop="python")
  with pytest.raises(ValueError, match="at least one token"):
    model.generate([[1, 2], []], max_new_tokens=2)
