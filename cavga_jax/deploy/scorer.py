"""The deployed scorer: uint8 images in, the headline map and image score out.

A trained run is its checkpoint plus the maps fitted on its normal images
(``evaluation.store``, written by ``evaluate.py``). ``load_scorer`` turns
both into a ``Scorer`` that computes only what the headline map needs
(``evaluation.registry.needs``): no Grad-CAM unless the headline is an
attention map, no decoder unless it reads the reconstruction. Its maps
equal the evaluation's (both come from ``inference.forward``,
``inference.fitted_inputs`` and ``fitting.fitted_batch_maps``);
``cavga_jax.deploy.export``
serializes the same function.

A non-finite map or score (a corrupted fitted state or checkpoint) is never
a normal decision: ``decide`` marks it anomalous and not finite, and
``predict.py`` reports such an image as an error.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cavga_jax import config_checks
from cavga_jax import typed_config
from cavga_jax import workdirs
from cavga_jax.errors import CavgaError
from cavga_jax.evaluation import evaluator as evaluator_lib
from cavga_jax.evaluation import fitting
from cavga_jax.evaluation import inference
from cavga_jax.evaluation import registry
from cavga_jax.evaluation import store
from cavga_jax.maps import anomaly_maps
from cavga_jax.models import cavga
from cavga_jax.models import layers
from cavga_jax.training import detector_training
from cavga_jax.training import run_setup
from cavga_jax.training import train_state

Array = jax.Array


def make_score_fn(
    generator: cavga.CAVGAGenerator,
    eval_settings: typed_config.EvalSettings,
    image_size: int,
    headline: str,
    detector_config: typed_config.DetectorSettings | None = None
) -> Callable[[Any, Array], tuple[Array, Array]]:
  """``score(state, images) -> (maps (B, S, S), scores (B,))`` (pure).

  ``state`` is ``{'variables', 'feature_variables', 'fitted'}``:
  the generator's {'params', 'batch_stats'}, those the feature maps read
  (the same, or the initial encoder with ``eval.feature_weights=
  'initial'``) and the ``fitting.FittedMaps``. ``images`` (B, S, S, C)
  uint8.
  """
  spec = registry.spec(headline)
  if spec.kind == 'prior':
    raise CavgaError(f'{headline!r} is a test-set baseline, not a map a new '
                     'image can be scored with')
  map_settings = evaluator_lib.map_settings(eval_settings, image_size)
  needs = registry.needs([headline])
  closure = registry.closure([headline])
  fitted = {
      name: value for name, value in evaluator_lib.fitted_settings(
          eval_settings, detector_config).items() if name in closure
  }
  inputs_fn = inference.fitted_inputs(generator, map_settings, fitted)
  functions = registry.batch_functions(generator.with_classifier)
  batch_functions = {n: functions[n] for n in registry.batch_maps([headline])}
  context = inference.map_context(generator, map_settings, image_size)

  def score(state, images):
    x = train_state.images_to_float(images)
    variables = state['variables']
    outputs = inference.forward(generator, variables['params'],
                                variables['batch_stats'], x, needs)
    maps = anomaly_maps.compute_maps(outputs, batch_functions, map_settings)
    if spec.kind in ('fitted', 'combined'):
      inputs = inputs_fn(state['feature_variables'], x, maps)
      maps = fitting.fitted_batch_maps(state['fitted'], maps, inputs,
                                       [headline], context, fitted)
    return maps[headline], spec.image_score(maps[headline])

  return score


def decide(maps: Array, scores: Array,
           image_threshold: float) -> tuple[Array, Array]:
  """(anomalous (B,) bool, finite (B,) bool) of maps (B, S, S), scores (B,).

  ``finite``: the score and every pixel of the map are finite.
  ``anomalous``: the score is not at or below the image threshold, or it is
  not finite; written ``~(scores <= t)`` because ``nan > t`` is False.
  Traceable (the exported scorer returns it) and usable on host arrays.
  """
  finite = jnp.isfinite(scores) & jnp.all(jnp.isfinite(maps), axis=(1, 2))
  return ~(scores <= image_threshold) | ~finite, finite


@dataclasses.dataclass
class Scorer:
  """A trained run ready to score images of its size.

  Attributes:
    headline: the map's name (``config.eval.map``).
    image_size, channels: the images ``score`` takes, (B, S, S, C) uint8.
    thresholds: (pixel threshold, image threshold, median normal pixel) of
      the headline map, from the held-out normal images.
    state: the arrays ``score_fn`` reads (``make_score_fn``).
    score_fn: the pure function; ``score`` is it jitted.
    step: the checkpoint's step.
    compiler_options: XLA options ``score`` is compiled with
      (``layers.compiler_options``).
  """
  headline: str
  image_size: int
  channels: int
  thresholds: tuple[float, float, float]
  state: Any
  score_fn: Callable[[Any, Array], tuple[Array, Array]]
  step: int
  compiler_options: dict[str, Any] | None = None

  def __post_init__(self):
    self._jitted = jax.jit(
        self.score_fn, compiler_options=self.compiler_options)

  def check_images(self, images: Any) -> None:
    """Raises CavgaError unless ``images`` is a (B >= 1, S, S, C) uint8 batch.

    Floats in 0..255, other sizes or a single image would be scored
    without a word and give meaningless scores (a float image's score is
    far above any threshold); resize with ``data.images.model_input``.
    """
    shape = (self.image_size, self.image_size, self.channels)
    dtype = getattr(images, 'dtype', None)
    if dtype != np.uint8:
      raise CavgaError(f'Scorer.score takes uint8 images, got {dtype} '
                       '(pass the 0..255 pixels as uint8, not scaled floats)')
    if images.ndim != 4 or tuple(images.shape[1:]) != shape \
        or images.shape[0] < 1:
      raise CavgaError(
          f'Scorer.score takes a batch (B >= 1, {", ".join(map(str, shape))}) '
          f'of images at the model\'s size, got shape {tuple(images.shape)}; '
          'resize each image with cavga_jax.data.images.model_input as '
          'predict.py does')

  def score(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, S, S, C) uint8 -> (maps (B, S, S) float32, scores (B,)).

    Raises:
      CavgaError: ``images`` is not such a batch (``check_images``).
    """
    self.check_images(images)
    maps, scores = self._jitted(self.state, images)
    return np.asarray(maps), np.asarray(scores)

  def decide(self, maps: np.ndarray,
             scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(anomalous, finite) (B,) bool of ``score``'s outputs (``decide``)."""
    anomalous, finite = decide(maps, scores, self.thresholds[1])
    return np.asarray(anomalous), np.asarray(finite)


def read_config(workdir: str,
                untrained: bool = False) -> ml_collections.ConfigDict:
  """The run's config as a ConfigDict (lists as tuples).

  ``<workdir>/config.json`` (``train.py`` writes it), or with ``untrained``
  the one ``evaluate.py --untrained`` saved with its fitted maps.
  """
  path = os.path.join(workdir, workdirs.CONFIG_FILE)
  if untrained:
    path = os.path.join(store.fitted_dir(workdir, 0, True), store.CONFIG_FILE)
  if not os.path.exists(path):
    raise CavgaError(f'{path}: not found; run train.py and evaluate.py (or '
                     'evaluate.py --untrained) with this --workdir first')
  tree = workdirs.read_json_object(
      path, 'it should hold the config the run '
      'was trained with (train.py writes it)')

  def tuples(value):
    if isinstance(value, dict):
      return {k: tuples(v) for k, v in value.items()}
    return tuple(tuples(v) for v in value) if isinstance(value, list) \
        else value

  return ml_collections.ConfigDict(tuples(tree))


def load_scorer(workdir: str,
                config: ml_collections.ConfigDict | None = None,
                untrained: bool = False) -> Scorer:
  """The newest checkpoint of ``workdir`` and the maps fitted for it.

  Args:
    workdir: a training workdir on which ``evaluate.py`` ran (it fits and
      saves the maps on the normal images, ``evaluation.store``).
    config: the run's config; default ``<workdir>/config.json``.
    untrained: the networks training starts from instead of a checkpoint,
      with the maps ``evaluate.py --untrained`` fitted (e.g. CAVGA-E's
      ImageNet feature maps, which training does not change).

  Raises:
    CavgaError: no checkpoint, or no maps fitted for it, or a headline map
      that is a test-set baseline; each says what to run.
  """
  config = config or read_config(workdir, untrained)
  if config.get('task', 'cavga') != 'cavga':
    raise CavgaError(f"{workdir}: task {config.task!r}; predict.py scores "
                     'CAVGA runs')
  run = config_checks.check_config(config)
  made = run_setup.setup(
      run, workdir, datasets=False, restore=True, untrained=untrained)
  state, step = made.state, made.step
  directory = store.fitted_dir(workdir, step, untrained)
  saved = store.saved_key(directory)
  if saved is None:
    what = 'the untrained networks' if untrained else f'checkpoint {step}'
    flag = ' --untrained' if untrained else ''
    raise CavgaError(f'{directory}: no maps fitted for {what}; run `python '
                     f'evaluate.py --workdir={workdir} --config=...{flag}` '
                     'first (it fits them on the normal training images and '
                     'saves them there)')
  expected = store.fit_key(
      run.eval, step, state, saved['image_size'], saved['num_normal_images'],
      {} if untrained else detector_training.trained_maps(workdir),
      run.detector)
  changed = store.differing_fields(saved, expected)
  if changed:
    raise CavgaError(
        f'{directory}: the maps were fitted with other '
        f'settings than {workdirs.CONFIG_FILE} ({", ".join(changed)}'
        f'); run `python evaluate.py --workdir={workdir} '
        '--config=...` with the run\'s config to refit them')
  fitted = store.load(directory)
  headline = run.eval.map
  if headline not in fitted.thresholds:
    raise CavgaError(f'{directory}: no held-out thresholds for {headline!r} '
                     '(config.eval.threshold_holdout is 0?); predict.py '
                     'decides at them')
  variables = state.generator_variables()
  feature_variables = made.feature_variables or variables
  return build_scorer(run, made.generator, variables, feature_variables, fitted,
                      step)


def build_scorer(run: typed_config.RunSettings, generator: cavga.CAVGAGenerator,
                 variables: Any, feature_variables: Any,
                 fitted: fitting.FittedMaps, step: int) -> Scorer:
  """The ``Scorer`` of ``config.eval.map`` from networks and fitted maps.

  ``run``: the run's typed settings (``typed_config.from_config``).
  ``variables`` / ``feature_variables``: {'params', 'batch_stats'} of the
  scored networks and of the encoder the feature maps read.
  """
  headline = run.eval.map
  image_size = int(run.data.image_size)
  return Scorer(
      headline=headline,
      image_size=image_size,
      channels=int(run.data.channels),
      thresholds=tuple(fitted.thresholds[headline]),
      # On the device once, not with every call (the feature Gaussians
      # alone are 164 MB at configs/mvtec.py's 64 x 64 cells).
      state=jax.device_put(
          dict(
              variables=variables,
              feature_variables=feature_variables,
              fitted=fitted)),
      score_fn=make_score_fn(generator, run.eval, image_size, headline,
                             run.detector),
      step=step,
      compiler_options=layers.compiler_options(generator.conv_impl))
