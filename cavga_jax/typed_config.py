"""A run's typed settings: one frozen dataclass per config section.

The programs (``train_lib``, ``eval_lib``, ``predict_lib``, ...) read the
``ml_collections.ConfigDict`` once, with ``from_config``, into a
``RunSettings``, validate it once (``config_checks.check``) and pass the
sections down; no module below them reads a ConfigDict.

The dataclass defaults below are the library's one default per field:
``configs/default.py`` is the documented run configuration and holds the
same values (``tests/test_settings.py`` checks every field of it against
these dataclasses). A field without a default is required: a run must give
it (``from_config`` reports 'config.<field> is missing').

Adding a config field:
  1. add it, with its comment, to ``configs/default.py`` (the VAE's to
     ``configs/dsprites.py``);
  2. add it with the same default to its section's dataclass below
     (the ``Vae*Settings`` for the fields of ``task='vae'``);
  3. validate it in ``config_checks``; say in ``workdirs.MAY_DIFFER`` if a
     rerun of a workdir may change it (otherwise a change stops the rerun).
``tests/test_settings.py`` fails until steps 1 and 2 agree.

The fields of ``data.synthetic`` are ``SynthesisSettings``'s
(``DataSettings.synthetic`` is None when its ``fraction`` is 0).

The VAE experiments (``task='vae'``, ``vae_lib``, ``vae_eval_lib``) have
their own sections (``VaeRunSettings``).

Over 400 lines: every config section's dataclass is here, the synthetic
anomalies' included, so that one module holds the one default of each field
and the foundation imports no floor above it (``training.synthesis`` reads
``SynthesisSettings`` from here).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from cavga_jax.errors import CavgaError

_frozen = dataclasses.dataclass(frozen=True, kw_only=True)

# The synthetic anomalies of ``config.data.synthetic``
# (``training.synthesis`` makes them).
MASK_KINDS = ('perlin', 'polygon', 'scratch')
FILL_KINDS = ('other_image', 'cutpaste', 'texture', 'shift')
# How the VAE's reconstruction, KL and adversarial losses treat synthetic
# images (see ``SynthesisSettings.reconstruction``).
RECONSTRUCTION_TARGETS = ('clean', 'normal_only')


@dataclasses.dataclass(frozen=True)
class SynthesisSettings:
  """What ``synthesize`` makes (``config.data.synthetic``; hashable).

  Attributes:
    fraction: share of each batch made synthetic, in (0, 1]; the first
      ``num_synthetic(B)`` images of a batch (batches are shuffled).
    masks: mask kinds (``MASK_KINDS``) drawn uniformly.
    fills: fill kinds (``FILL_KINDS``) drawn uniformly.
    min_area, max_area: the mask's share of the image, log-uniform.
    min_opacity, max_opacity: blending opacity, uniform, min > 0.
    reconstruction: 'clean' (the VAE reconstructs the *clean* image from the
      synthetic one, DRAEM's reconstructive objective: it learns to remove
      what does not belong; the discriminator's real images are the clean
      ones) or 'normal_only' (reconstruction, KL and adversarial losses skip
      the synthetic images, the VAE never sees them as targets).
  """
  fraction: float = 0.5
  masks: tuple[str, ...] = MASK_KINDS
  fills: tuple[str, ...] = FILL_KINDS
  min_area: float = 0.005
  max_area: float = 0.1
  min_opacity: float = 0.5
  max_opacity: float = 1.0
  reconstruction: str = 'clean'

  def __post_init__(self):
    problems = []
    if not 0.0 < self.fraction <= 1.0:
      problems.append(f'fraction={self.fraction!r} must be in (0, 1]')
    for field, kinds, known in (('masks', self.masks, MASK_KINDS),
                                ('fills', self.fills, FILL_KINDS)):
      if not kinds or any(k not in known for k in kinds):
        problems.append(f'{field}={tuple(kinds)!r} must be a non-empty '
                        f'tuple of {", ".join(map(repr, known))}')
    if not 0.0 < self.min_area <= self.max_area < 1.0:
      problems.append(f'min_area={self.min_area!r}, max_area='
                      f'{self.max_area!r} need 0 < min_area <= max_area < 1')
    if not 0.0 < self.min_opacity <= self.max_opacity <= 1.0:
      problems.append(f'min_opacity={self.min_opacity!r}, max_opacity='
                      f'{self.max_opacity!r} need 0 < min <= max <= 1')
    if self.reconstruction not in RECONSTRUCTION_TARGETS:
      problems.append(f'reconstruction={self.reconstruction!r} must be one '
                      f'of {", ".join(map(repr, RECONSTRUCTION_TARGETS))}')
    if problems:
      raise ValueError('; '.join(problems))

  def num_synthetic(self, batch_size: int) -> int:
    """Synthetic images in a batch of ``batch_size`` (at least 1)."""
    return min(batch_size, max(1, round(self.fraction * batch_size)))


def synthesis_settings_from_fields(fields) -> SynthesisSettings | None:
  """``SynthesisSettings`` from a mapping (``config.data.synthetic``).

  Returns None when the mapping is empty or its ``fraction`` is 0 (no
  synthesis). Raises ValueError for an unknown field or a bad value.
  """
  if not fields or not fields.get('fraction', 0.0):
    return None
  known = {f.name for f in dataclasses.fields(SynthesisSettings)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f'unknown fields {unknown} (known: {sorted(known)})')
  return SynthesisSettings(
      **{name: _plain(value) for name, value in fields.items()})


@_frozen
class DataSettings:
  """``config.data``: the dataset, its image size and how it is split."""
  image_size: int
  name: str = 'generated'
  root: str = ''
  category: str = 'textures'
  channels: int = 3
  num_workers: int = 8
  num_train: int = 200
  num_test_good: int = 30
  num_test_per_defect: int = 20
  # None: no synthetic anomalies (config.data.synthetic.fraction 0).
  synthetic: SynthesisSettings | None = None
  # Not in configs/default.py: configs/mvtec_weak.py, the one-class and
  # TFDS configs, or a fixed generated dataset.
  weak_anomalies_per_batch: int = 0
  weak_fraction: float = 0.01
  weak_min_per_defect: int = 1
  weak_seed: int = 0
  generated_seed: int | None = None  # None: config.seed
  normal_class: int = 0
  download: bool = True


@_frozen
class ModelSettings:
  """``config.model``: the CAVGA networks."""
  variant: str
  latent: str
  latent_channels: int
  supervision: str = 'unsupervised'
  latent_dim: int = 512
  encoder_widths: tuple[int, ...] = (32, 64, 128, 256)
  decoder_widths: tuple[int, ...] = (256, 128, 64, 32)
  discriminator_widths: tuple[int, ...] = (32, 64, 128, 256)
  pretrained: str = ''
  input_norm: str = 'none'
  compute_dtype: str = 'float32'
  conv_impl: str = 'auto'
  attention_score: str = 'sum'
  attention_stage: int = 4  # models.NUM_ENCODER_STAGES
  attention_norm: str = 'max'


@_frozen
class OptimizerSettings:
  """``config.optimizer``: Adam, its schedule and clipping."""
  learning_rate: float
  b1: float
  b2: float
  schedule: str = 'constant'
  warmup_steps: int = 0
  grad_clip_norm: float = 0.0


@_frozen
class TrainSettings:
  """``config.train``: length, batches, logging and checkpoints."""
  num_steps: int
  batch_size: int
  log_every: int
  checkpoint_every: int
  keep_checkpoints: int = 3
  prefetch: int = 2
  nonfinite: str = 'stop'
  max_consecutive_skips: int = 10
  eval_every: int = 0


@_frozen
class EvalSettings:
  """``config.eval``: the headline map and the settings of every map."""
  batch_size: int
  num_panels: int
  map: str = 'feature_gaussian'
  maps: str = 'all'
  residual_sigma: float | None = None  # anomaly_maps.RELATIVE_SIGMA * size
  ssim_window: int = 11
  ssim_scale: float = 1.0
  calibrate: bool = True
  feature_stages: tuple[int, ...] = (1, 2)
  feature_dims: int = 100
  feature_grid_divisor: int = 4
  feature_shrinkage: float = 0.1
  feature_weights: str = 'evaluated'
  knn_stages: tuple[int, ...] = (2, 3)
  knn_grid_divisor: int = 8
  knn_bank_size: int = 4096
  knn_chunk: int = 4096
  threshold_holdout: float = 0.1
  threshold_quantile: float = 0.999


@_frozen
class DetectorSettings:
  """``config.detector``: the trained detector (``detector``,
  ``training.detector_training``); ``num_steps`` 0 trains none."""
  num_steps: int = 0
  batch_size: int = 4096
  hidden: int = 1024
  aggregate: int = 3
  noise_std: float = 0.25
  margin: float = 0.5
  learning_rate: float = 2e-4
  adaptor_learning_rate: float = 1e-4
  weight_decay: float = 1e-5
  validate_every: int = 0
  checkpoint_every: int = 500
  log_every: int = 100


@_frozen
class RunSettings:
  """A CAVGA run's whole configuration, typed (``from_config``)."""
  seed: int
  loss_weights: Mapping[str, float]
  data: DataSettings
  model: ModelSettings
  optimizer: OptimizerSettings
  train: TrainSettings
  eval: EvalSettings
  detector: DetectorSettings = DetectorSettings()
  task: str = 'cavga'


