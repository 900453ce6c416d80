"""The library's default for every config field, kept once.

``configs/default.py`` is the documented run configuration; ``DEFAULTS``
holds the value the library uses when a config built in Python (tests,
notebooks, scripts) leaves a field out, and it is the same value:
``tests/test_settings.py`` checks every field of ``configs/default.py``
against this table (and the dataclass defaults of the modules that take
plain arguments, e.g. ``feature_gaussian.FeatureSettings``, against it too).
Fields in ``REQUIRED`` have no default: a run must give them
(``config_checks`` reports 'config.<field> is missing').

Code that reads an optional field asks this module for its default::

  eval_config.get('map', settings.default('eval.map'))
  settings.get(config, 'eval.map')   # from the root config

Adding a config field:
  1. add it, with its comment, to ``configs/default.py`` (the VAE's to
     ``configs/dsprites.py``);
  2. add ``'section.name': value`` to ``DEFAULTS`` (the same value;
     ``VAE_DEFAULTS`` where ``task='vae'`` differs), or its name to
     ``REQUIRED``;
  3. read it with ``settings.default`` / ``settings.get`` and validate it in
     ``config_checks``; say in ``workdirs.MAY_DIFFER`` if a rerun of a
     workdir may change it (otherwise a change stops the rerun).
``tests/test_settings.py`` fails until steps 1 and 2 agree.

The fields of ``data.synthetic`` other than ``fraction`` are
``synthesis.SynthesisSettings``'s (read only when synthesis is on).
"""

from __future__ import annotations

from typing import Any

from cavga_jax.errors import CavgaError

# Fields every run must set (no library default).
REQUIRED = frozenset({
    'seed', 'loss_weights', 'optimizer.learning_rate', 'optimizer.b1',
    'optimizer.b2', 'train.num_steps', 'train.batch_size', 'train.log_every',
    'train.checkpoint_every', 'eval.batch_size', 'eval.num_panels',
    'data.image_size', 'model.variant', 'model.latent',
    'model.latent_channels',
})

# config.task='cavga' (and the fields both tasks share). Values equal
# configs/default.py's; fields that configs/default.py leaves out are marked.
DEFAULTS: dict[str, Any] = {
    'task': 'cavga',
    'data.name': 'generated',
    'data.root': '',
    'data.category': 'textures',
    'data.channels': 3,
    'data.num_workers': 8,
    'data.num_train': 200,
    'data.num_test_good': 30,
    'data.num_test_per_defect': 20,
    'data.synthetic.fraction': 0.0,
    # Not in configs/default.py: configs/mvtec_weak.py, the one-class and
    # TFDS configs, or a fixed generated dataset.
    'data.weak_anomalies_per_batch': 0,
    'data.weak_fraction': 0.01,
    'data.weak_min_per_defect': 1,
    'data.weak_seed': 0,
    'data.generated_seed': None,  # None: config.seed
    'data.normal_class': 0,
    'data.download': True,
    'model.supervision': 'unsupervised',
    'model.latent_dim': 512,
    'model.encoder_widths': (32, 64, 128, 256),
    'model.decoder_widths': (256, 128, 64, 32),
    'model.discriminator_widths': (32, 64, 128, 256),
    'model.pretrained': '',
    'model.input_norm': 'none',
    'model.compute_dtype': 'float32',
    'model.conv_impl': 'auto',
    'model.attention_score': 'sum',
    'model.attention_stage': 4,  # models.NUM_ENCODER_STAGES
    'model.attention_norm': 'max',
    'optimizer.schedule': 'constant',
    'optimizer.warmup_steps': 0,
    'optimizer.grad_clip_norm': 0.0,
    'train.keep_checkpoints': 3,
    'train.prefetch': 2,
    'train.nonfinite': 'stop',
    'train.max_consecutive_skips': 10,
    'train.eval_every': 0,
    'eval.map': 'feature_gaussian',
    'eval.maps': 'all',
    'eval.residual_sigma': None,  # anomaly_maps.RELATIVE_SIGMA * image size
    'eval.ssim_window': 11,
    'eval.calibrate': True,
    'eval.feature_stages': (1, 2),
    'eval.feature_dims': 100,
    'eval.feature_grid_divisor': 4,
    'eval.feature_shrinkage': 0.1,
    'eval.feature_weights': 'evaluated',
    'eval.knn_stages': (2, 3),
    'eval.knn_grid_divisor': 8,
    'eval.knn_bank_size': 4096,
    'eval.knn_chunk': 4096,
    'eval.threshold_holdout': 0.1,
    'eval.threshold_quantile': 0.999,
    'detector.num_steps': 0,
    'detector.batch_size': 4096,
    'detector.hidden': 1024,
    'detector.noise_std': 0.25,
    'detector.margin': 0.5,
    'detector.learning_rate': 2e-4,
    'detector.adaptor_learning_rate': 1e-4,
    'detector.weight_decay': 1e-5,
    'detector.validate_every': 0,
    'detector.checkpoint_every': 500,
    'detector.log_every': 100,
}

# config.task='vae' (configs/dsprites.py): where it differs from DEFAULTS or
# has fields of its own.
VAE_DEFAULTS: dict[str, Any] = {
    'eval.map': 'mean',
    'eval.metric_seed': 0,
    'loss.ad_variant': 'paper',
    'data.scales': 6,
    'data.orientations': 40,
    'data.positions': 32,
}

VAE_REQUIRED = frozenset({
    'data.name', 'model.encoder_widths', 'model.hidden', 'model.latent_dim',
    'eval.factor_vae_num_train', 'eval.factor_vae_num_eval',
    'eval.factor_vae_num_variance', 'eval.mig_num_samples',
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
      ``DEFAULTS`` or read it as required).
  """
  if not has_default(field, task):
    raise KeyError(f'config.{field} has no library default')
  return _table(task)[field]


def get(config: Any, field: str) -> Any:
  """``config``'s value of ``field`` ('section.name'), or its default.

  Args:
    config: a full run configuration (ConfigDict or nested mappings).
    field: the dotted path from the root.

  Raises:
    CavgaError: the field is absent and has no default (one line).
  """
  node = config
  for part in field.split('.'):
    try:
      node = node[part]
    except (KeyError, AttributeError, TypeError):
      task = config.get('task', DEFAULTS['task']) if field != 'task' else ''
      if not has_default(field, task):
        raise CavgaError(f'config.{field} is missing') from None
      return default(field, task)
  return node
