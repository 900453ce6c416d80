"""Validation of a run configuration before anything expensive happens.

``check_config(config)`` is called by every program (training, evaluation,
the scorer) before data is loaded or a program is compiled: it reads the
config into typed settings (``typed_config.from_config``), checks them and
returns them, so it is the one place a config field is validated and the
config is read once. It checks by field and shape arithmetic alone (it
builds no network: ``cavga.resolved_widths``, ``conv_vae.check_image_size``)
and imports only the modules that own the constants it checks (models,
layers, losses, anomaly maps, data, the VAE, the non-finite policy), never
a training or evaluation module. Each problem raises
``CavgaError`` with one line naming the field, its value and what is
expected, instead of a ``ZeroDivisionError`` or an XLA error many seconds
later.

The VAE experiments (``config.task='vae'``) are checked against their own
fields. Unknown fields and values of the wrong type given on the command line are
already rejected by ``ml_collections`` (configs are locked and typed); this
module checks values and ranges, and types for configs built in Python.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import ml_collections

from cavga_jax import data
from cavga_jax import nonfinite
from cavga_jax import typed_config
from cavga_jax.errors import CavgaError
from cavga_jax.evaluation import registry
from cavga_jax.maps import feature_gaussian
from cavga_jax.maps import feature_knn
from cavga_jax.models import cavga
from cavga_jax.models import layers
from cavga_jax.training import losses
from cavga_jax.vae import conv_vae
from cavga_jax.weights import pretrained

SCHEDULES = ('constant', 'cosine')
TASKS = ('cavga', 'vae')


def _get(run: Any, field: str) -> Any:
  """The value of ``field`` ('section.name') in typed settings (``run``).

  Raises:
    CavgaError: a field of ``typed_config.VAE_REQUIRED`` that is None (absent
      from the config), e.g. a metric's sample size with the sprites data.
  """
  node = run
  for part in field.split('.'):
    node = node[part] if isinstance(node, dict) else getattr(node, part)
  if node is None and field in typed_config.VAE_REQUIRED:
    raise CavgaError(f'config.{field} is missing')
  return node


def _check_int(config, field: str, minimum: int) -> None:
  value = _get(config, field)
  if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
      or value < minimum):
    raise CavgaError(f'config.{field}={value!r} must be an integer >= '
                     f'{minimum}')


def _check_odd_int(config, field: str, minimum: int, why: str = '') -> None:
  """An integer >= ``minimum`` that is odd (a window centred on a pixel or
  cell); ``why`` ends the message."""
  _check_int(config, field, minimum)
  value = _get(config, field)
  if value % 2 == 0:
    raise CavgaError(f'config.{field}={value!r} must be odd{why}')


def _check_number(config,
                  field: str,
                  minimum: float = 0.0,
                  below: float | None = None) -> None:
  value = _get(config, field)
  valid = (
      isinstance(value, numbers.Real) and not isinstance(value, bool)
      and math.isfinite(value) and value >= minimum
      and (below is None or value < below))
  if not valid:
    upper = f' and < {below}' if below is not None else ''
    raise CavgaError(f'config.{field}={value!r} must be a finite number >= '
                     f'{minimum}{upper}')


def _check_choice(config, field: str, choices: tuple[str, ...]) -> None:
  value = _get(config, field)
  if value not in choices:
    raise CavgaError(f'config.{field}={value!r} must be one of '
                     f'{", ".join(repr(c) for c in choices)}')


def check_config(
    config: ml_collections.ConfigDict
) -> typed_config.RunSettings | typed_config.VaeRunSettings:
  """Reads ``config`` into typed settings, checks them and returns them.

  ``config.task='cavga'`` (default, ``configs/default.py``) gives
  ``typed_config.RunSettings``, checked by ``check``; ``'vae'`` (the Liu et al.
  experiments of ``vae_lib``) gives ``typed_config.VaeRunSettings``, checked
  against the VAE's fields (dataset, VAE widths and sizes, attention map,
  metric sample sizes). Absent optional fields take the library's defaults
  (``settings``); absent required ones are reported.

  Args:
    config: a full run configuration.

  Raises:
    CavgaError: naming the field, its value and the expected values.
  """
  task = config.get('task', typed_config.default('task'))
  if task not in TASKS:
    raise CavgaError(f'config.task={task!r} must be one of '
                     f'{", ".join(repr(t) for t in TASKS)}')
  run = typed_config.from_config(config)
  if task == 'vae':
    _check_common(run)
    _check_vae_config(run)
  else:
    check(run)
  return run


def check(run: typed_config.RunSettings) -> None:
  """Raises CavgaError (one line) for the first invalid field of ``run``.

  Checks the fields that training and evaluation read: seed, loss weights,
  optimizer settings, train and eval sizes and intervals, the non-finite
  loss policy; dataset name, image size and channels; model variant,
  latent, supervision, widths, dtype and input normalisation (the
  ``pretrained`` file is not read: evaluation never needs it), by field
  arithmetic alone (no network is built); the maps' settings.

  Raises:
    CavgaError: naming the field, its value and the expected values.
  """
  _check_choice(run, 'task', TASKS)
  _check_common(run)
  _check_cavga_config(run)


def _check_common(config) -> None:
  """The fields both tasks share."""
  _check_int(config, 'seed', 0)
  for name in _get(config, 'loss_weights').keys():
    _check_number(config, f'loss_weights.{name}', 0.0)

  _check_number(config, 'optimizer.learning_rate', 0.0)
  _check_number(config, 'optimizer.b1', 0.0, below=1.0)
  _check_number(config, 'optimizer.b2', 0.0, below=1.0)
  _check_choice(config, 'optimizer.schedule', SCHEDULES)
  _check_int(config, 'optimizer.warmup_steps', 0)
  _check_number(config, 'optimizer.grad_clip_norm', 0.0)

  _check_int(config, 'train.num_steps', 0)
  _check_int(config, 'train.batch_size', 1)
  _check_int(config, 'train.log_every', 1)
  _check_int(config, 'train.checkpoint_every', 1)
  _check_int(config, 'train.keep_checkpoints', 1)
  _check_int(config, 'train.prefetch', 1)
  _check_choice(config, 'train.nonfinite', nonfinite.MODES)
  _check_int(config, 'train.max_consecutive_skips', 1)

  _check_int(config, 'eval.batch_size', 1)
  _check_int(config, 'eval.num_panels', 0)
  _check_int(config, 'data.image_size', 1)
  _check_choice(config, 'data.channels', (1, 3))
  _check_int(config, 'data.num_workers', 0)


def _check_widths(config, field: str) -> None:
  widths = _get(config, field)
  if not isinstance(widths, (tuple, list)) or not all(
      isinstance(w, numbers.Integral) and not isinstance(w, bool) and w > 0
      for w in widths):
    raise CavgaError(f'config.{field}={widths!r} must be a tuple of '
                     'positive integers (or () for the paper\'s widths)')


def _check_cavga_config(config: typed_config.RunSettings) -> None:
  _check_choice(config, 'data.name', data.KNOWN_DATASETS)
  for name in ('encoder_widths', 'decoder_widths', 'discriminator_widths'):
    _check_widths(config, f'model.{name}')
  _check_choice(config, 'model.latent', cavga.LATENTS)
  _check_choice(config, 'model.compute_dtype', cavga.COMPUTE_DTYPES)
  _check_choice(config, 'model.input_norm', cavga.INPUT_NORMS)
  _check_choice(config, 'model.conv_impl', layers.CONV_IMPLS)
  _check_detector(config)
  _check_int(config, 'model.latent_channels', 1)
  _check_int(config, 'model.latent_dim', 1)
  _check_choice(config, 'model.attention_score', cavga.ATTENTION_SCORES)
  _check_int(config, 'model.attention_stage', 1)
  stage = _get(config, 'model.attention_stage')
  if stage > cavga.NUM_ENCODER_STAGES:
    raise CavgaError(f'config.model.attention_stage={stage!r} must be an '
                     f'encoder stage in 1..{cavga.NUM_ENCODER_STAGES} '
                     f'({cavga.NUM_ENCODER_STAGES} = the last feature map)')
  _check_choice(config, 'model.attention_norm', cavga.ATTENTION_NORMS)
  # The variant, supervision, the widths' lengths and the image size's
  # stride, by the model builder's own arithmetic (no network is built).
  cavga.resolved_widths(config.model, config.data.image_size)
  weights = _get(config, 'model.pretrained')
  variant = _get(config, 'model.variant')
  if weights in pretrained.NAMED_WEIGHTS and (pretrained.NAMED_WEIGHTS[weights]
                                              != variant):
    raise CavgaError(
        f'config.model.pretrained={weights!r} needs '
        f"config.model.variant='{pretrained.NAMED_WEIGHTS[weights]}'"
        f', got {variant!r}')
  if (_get(config, 'eval.feature_weights') == 'initial' and not weights):
    raise CavgaError("config.eval.feature_weights='initial' takes the feature "
                     'maps from the ImageNet encoder a run starts from; set '
                     'config.model.pretrained')
  _check_eval_maps(config)
  _check_weak_quota(config)
  _check_synthetic(config)
  _check_loss_terms(config)


def _check_detector(config: typed_config.RunSettings) -> None:
  """The trained detector's fields (``config.detector``, ``detector``)."""
  for field in ('num_steps', 'validate_every'):
    _check_int(config, f'detector.{field}', 0)
  for field in ('batch_size', 'hidden', 'checkpoint_every', 'log_every'):
    _check_int(config, f'detector.{field}', 1)
  for field in ('noise_std', 'margin', 'learning_rate', 'adaptor_learning_rate',
                'weight_decay'):
    _check_number(config, f'detector.{field}', 0.0)
  _check_odd_int(
      config, 'detector.aggregate', 1,
      ' (the side of the neighbourhood each cell is averaged over, centred on '
      'it; 1: none)')


