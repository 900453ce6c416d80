"""Variants of the ``feature_gaussian`` map on one run: grid, blur, position.

  PYTHONPATH=. python scripts/feature_map_variants.py --config=configs/mvtec.py --workdir=runs/kolektor_D_u \
      --config.data.root=../shared/data/kolektorsdd_256 --config.data.category=kolektorsdd \
      --config.data.image_size=128 --config.model.variant=D [--untrained]

Takes the encoder features of ``feature_gaussian`` (stages and channels of
``config.eval``) of the newest checkpoint (or of the untrained networks) for
the normal training images that fit the statistics (the held-out share left
out, as in ``eval_lib``) and the test images, and prints, as JSON, pixel
AUROC / AU-PRO / image AUROC of:
* ``gaussian_grid<k>_sigma<s>``: the map itself (one Gaussian per cell) on a
  grid of image size / k, blurred with sigma s px;
* ``knn_free`` / ``knn_free_whitened``: position-free, PatchCore-like: each
  test cell's Euclidean distance to its nearest neighbour among
  ``--bank_size`` normal cell features drawn at random from all positions
  (raw, or whitened by their pooled covariance);
* ``knn_radius<r>``: the nearest normal feature within r cells of the same
  position (r = 0: same cell).
The kNN maps use the default grid and blur. A measurement tool for
docs/results.md, not a map of the library.
"""

import dataclasses
import functools
import json

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from cavga_jax import config_checks
from cavga_jax import data
from cavga_jax.evaluation import evaluator as evaluator_lib
from cavga_jax.evaluation import fitting
from cavga_jax.evaluation import inference
from cavga_jax.maps import anomaly_maps
from cavga_jax.maps import feature_gaussian
from cavga_jax.metrics import image_metrics
from cavga_jax.metrics import pixel_metrics
from cavga_jax.models import layers
from cavga_jax.programs import runtime
from cavga_jax.training import run_setup

