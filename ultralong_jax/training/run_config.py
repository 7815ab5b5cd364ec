"""The training config resolved once: typed, frozen pieces that the modules below the entry point
take, each only the piece it needs.

  run = config.resolve(c, jax.device_count(), jax.process_count())   # validates, then builds
  run.model        modeling.config.LlamaConfig (preset or checkpoint, RoPE and numerics applied)
  run.mesh         MeshConfig: axis sizes resolved for the devices (no -1 left)
  run.attention    AttentionConfig     run.optim   OptimConfig     run.train  TrainConfig
  run.checkpoint   CheckpointConfig    run.init    InitConfig      run.data   data piece
  run.preflight, run.export, run.metrics; run.raw: the ConfigDict itself, only to be saved (the
  config JSON next to checkpoints); run.data is data.config's PretrainData / SftData

The fields carry no defaults: they are read from the ConfigDict by name, so
training.config.base_config (and data.config.default_data_config) stay the one place a default
lives, and a config missing a key fails with the full key's name before anything runs.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import ml_collections

from ultralong_jax.data import config as data_config
from ultralong_jax.data.config import PretrainData, SftData
from ultralong_jax.modeling.config import LlamaConfig
from ultralong_jax.parallel.mesh import MESH_AXES, resolve_axis_sizes


def check_keys_of(c: ml_collections.ConfigDict, section: str, names) -> None:
  """Raises ValueError naming the first of c.<section>'s keys `names` lacks, or has beyond."""
  if section not in c:
    raise ValueError(f"the config has no section {section!r}; build it on "
                     "ultralong_jax.training.config.base_config(stage), as configs/*.py do.")
  for name in names:
    if name not in c[section]:
      raise ValueError(f"the config has no key {section}.{name}; build it on "
                       "ultralong_jax.training.config.base_config(stage), as configs/*.py do, "
                       "which sets every key.")
  unknown = sorted(set(c[section].keys()) - set(names))
  if unknown:
    raise ValueError(f"{section}.{unknown[0]} is not a config key; {section} takes "
                     f"{', '.join(names)} (training.config.base_config documents each).")


def _read(cls, c: ml_collections.ConfigDict, section: str):
  """`cls` filled from c.<section> by field name (every key present, none beyond)."""
  names = [field.name for field in dataclasses.fields(cls)]
  check_keys_of(c, section, names)
  return cls(**{name: c[section][name] for name in names})


@dataclasses.dataclass(frozen=True)
class _Section:
  SECTION: ClassVar[str]

  @classmethod
  def of(cls, c: ml_collections.ConfigDict):
    """This piece of the ConfigDict `c` (the whole config)."""
    return _read(cls, c, cls.SECTION)


@dataclasses.dataclass(frozen=True)
class InitConfig(_Section):
  """init.*: where the weights come from (random | hf | checkpoint, and the directory)."""
  SECTION: ClassVar[str] = "init"
  mode: str
  path: str


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """mesh.*: the axis sizes with the -1 resolved for the device count."""
  data: int
  fsdp: int
  sequence: int
  tensor: int

  @classmethod
  def of(cls, c: ml_collections.ConfigDict, num_devices: int) -> MeshConfig:
    """mesh.{data,fsdp,sequence,tensor} of `c` on `num_devices` (mesh.resolve_axis_sizes)."""
    check_keys_of(c, "mesh", MESH_AXES)
    sizes = resolve_axis_sizes({a: c.mesh[a] for a in MESH_AXES}, num_devices)
    return cls(**sizes)

  @property
  def sizes(self) -> dict[str, int]:
    return {a: getattr(self, a) for a in MESH_AXES}

  @property
  def num_devices(self) -> int:
    return self.data * self.fsdp * self.sequence * self.tensor

  @property
  def batch_shards(self) -> int:
    """Ways the batch is split: data x fsdp."""
    return self.data * self.fsdp


@dataclasses.dataclass(frozen=True)
class AttentionConfig(_Section):
  """attention.*: sequence-parallel strategy, batch layout, block kernel and its tile."""
  SECTION: ClassVar[str] = "attention"
  strategy: str
  layout: str
  kernel: str
  chunk_size: int


