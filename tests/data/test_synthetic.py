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