@_frozen
class VaeDataSettings(DataSettings):
  """``config.data`` of ``task='vae'``: also the rendered sprites' grid."""
  scales: int = 6
  orientations: int = 40
  positions: int = 32


@_frozen
class VaeModelSettings:
  """``config.model`` of ``task='vae'``: the ConvVAE (``build_vae``)."""

  encoder_widths: tuple[int, ...]
  hidden: int
  latent_dim: int
  conv_impl: str = 'auto'


@_frozen
class VaeLossSettings:
  """``config.loss`` of ``task='vae'``: which L_AD (``losses.AD_VARIANTS``)."""
  ad_variant: str = 'paper'


@_frozen
class VaeEvalSettings:
  """``config.eval`` of ``task='vae'``."""
  batch_size: int
  num_panels: int
  map: str = 'mean'
  metric_seed: int = 0
  # The disentanglement metrics' sample sizes: required with the sprites
  # datasets (``VAE_REQUIRED``, checked by ``config_checks``), unread else.
  factor_vae_num_train: int | None = None
  factor_vae_num_eval: int | None = None
  factor_vae_num_variance: int | None = None
  mig_num_samples: int | None = None
  num_loss_samples: int | None = None
  # The one-class explanations (configs/explain_mnist.py).
  explain_class: int | None = None
  pseudo_mask_support: float | None = None


