"""Data pipelines of the UltraLong recipe (Grain): tokenizers, sources, stage-1 and stage-2 packing.

  config.py          default_data_config(stage) / validate_data_config / resolve_data_config:
                     the `config.data` section and its typed piece (PretrainData, SftData)
  tokenizer.py       SentencePiece and Hugging Face tokenizer.json behind one interface
  readers.py         streaming JSONL(.gz) / Parquet / ArrayRecord / TFDS record readers
  prepare.py         `python -m ultralong_jax.data.prepare`: tokenize once into ArrayRecord shards
  shards.py          the prepared-corpus format
  resample.py        length-based resampling plan per domain
  pretrain.py        stage-1 pipeline (build_pretrain_pipeline)
  chat_template.py   chat templates (Llama 3.1, ChatML, Mistral, Llama 2) to ids + assistant mask
  jsonl_source.py    random-access JSONL for Grain
  tfds_source.py     TFDS datasets (ArrayRecord) for Grain without TensorFlow
  sft.py             stage-2 pipeline (build_sft_pipeline)
  features.py        packed rows -> inputs/targets/positions/segment_ids/loss_mask
  stats.py           counters kept in Grain iterator state
  bad_input.py       bad-input kinds, strict mode
  pipeline.py        the Pipeline handle both builders return
Nothing here imports model code; see docs/data.md.
"""