def _check_eval_maps(config: typed_config.RunSettings) -> None:
  """The headline map and the map settings of ``anomaly_maps``."""
  fitted_maps = registry.names('fitted', 'combined')
  _check_choice(config, 'eval.map', registry.headline_names())
  _check_choice(config, 'eval.maps', registry.SCOPES)
  headline = _get(config, 'eval.map')
  calibrate = _get(config, 'eval.calibrate')
  if not isinstance(calibrate, bool):
    raise CavgaError(f'config.eval.calibrate={calibrate!r} must be True or '
                     'False')
  if headline in fitted_maps and not calibrate:
    raise CavgaError(f'config.eval.map={headline!r} needs '
                     'config.eval.calibrate=True (the statistics of the '
                     'normal training images)')
  supervision = _get(config, 'model.supervision')
  if (registry.CLASSIFIER in registry.spec(headline).needs
      and supervision != 'weak'):
    raise CavgaError(f'config.eval.map={headline!r} needs '
                     "config.model.supervision='weak' (a class map of the "
                     f'CAVGA_w classifier), got {supervision!r}')
  if _get(config, 'eval.residual_sigma') is not None:
    _check_number(config, 'eval.residual_sigma', 0.0)
  _check_odd_int(config, 'eval.ssim_window', 3)
  # Below 1/4 a 256 px image shrinks to a few SSIM windows; from 8 on the
  # resized batch outgrows memory at 256 px.
  _check_number(config, 'eval.ssim_scale', 0.25, below=8.0)
  _check_stages(config, 'eval.feature_stages')
  _check_int(config, 'eval.feature_dims', 1)
  _check_int(config, 'eval.feature_grid_divisor', 1)
  _check_number(config, 'eval.feature_shrinkage', 0.0)
  _check_choice(config, 'eval.feature_weights',
                feature_gaussian.FEATURE_WEIGHTS)
  _check_stages(config, 'eval.knn_stages')
  _check_int(config, 'eval.knn_grid_divisor', 1)
  _check_int(config, 'eval.knn_bank_size', 0)
  _check_int(config, 'eval.knn_chunk', 1)
  if (feature_knn.NAME in registry.closure([headline])
      and not _get(config, 'eval.knn_bank_size')):
    raise CavgaError(f'config.eval.map={headline!r} needs '
                     'config.eval.knn_bank_size > 0')
  _check_number(config, 'eval.threshold_holdout', 0.0, below=1.0)
  quantile = _get(config, 'eval.threshold_quantile')
  _check_number(config, 'eval.threshold_quantile', 0.0)
  if quantile > 1:
    raise CavgaError(f'config.eval.threshold_quantile={quantile!r} must be '
                     'in [0, 1]')
  _check_int(config, 'train.eval_every', 0)