@_frozen
class VaeRunSettings:
  """A Liu et al. VAE run's whole configuration (``task='vae'``)."""
  seed: int
  loss_weights: Mapping[str, float]
  data: VaeDataSettings
  model: VaeModelSettings
  loss: VaeLossSettings
  optimizer: OptimizerSettings
  train: TrainSettings
  eval: VaeEvalSettings
  task: str = 'vae'


# Section name -> its dataclass, per task.
SECTIONS = {
    'data': DataSettings, 'model': ModelSettings,
    'optimizer': OptimizerSettings, 'train': TrainSettings,
    'eval': EvalSettings, 'detector': DetectorSettings
}
VAE_SECTIONS = {
    'data': VaeDataSettings, 'model': VaeModelSettings, 'loss': VaeLossSettings,
    'optimizer': OptimizerSettings, 'train': TrainSettings,
    'eval': VaeEvalSettings
}
_TOP_DEFAULTS = {'task': 'cavga'}


def _has_dataclass_default(field: dataclasses.Field) -> bool:
  return (field.default is not dataclasses.MISSING
          or field.default_factory is not dataclasses.MISSING)


def _dataclass_default(field: dataclasses.Field) -> Any:
  if field.default is not dataclasses.MISSING:
    return field.default
  return field.default_factory()


def _fields_table(
    sections: dict[str, type]) -> tuple[dict[str, Any], frozenset[str]]:
  """(dotted field -> default, required fields) of a task's sections."""
  defaults, required = dict(_TOP_DEFAULTS), {'seed', 'loss_weights'}
  for section, cls in sections.items():
    for field in dataclasses.fields(cls):
      path = f'{section}.{field.name}'
      if field.name == 'synthetic':
        defaults['data.synthetic.fraction'] = 0.0
      elif _has_dataclass_default(field):
        defaults[path] = _dataclass_default(field)
      else:
        required.add(path)
  return defaults, frozenset(required)


# The tables of the dataclasses above, for the code that compares or
# validates fields by name (workdirs, config_checks, the tests).
DEFAULTS, REQUIRED = _fields_table(SECTIONS)

