"""The generated demo corpus: `repeat` makes documents repeat their own sentences, and changes
nothing when it is 0."""

import random

from ultralong_jax.data import synthetic


def test_repeat_zero_is_plain_filler_and_repeat_reuses_the_documents_sentences():
  assert synthetic.document_filler(random.Random(3), 40) == synthetic.filler(random.Random(3), 40)
  a, b = random.Random(5), random.Random(5)
  assert synthetic.passkey_document(a, 12, repeat=0.0) == synthetic.passkey_document(b, 12)
  text = synthetic.document_filler(random.Random(3), 200, repeat=0.5)
  sentences = [s + "." for s in text.split(". ") if s]
  repeated = sum(s in sentences[:i] for i, s in enumerate(sentences))
  # about half the sentences are repeats (binomial(199, 0.5): 99.5 +- 7), fresh ones may collide
  assert 75 < repeated < 140, repeated


def test_exact_length_documents_have_the_asked_token_count_and_the_evals_needle_spacing(tmp_path):
  import json

  from tokenizers import Tokenizer

  path = synthetic.build_tokenizer(str(tmp_path / "tokenizer.json"))
  tok = Tokenizer.from_file(path)
  docs = synthetic.write_documents(str(tmp_path / "fixed.jsonl"), 200, seed=0, passkey_fraction=0.8,
                                   tokens=127, tokenizer=path)
  texts = [json.loads(line)["text"] for line in open(docs)]
  assert {len(tok.encode(t).ids) for t in texts} == {127}
  with_key = [t for t in texts if synthetic.QUESTION in t]
  assert 120 < len(with_key) < 190  # binomial(200, 0.8)
  for text in with_key[:20]:
    key = text.rsplit(" ", 1)[1].rstrip(".")
    assert f"The pass key is {key}. Remember it." in text.split("\n\n")[1]
    pieces = [tok.decode([i]) for i in tok.encode(text).ids]
    at = pieces.index(" Remember")
    # the eval splices " The pass key is K. Remember it. " as tokens: its last space stays alone
    assert pieces[at + 1:at + 4] in ([" it", ".", " "], [" it", ".", " \n\n"], [" it", ".\n\n"]), \
        pieces[at:at + 5]
  ranged = synthetic.write_documents(str(tmp_path / "ranged.jsonl"), 300, seed=1,
                                     passkey_fraction=1.0, tokens=(60, 127), tokenizer=path)
  lengths = [len(tok.encode(json.loads(line)["text"]).ids) for line in open(ranged)]
  assert min(lengths) >= 60 and max(lengths) <= 127 and len(set(lengths)) > 40


def test_recalls_repeat_the_question_and_answer_after_the_key_and_too_short_is_refused(tmp_path):
  import json

  import pytest
  from tokenizers import Tokenizer

  path = synthetic.build_tokenizer(str(tmp_path / "tokenizer.json"))
  tok = Tokenizer.from_file(path)
  docs = synthetic.write_documents(str(tmp_path / "recalls.jsonl"), 50, seed=0,
                                   passkey_fraction=1.0, tokens=(90, 127), tokenizer=path,
                                   recalls=2)
  for line in open(docs):
    text = json.loads(line)["text"]
    key = text.rsplit(" ", 1)[1].rstrip(".")
    assert 90 <= len(tok.encode(text).ids) <= 127
    # the needle, two recalls after it, the final answer
    assert text.count(f"The pass key is {key}.") == 4
    assert text.index(f"The pass key is {key}. Remember it.") < text.index(
        f"{synthetic.QUESTION} The pass key is {key}.")
  exact = synthetic.ExactLength(path, 127)
  with pytest.raises(ValueError, match="needs at least .* tokens, asked for 50"):
    exact.document(random.Random(0), True, tokens=50, recalls=1)