@dataclasses.dataclass(frozen=True)
class OptimConfig(_Section):
  """optim.*: AdamW, its learning-rate schedule, clipping, state dtype (training/optimizer.py)."""
  SECTION: ClassVar[str] = "optim"
  learning_rate: float
  warmup_steps: int
  schedule: str
  final_lr_fraction: float
  cooldown_steps: int
  b1: float
  b2: float
  eps: float
  weight_decay: float
  grad_clip_norm: float
  state_dtype: str


@dataclasses.dataclass(frozen=True)
class TrainConfig(_Section):
  """train.*: steps, microbatches, loss, seed, logging, the non-finite policy, the watchdog."""
  SECTION: ClassVar[str] = "train"
  steps: int
  microbatches: int
  loss_chunk_size: int
  z_loss_weight: float
  seed: int
  log_every: int
  nonfinite: str
  max_nonfinite_steps: int
  run_name: str
  hang_timeout_s: float
  hang_startup_s: float


@dataclasses.dataclass(frozen=True)
class CheckpointConfig(_Section):
  """checkpoint.*: cadence, retention, async writes, corruption fallback, write retries."""
  SECTION: ClassVar[str] = "checkpoint"
  every_steps: int
  keep: int
  async_save: bool
  fallback_on_corrupt: bool
  retries: int
  retry_backoff_s: float


@dataclasses.dataclass(frozen=True)
class PreflightConfig(_Section):
  """preflight.*: which checks run before compiling."""
  SECTION: ClassVar[str] = "preflight"
  check_paths: bool
  check_memory: bool


@dataclasses.dataclass(frozen=True)
class ExportConfig(_Section):
  """export.*: the Hugging Face directory written at the end, and its dtype."""
  SECTION: ClassVar[str] = "export"
  hf: bool
  dtype: str


@dataclasses.dataclass(frozen=True)
class MetricsConfig(_Section):
  """metrics.*: the per-device peak for MFU (0 = from the device table)."""
  SECTION: ClassVar[str] = "metrics"
  peak_tflops: float


PIECES = (InitConfig, AttentionConfig, OptimConfig, TrainConfig, CheckpointConfig,
          PreflightConfig, ExportConfig, MetricsConfig)


def check_keys(c: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first key a piece needs that `c` lacks."""
  check_keys_of(c, "mesh", MESH_AXES)
  for piece in PIECES:
    piece.of(c)


def run_name(stage: int, train: TrainConfig) -> str:
  """The run's label on progress bars and plots: train.run_name, else "stage N"."""
  return train.run_name or f"stage {stage}"


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """A validated training config, one typed piece per section (see the module docstring)."""
  stage: int
  model: LlamaConfig
  init: InitConfig
  mesh: MeshConfig
  attention: AttentionConfig
  data: PretrainData | SftData
  optim: OptimConfig
  train: TrainConfig
  checkpoint: CheckpointConfig
  preflight: PreflightConfig
  export: ExportConfig
  metrics: MetricsConfig
  raw: ml_collections.ConfigDict = dataclasses.field(repr=False, compare=False)

  @classmethod
  def of(cls, c: ml_collections.ConfigDict, model: LlamaConfig, num_devices: int) -> RunConfig:
    """The pieces of `c` (validated by training.config.validate into `model`)."""
    return cls(stage=c.stage, model=model, mesh=MeshConfig.of(c, num_devices),
               data=data_config.data_piece(c.data),
               raw=c, **{piece.SECTION: piece.of(c) for piece in PIECES})

  @property
  def uses_segment_ids(self) -> bool:
    """Whether attention is restricted by segment ids (the data piece says: stage 2's packed
    chats always, stage 1's documents with data.document_mask)."""
    return self.data.uses_segment_ids

  @property
  def run_name(self) -> str:
    return run_name(self.stage, self.train)

  @property
  def seq_len(self) -> int:
    return self.data.seq_len

  @property
  def global_batch_size(self) -> int:
    return self.data.global_batch_size