# config.task='vae' (configs/dsprites.py): where its defaults differ from
# DEFAULTS or are its own (None: read only by some datasets, no default).
VAE_DEFAULTS: dict[str, Any] = {
    field: value
    for field, value in _fields_table(VAE_SECTIONS)[0].items()
    if value is not None and DEFAULTS.get(field, None) != value
}

VAE_REQUIRED = frozenset({
    'data.name',
    'model.encoder_widths',
    'model.hidden',
    'model.latent_dim',
    'eval.factor_vae_num_train',
    'eval.factor_vae_num_eval',
    'eval.factor_vae_num_variance',
    'eval.mig_num_samples',
    'eval.num_loss_samples',
})


def _table(task: str) -> dict[str, Any]:
  if task == 'vae':
    return {**DEFAULTS, **VAE_DEFAULTS}
  return DEFAULTS


def has_default(field: str, task: str = 'cavga') -> bool:
  """Whether the library has a default for ``field`` (dotted path)."""
  required = REQUIRED | (VAE_REQUIRED if task == 'vae' else frozenset())
  return field in _table(task) and field not in required


def default(field: str, task: str = 'cavga') -> Any:
  """The library's default of ``field`` ('section.name') for ``task``.

  Raises:
    KeyError: a field without a default (a programming error: add it to
      its dataclass or read it as required).
  """
  if not has_default(field, task):
    raise KeyError(f'config.{field} has no library default')
  return _table(task)[field]


_ABSENT = object()


def _lookup(node: Any, name: str) -> Any:
  try:
    return node[name]
  except (KeyError, AttributeError, TypeError):
    return _ABSENT


def _plain(value: Any) -> Any:
  """Lists (JSON) as tuples, so settings compare and hash like the config."""
  return tuple(value) if isinstance(value, list) else value


def _synthetic(fields: Any) -> SynthesisSettings | None:
  """``config.data.synthetic`` as ``SynthesisSettings`` (None: off)."""
  if fields is _ABSENT or fields is None:
    return None
  if not hasattr(fields, 'items'):
    raise CavgaError(f'config.data.synthetic={fields!r} must be a ConfigDict')
  try:
    return synthesis_settings_from_fields(dict(fields.items()))
  except (ValueError, TypeError) as e:
    raise CavgaError(f'config.data.synthetic: {e}') from None


def section(config: Any, section: str) -> Any:
  """One typed section (``SECTIONS``) of a config, e.g. ``'model'``: for
  code that needs only it (``train_lib.build_models``)."""
  return _section(config, section, SECTIONS[section])


def _section(config: Any, section: str, cls: type) -> Any:
  node = _lookup(config, section)
  values = {}
  for field in dataclasses.fields(cls):
    value = _ABSENT if node is _ABSENT else _lookup(node, field.name)
    if field.name == 'synthetic' and issubclass(cls, DataSettings):
      values[field.name] = _synthetic(value)
    elif value is not _ABSENT:
      values[field.name] = _plain(value)
    elif not _has_dataclass_default(field):
      raise CavgaError(f'config.{section}.{field.name} is missing')
  return cls(**values)


def from_config(config: Any) -> RunSettings | VaeRunSettings:
  """The typed settings of a run config (ConfigDict or mappings).

  ``RunSettings`` for ``task='cavga'`` (the default), ``VaeRunSettings``
  for ``'vae'``. Absent fields take their dataclass defaults; values are
  taken as given (lists as tuples) and validated by ``config_checks``.

  Raises:
    CavgaError: a required field is absent, or ``data.synthetic`` has an
      unknown field or a bad value (one line).
  """
  task = _lookup(config, 'task')
  task = _TOP_DEFAULTS['task'] if task is _ABSENT else task
  values = {}
  for name in ('seed', 'loss_weights'):
    value = _lookup(config, name)
    if value is _ABSENT:
      raise CavgaError(f'config.{name} is missing')
    values[name] = value
  weights = values['loss_weights']
  if hasattr(weights, 'items'):
    values['loss_weights'] = {k: _plain(v) for k, v in weights.items()}
  if task != 'vae':
    return RunSettings(
        task=task,
        **values,
        **{name: _section(config, name, cls) for name, cls in SECTIONS.items()})
  if _lookup(_lookup(config, 'data'), 'name') is _ABSENT:
    raise CavgaError('config.data.name is missing')
  return VaeRunSettings(
      task=task,
      **values,
      **{
          name: _section(config, name, cls)
          for name, cls in VAE_SECTIONS.items()
      })