def _check_stages(config: typed_config.RunSettings, field: str) -> None:
  """Increasing encoder stages in 1..NUM_ENCODER_STAGES (the feature maps)."""
  stages = _get(config, field)
  if (not isinstance(stages, (tuple, list)) or not stages or any(
      isinstance(s, bool) or not isinstance(s, numbers.Integral)
      for s in stages) or list(stages) != sorted(set(stages))
      or not 1 <= stages[0] <= stages[-1] <= cavga.NUM_ENCODER_STAGES):
    raise CavgaError(f'config.{field}={stages!r} must be increasing encoder '
                     f'stages in 1..{cavga.NUM_ENCODER_STAGES}, e.g. (1, 2)')


def _check_weak_quota(config: typed_config.RunSettings) -> None:
  """CAVGA_w's labelled anomalies per batch (``data.quota_batch_indices``)."""
  field = 'data.weak_anomalies_per_batch'
  _check_int(config, field, 0)
  quota = _get(config, field)
  batch_size = _get(config, 'train.batch_size')
  if quota >= batch_size:
    raise CavgaError(f'config.{field}={quota!r} must be < '
                     f'config.train.batch_size={batch_size!r} (the rest of '
                     'each batch are normal images)')
  supervision = _get(config, 'model.supervision')
  if quota and supervision != 'weak':
    raise CavgaError(f'config.{field}={quota!r} needs '
                     "config.model.supervision='weak' (only CAVGA_w has "
                     f'labelled anomalies), got {supervision!r}; set it to 0')