_CONFIG = runtime.define_config_flag('The run configuration.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'The trained workdir.')
_UNTRAINED = flags.DEFINE_bool('untrained', False,
                               'Use the freshly initialised networks.')
_GRID_DIVISORS = flags.DEFINE_list('grid_divisors', ['4', '2'],
                                   'Grid = image size / each of these.')
_SIGMAS = flags.DEFINE_list('sigmas', ['4', '2', '1'], 'Blur sigmas (px).')
_BANK_SIZE = flags.DEFINE_integer('bank_size', 16384,
                                  'Normal features of the position-free kNN.')
_RADII = flags.DEFINE_list('radii', ['0', '1'], 'kNN radii in cells.')
flags.mark_flags_as_required(['config', 'workdir'])


def _scores(distances: np.ndarray, sigma: float,
            test: data.AnomalyDataset) -> dict[str, float]:
  """Metrics of (N, g, g) cell distances, bilinear to image size and blurred."""
  maps = anomaly_maps.upsample_and_blur(distances, test.images.shape[1], sigma)
  return dict(
      pixel_auroc=round(
          pixel_metrics.pixel_auroc(np.asarray(maps), test.masks), 3),
      aupro=round(pixel_metrics.aupro(np.asarray(maps), test.masks), 3),
      image_auroc=round(
          image_metrics.image_auroc(
              np.asarray(anomaly_maps.image_score(maps)), test.labels), 3))


@jax.jit
def _nearest(queries: jax.Array, bank: jax.Array) -> jax.Array:
  """(Q, d), (M, d) -> (Q,) Euclidean distance to the nearest bank row."""
  squared = (
      jnp.sum(queries**2, 1)[:, None] - 2 * queries @ bank.T
      + jnp.sum(bank**2, 1)[None])
  return jnp.sqrt(jnp.maximum(squared.min(axis=1), 0.0))


def _knn_free(normal: np.ndarray, test: np.ndarray,
              bank_size: int) -> np.ndarray:
  flat = normal.reshape(-1, normal.shape[-1])
  rows = np.random.default_rng(0).choice(
      len(flat), min(bank_size, len(flat)), replace=False)
  bank = jnp.asarray(flat[rows])
  queries = test.reshape(-1, test.shape[-1])
  nearest = np.concatenate([
      np.asarray(_nearest(jnp.asarray(queries[i:i + 4096]), bank))
      for i in range(0, len(queries), 4096)
  ])
  return nearest.reshape(test.shape[:3])


def _whiten(normal: np.ndarray,
            test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  flat = normal.reshape(-1, normal.shape[-1]).astype(np.float64)
  mean = flat.mean(axis=0)
  covariance = (
      np.cov(flat - mean, rowvar=False)
      + feature_gaussian.REGULARIZATION * np.eye(flat.shape[1]))
  values, vectors = np.linalg.eigh(covariance)
  whitening = (vectors / np.sqrt(values)) @ vectors.T
  return tuple(
      ((f - mean) @ whitening).astype(np.float32) for f in (normal, test))


def _knn_radius(normal: np.ndarray, test: np.ndarray,
                radius: int) -> np.ndarray:
  grid = normal.shape[1]
  padded = np.pad(
      normal, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode='edge')
  # _nearest at every cell: (Q, g, g, d) queries, (n, g, g, d) banks.
  per_cell = jax.vmap(jax.vmap(_nearest, (1, 1), 1), (1, 1), 1)
  queries = jnp.asarray(test)
  return np.asarray(
      functools.reduce(
          jnp.minimum,
          (per_cell(queries, jnp.asarray(padded[:, dy:dy + grid, dx:dx + grid]))
           for dy in range(2 * radius + 1)
           for dx in range(2 * radius + 1))))


def main(argv):
  del argv
  config = _CONFIG.value
  run = config_checks.check_config(config)
  made = run_setup.setup(
      run, _WORKDIR.value, restore=True, untrained=_UNTRAINED.value)
  mesh, train, test = made.mesh, made.train_ds, made.test_ds
  generator, state, step = made.generator, made.state, made.step
  fit, _ = fitting.split_held_out(
      evaluator_lib.normal_training_images(train), run.eval.threshold_holdout)
  map_settings = evaluator_lib.map_settings(run.eval, test.images.shape[1])

  def features(divisor: int) -> list[np.ndarray]:
    """(N, g, g, dims) encoder features of ``feature_gaussian`` at grid /
    divisor: of the normal fit images, then of the test images (one jit)."""
    normal_step = jax.jit(
        inference.make_normal_step(
            generator, map_settings, {
                feature_gaussian.NAME:
                    dataclasses.replace(
                        evaluator_lib.feature_settings(run.eval),
                        grid_divisor=divisor)
            }),
        compiler_options=layers.compiler_options(generator.conv_impl))
    return [
        inference.predict(
            lambda batch: normal_step(state.gen_params, state.gen_batch_stats,
                                      batch), images, run.eval.batch_size,
            mesh)[feature_gaussian.NAME] for images in (fit, test)
    ]

  result = dict(checkpoint_step=step, untrained=_UNTRAINED.value)
  default_sigma = map_settings.residual_sigma
  for divisor in map(int, _GRID_DIVISORS.value):
    normal, tested = features(divisor)
    moments = feature_gaussian.FeatureMoments()
    moments.add(normal)
    distances = np.asarray(
        feature_gaussian.mahalanobis(
            jnp.asarray(tested), *map(jnp.asarray, moments.statistics())))
    for sigma in map(float, _SIGMAS.value):
      result[f'gaussian_grid{divisor}_sigma{sigma:g}'] = _scores(
          distances, sigma, test)
    if divisor != feature_gaussian.GRID_DIVISOR:
      continue
    result['knn_free'] = _scores(
        _knn_free(normal, tested, _BANK_SIZE.value), default_sigma, test)
    result['knn_free_whitened'] = _scores(
        _knn_free(*_whiten(normal, tested), _BANK_SIZE.value), default_sigma,
        test)
    for radius in map(int, _RADII.value):
      result[f'knn_radius{radius}'] = _scores(
          _knn_radius(normal, tested, radius), default_sigma, test)
  print(json.dumps(result, indent=2))


if __name__ == '__main__':
  app.run(main)
