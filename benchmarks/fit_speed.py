"""Wall time of fitting and applying the feature maps on one category.

Times what ``feature_gaussian`` (PaDiM) and ``feature_knn`` (PatchCore) cost
on their own, with the library's functions and a config's settings (default
``configs/mvtec.py``: CAVGA-E's ImageNet encoder): the encoder pass over the
normal training images, the Gaussian statistics or the coreset, and the
maps of the test images. The full ``evaluate.py`` also reconstructs every
image and computes Grad-CAM for the other maps; this is the cost of these
two maps alone, what anomalib's PaDiM / PatchCore fit + test do
(docs/benchmarks.md compares them, run alone on the machine).

  PYTHONPATH=. python benchmarks/fit_speed.py --root ../shared/data/mvtec_bottle_256 \
      --category bottle [--map feature_knn|feature_gaussian]

``--maps headline|all`` times what ``evaluate.py --untrained --maps=...``
computes instead: ``Evaluator.fit`` (the normal images' pass, the
statistics and coreset, the held-out pass) and the scored test pass
(predictions and every metric), one JSON line each, the first call's
compilation included.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from cavga_jax import config_checks
from cavga_jax import data
from cavga_jax import sharding
from cavga_jax.evaluation import evaluator as evaluator_lib
from cavga_jax.evaluation import fitting
from cavga_jax.evaluation import inference
from cavga_jax.maps import anomaly_maps
from cavga_jax.maps import feature_gaussian
from cavga_jax.maps import feature_knn
from cavga_jax.models import layers
from cavga_jax.programs import evaluate as eval_lib
from cavga_jax.training import run_setup
from cavga_jax.training import train_state


def _features(step, variables, images, batch_size, key):
  """(N, g, g, d) float32 features of one kind, batch by batch."""
  out = []
  for batch, num_valid in data.eval_batches(images, batch_size):
    out.append(np.asarray(step(variables, batch)[key])[:num_valid])
  return out


def _time_evaluation(config, maps: str) -> None:
  """Prints the seconds of ``Evaluator.fit`` and of the scored test pass."""
  config.eval.maps = maps
  tic = time.perf_counter()
  made, evaluator = eval_lib.evaluation_setup(
      config, '/tmp/fit_speed', untrained=True)
  state = made.state
  setup_s = time.perf_counter() - tic
  tic = time.perf_counter()
  fitted = evaluator.fit(state.gen_params, state.gen_batch_stats)
  fit_s = time.perf_counter() - tic
  tic = time.perf_counter()
  result, _ = evaluator(state.gen_params, state.gen_batch_stats, fitted)
  score_s = time.perf_counter() - tic
  print(
      json.dumps(
          dict(
              maps=maps,
              headline=result['map'],
              setup_s=round(setup_s, 1),
              fit_s=round(fit_s, 1),
              score_s=round(score_s, 1),
              fit_plus_score_s=round(fit_s + score_s, 1),
              maps_scored=len(result['maps']),
              fitted=list(fitted.available()),
              pixel_auroc=result['pixel_auroc'],
              aupro=result['aupro'],
              image_auroc=result['image_auroc'],
              devices=jax.device_count(),
              first_call_included=True)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='mvtec')
  parser.add_argument('--root', required=True)
  parser.add_argument('--category', required=True)
  parser.add_argument(
      '--map',
      default='feature_knn',
      choices=['feature_knn', 'feature_gaussian'])
  parser.add_argument(
      '--knn-stages', default=None, help='e.g. 2,3 (default: the config\'s)')
  parser.add_argument('--knn-grid-divisor', type=int, default=None)
  parser.add_argument('--knn-bank-size', type=int, default=None)
  parser.add_argument(
      '--image-size', type=int, default=None, help="default: the config's")
  parser.add_argument(
      '--maps',
      default=None,
      choices=['headline', 'all'],
      help='time the whole evaluation of config.eval.maps '
      'instead')
  args = parser.parse_args()
  config = importlib.import_module(f'configs.{args.config}').get_config()
  config.data.root, config.data.category = args.root, args.category
  if args.knn_stages:
    config.eval.knn_stages = tuple(int(s) for s in args.knn_stages.split(','))
  if args.knn_grid_divisor:
    config.eval.knn_grid_divisor = args.knn_grid_divisor
  if args.knn_bank_size:
    config.eval.knn_bank_size = args.knn_bank_size
  if args.image_size:
    config.data.image_size = args.image_size
  if args.maps:
    _time_evaluation(config, args.maps)
    return
  run = config_checks.check_config(config)
  mesh = sharding.make_mesh()
  tic = time.perf_counter()
  train, test = run_setup.load_datasets(run, '/tmp/fit_speed')
  load_s = time.perf_counter() - tic
  made = run_setup.setup(
      run,
      '/tmp/fit_speed',
      datasets=False,
      restore=True,
      untrained=True,
      mesh=mesh)
  generator = made.generator
  variables = made.state.generator_variables()
  fit, _ = fitting.split_held_out(
      evaluator_lib.normal_training_images(train), run.eval.threshold_holdout)
  knn = evaluator_lib.knn_settings(run.eval)
  gaussian = evaluator_lib.feature_settings(run.eval)
  key = args.map
  map_settings = evaluator_lib.map_settings(run.eval, test.images.shape[1])
  stage_fn = inference.fitted_inputs(
      generator, map_settings, {key: knn if key == 'feature_knn' else gaussian})
  step = jax.jit(
      lambda v, images: stage_fn(v, train_state.images_to_float(images), {}),
      compiler_options=layers.compiler_options(generator.conv_impl))
  sigma = map_settings.residual_sigma
  batch = run.eval.batch_size

  tic = time.perf_counter()
  fit_features = _features(step, variables, fit, batch, key)
  features_s = time.perf_counter() - tic
  tic = time.perf_counter()
  if args.map == 'feature_knn':
    pool = feature_knn.PatchPool()
    for f in fit_features:
      pool.add(f)
    bank = pool.memory_bank(knn, feature_knn.coreset_key(), mesh)
  else:
    moments = feature_gaussian.FeatureMoments()
    for f in fit_features:
      moments.add(f)
    statistics = moments.statistics()
  statistics_s = time.perf_counter() - tic
  tic = time.perf_counter()
  test_features = np.concatenate(
      _features(step, variables, test.images, batch, key))
  if args.map == 'feature_knn':
    cells = np.asarray(
        feature_knn.nearest_distances(test_features, bank, knn.chunk))
  else:
    cells = feature_gaussian.mahalanobis(
        jnp.asarray(test_features), *map(jnp.asarray, statistics))
  maps = np.asarray(
      anomaly_maps.upsample_and_blur(
          jnp.asarray(cells), test.images.shape[1], sigma))
  test_s = time.perf_counter() - tic
  print(
      json.dumps(
          dict(
              map=args.map,
              category=args.category,
              fit_images=len(fit),
              test_images=len(test.images),
              load_s=round(load_s, 2),
              fit_features_s=round(features_s, 2),
              fit_statistics_s=round(statistics_s, 2),
              fit_s=round(features_s + statistics_s, 2),
              test_s=round(test_s, 2),
              map_shape=list(maps.shape),
              devices=jax.device_count(),
              first_call_included=True)))


if __name__ == '__main__':
  main()
