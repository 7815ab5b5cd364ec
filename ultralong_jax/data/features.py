"""Packed rows of L + 1 tokens -> the model's features (pure numpy).

Every pipeline emits, per row, arrays of length L = seq_len:
  inputs      int32    row[:-1]
  targets     int32    row[1:]  (next-token targets)
  positions   int32    RoPE positions of the inputs
  segment_ids int32    attention segments of the inputs; 0 = padding; tokens attend only
                       within equal non-zero ids (causally)
  loss_mask   float32  1.0 where the target is trained on, else 0.0 (multiply into the
                       per-token loss; float so it also serves as a weight)
Packers (Grain's concat-then-split and first/best-fit) number the pieces of a row from 1 and
restart positions per piece, padding with segment 0; `row_segment_ids` / `row_positions` below
are their outputs for the L + 1 tokens of a row.
"""

from __future__ import annotations

import numpy as np

FEATURES = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


def pretrain_features(row: np.ndarray, row_segment_ids: np.ndarray, row_positions: np.ndarray,
                      document_mask: bool) -> dict[str, np.ndarray]:
  """Stage-1 features of one row, shapes [L + 1] -> [L].

  Cross-document attention (document_mask=False, the paper's setting): the row is one segment
  with positions 0..L-1, and every real target is trained on, including the first token of a
  document predicted from the separator before it. Document masking: segments and positions
  restart per document, and a target in another document than its input is not trained on
  (the model cannot see that document).
  """
  seq_len = len(row) - 1
  real = row_segment_ids > 0
  if document_mask:
    segment_ids = row_segment_ids[:-1]
    positions = row_positions[:-1]
    loss = real[1:] & (row_segment_ids[1:] == row_segment_ids[:-1])
  else:
    segment_ids = real[:-1].astype(np.int32)
    positions = np.arange(seq_len, dtype=np.int32)
    loss = real[1:] & real[:-1]
  return {"inputs": row[:-1].astype(np.int32), "targets": row[1:].astype(np.int32),
          "positions": positions.astype(np.int32), "segment_ids": segment_ids.astype(np.int32),
          "loss_mask": loss.astype(np.float32)}


def sft_features(row: np.ndarray, row_trainable: np.ndarray, row_segment_ids: np.ndarray,
                 row_positions: np.ndarray) -> dict[str, np.ndarray]:
  """Stage-2 features of one packed row, shapes [L + 1] -> [L].

  Examples never attend to each other (segments and positions restart per example); the loss
  covers targets that are assistant tokens (`row_trainable`) of the same example as the input.
  """
  same_example = (row_segment_ids[1:] == row_segment_ids[:-1]) & (row_segment_ids[:-1] > 0)
  loss = same_example & (row_trainable[1:] > 0)
  return {"inputs": row[:-1].astype(np.int32), "targets": row[1:].astype(np.int32),
          "positions": row_positions[:-1].astype(np.int32),
          "segment_ids": row_segment_ids[:-1].astype(np.int32),
          "loss_mask": loss.astype(np.float32)}
