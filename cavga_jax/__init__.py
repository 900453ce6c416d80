"""cavga_jax: CAVGA (attention-guided anomaly localization with VAEs) in JAX/Flax.

The entry points a researcher needs are attributes of the package; each is
imported on first use (PEP 562), so ``import cavga_jax`` stays cheap and
loads no dataset or training code until asked:

  import cavga_jax
  generator, discriminator = cavga_jax.build_models(config)
  state = cavga_jax.create_train_state(generator, discriminator, key, 64)
  step = jax.jit(cavga_jax.make_train_step(generator, discriminator,
                                           dict(rec=1, kl=1, adv=1, ae=0.01)),
                 compiler_options=cavga_jax.compiler_options(
                     generator.conv_impl))

Models: ``CAVGAGenerator``, ``Discriminator``, ``build_models``. Attention:
``grad_cam``, ``class_grad_cam``, ``forward_with_attention``,
``unit_attention`` (and the module ``explain``: Liu et al.'s per-unit
explanations). Objectives and measures: the modules ``losses``,
``pixel_metrics``, ``image_metrics``, ``anomaly_maps``, ``synthesis``.
Training and evaluation: ``create_train_state``, ``make_train_step``,
``make_eval_step``, ``Evaluator``, ``FittedMaps``, ``map_registry`` (every
map, declared once; ``map_registry.register`` adds one), ``FittedMap``
(a map fitted on normal images, as one unit), ``train``, ``evaluate``,
``compiler_options`` (``jax.jit``'s options for the fast CPU
convolutions). Deployment:
``load_scorer`` / ``Scorer`` (a trained run's headline map for new images)
and ``export`` (the scorer serialized with ``jax.export``). Errors:
``CavgaError`` and its subclasses.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> (module, attribute or None for the module itself).
_EXPORTS = {
    'CAVGAGenerator': ('models.cavga', 'CAVGAGenerator'),
    'Discriminator': ('models.backbones', 'Discriminator'),
    'build_models': ('programs.train', 'build_models'),
    'grad_cam': ('models.attention', 'grad_cam'),
    'class_grad_cam': ('models.attention', 'class_grad_cam'),
    'forward_with_attention': ('models.attention', 'forward_with_attention'),
    'unit_attention': ('vae.explain', 'unit_attention'),
    'explain': ('vae.explain', None),
    'losses': ('training.losses', None),
    'pixel_metrics': ('metrics.pixel_metrics', None),
    'image_metrics': ('metrics.image_metrics', None),
    'anomaly_maps': ('maps.anomaly_maps', None),
    'synthesis': ('training.synthesis', None),
    'TrainState': ('training.train_state', 'TrainState'),
    'create_train_state': ('training.train_state', 'create_train_state'),
    'make_train_step': ('training.cavga_step', 'make_train_step'),
    'compiler_options': ('models.layers', 'compiler_options'),
    'make_eval_step': ('evaluation.inference', 'make_eval_step'),
    'Evaluator': ('evaluation.evaluator', 'Evaluator'),
    'FittedMaps': ('evaluation.fitting', 'FittedMaps'),
    'map_registry': ('evaluation.registry', None),
    'FittedMap': ('maps.fitted_map', 'FittedMap'),
    'Scorer': ('deploy.scorer', 'Scorer'),
    'load_scorer': ('deploy.scorer', 'load_scorer'),
    'export': ('deploy.export', None),
    'train': ('programs.train', 'train'),
    'evaluate': ('programs.evaluate', 'evaluate'),
    'CavgaError': ('errors', 'CavgaError'),
    'DataError': ('errors', 'DataError'),
    'TrainingError': ('errors', 'TrainingError'),
}

__all__ = ['__version__', *_EXPORTS]


def __getattr__(name: str) -> Any:
  if name not in _EXPORTS:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  module_name, attribute = _EXPORTS[name]
  module = importlib.import_module(f'{__name__}.{module_name}')
  value = module if attribute is None else getattr(module, attribute)
  globals()[name] = value  # Later lookups skip __getattr__.
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_EXPORTS))
