"""Perplexity by position against the plain full forward, and its bucketing and outputs."""

import json

import jax
import numpy as np
import pytest

from ultralong_jax.evaluation import generate as gen, haystack as hay, perplexity
from ultralong_jax.parallel import mesh as mesh_lib


def _reference_nll(model, ids):
  """Full forward (no cache, one device), log-softmax of the next token."""
  logits = np.asarray(model(jax.numpy.asarray(ids[:, :-1])), np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  return -np.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]


# 3 documents on data=2: the batch is padded to 4 rows and the padding row's losses dropped.
@pytest.mark.parametrize("mesh_sizes,documents", [(None, 2), ({"sequence": 4, "tensor": 2}, 2),
                                                  ({"data": 2, "sequence": 4}, 3)])
def test_token_nll_matches_full_forward(tiny_model, mesh_sizes, documents):
  # length 50: 2 chunks of 32, padded tail
  ids = np.random.RandomState(0).randint(0, 512, (documents, 51))
  mesh = mesh_lib.make_mesh(mesh_sizes) if mesh_sizes else None
  runner = gen.CachedModel(tiny_model, mesh, kv_block=16)
  nll = perplexity.token_nll(runner, ids.tolist(), 50, chunk=32)
  assert nll.shape == (documents, 50)
  np.testing.assert_allclose(nll, _reference_nll(tiny_model, ids), rtol=1e-5, atol=1e-5)


def test_buckets_hand_computed():
  np.testing.assert_array_equal(perplexity.bucket_edges(16, 5), [0, 1, 2, 4, 8, 16])
  np.testing.assert_array_equal(perplexity.bucket_edges(10, 2, log=False), [0, 5, 10])
  nll = np.array([[1.0, 2.0, 3.0, 4.0], [3.0, 2.0, 1.0, 0.0]])
  b = perplexity.bucket_means(nll, np.array([0, 1, 4]))
  assert [x["loss"] for x in b] == [2.0, 2.0] and [x["tokens"] for x in b] == [2, 6]
  assert b[0]["perplexity"] == pytest.approx(np.exp(2.0))


def test_outputs_and_short_documents(tiny_model, tokenizer, tmp_path):
  res = perplexity.run_perplexity(tiny_model, tokenizer, length=64, out_dir=str(tmp_path),
                                  num_buckets=4, chunk=32)
  data = json.load(open(res["paths"]["json"]))
  assert data["length"] == 64 and sum(b["tokens"] for b in data["buckets"]) == 2 * 64
  assert [b["start"] for b in data["buckets"]][0] == 0 and data["buckets"][-1]["end"] == 64
  # A random model's loss sits near log(vocab): the pipeline works, the model knows nothing.
  assert abs(data["mean_loss"] - np.log(512)) < 1.0
  with open(res["paths"]["plot"], "rb") as f:
    assert f.read(4) == b"\x89PNG"
  with pytest.raises(ValueError, match="fewer than length"):
    perplexity.run_perplexity(tiny_model, tokenizer, length=64, out_dir=str(tmp_path),
                              texts=[hay.filler_text(10)])


def test_cli(tiny_model_dir, tokenizer_path, tmp_path, flag_error):
  doc = tmp_path / "doc.txt"
  doc.write_text(hay.filler_text(200, seed=5))
  res = perplexity.main(["--ckpt", tiny_model_dir, "--tokenizer", tokenizer_path, "--out",
                         str(tmp_path / "o"), "--length", "40", "--documents", str(doc),
                         "--dtype", "float32", "--buckets", "3", "--prefill-chunk", "16"])
  assert res["documents"] == 1 and (tmp_path / "o" / "perplexity.png").exists()
  base = ["--ckpt", tiny_model_dir, "--tokenizer", tokenizer_path, "--out", "x"]
  missing = str(tmp_path / "missing.txt")
  assert flag_error(perplexity.main, base + ["--length", "40", "--documents", missing]
                    ).startswith("--documents")
  assert flag_error(perplexity.main, base + ["--length", "4000", "--documents", str(doc)]
                    ).startswith("--documents")  # shorter than --length + 1 tokens
  assert flag_error(perplexity.main, base + ["--length", "40", "--mesh", "sequence=3,x=1"]
                    ).startswith("--mesh")