def _check_synthetic(config: typed_config.RunSettings) -> None:
  """Synthetic anomalies (``config.data.synthetic``, CAVGA_w only; its
  fields are checked by ``typed_config.from_config``)."""
  synthetic = config.data.synthetic
  if synthetic is None:
    return
  supervision = _get(config, 'model.supervision')
  if supervision != 'weak':
    raise CavgaError(
        f'config.data.synthetic.fraction={synthetic.fraction!r} needs '
        "config.model.supervision='weak' (the classifier learns from the "
        f'synthetic labels), got {supervision!r}; start from '
        'configs/mvtec_synthetic.py')


def _check_loss_terms(config: typed_config.RunSettings) -> None:
  """Every term of the configured CAVGA objective has a loss weight."""
  supervision = _get(config, 'model.supervision')
  synthetic = config.data.synthetic is not None
  weights = _get(config, 'loss_weights')
  missing = [
      name for name in losses.objective_terms(supervision, synthetic)
      if name not in weights
  ]
  if missing:
    hint = (' (start from configs/mvtec_weak.py or configs/tiny_weak.py)'
            if supervision == 'weak' else '')
    raise CavgaError(f'config.loss_weights has no {", ".join(missing)} for '
                     f"config.model.supervision='{supervision}'{hint}")


def _check_vae_config(config: typed_config.VaeRunSettings) -> None:
  _check_choice(config, 'data.name', conv_vae.DATASETS)
  _check_widths(config, 'model.encoder_widths')
  _check_choice(config, 'model.conv_impl', layers.CONV_IMPLS)
  _check_int(config, 'model.hidden', 1)
  _check_int(config, 'model.latent_dim', 1)
  for name in ('beta', 'ad'):
    _check_number(config, f'loss_weights.{name}', 0.0)
  _check_choice(config, 'eval.map', conv_vae.ATTENTION_MAPS)
  _check_choice(config, 'loss.ad_variant', losses.AD_VARIANTS)
  if _get(config, 'data.name') in conv_vae.SPRITES_DATASETS:
    # The disentanglement metrics, computed on the factor datasets only.
    for name in ('factor_vae_num_train', 'factor_vae_num_eval',
                 'num_loss_samples'):
      _check_int(config, f'eval.{name}', 1)
    for name in ('factor_vae_num_variance', 'mig_num_samples'):
      _check_int(config, f'eval.{name}', 2)
  conv_vae.check_image_size(
      _get(config, 'model.encoder_widths'), _get(config, 'data.image_size'))
