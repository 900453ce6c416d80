"""Issue 36's experiment: finer features, local contrast, robust combinations.

Scores, on one MVTec-layout category and at the ImageNet initialisation of
CAVGA-E (``train_state.initial_state``: every part here is training-free),
a few documented variants of the parts of a combined map and of the rule
that combines them, beside the landed headline:

parts (each fitted on the same normal training images as ``evaluate.py``,
``fitting.split_held_out``):
  * ``gauss``: ``feature_gaussian`` as configured (stages 1-3, 100 dims,
    64 x 64 cells at 256 px, covariance + 0.01 I);
  * ``gauss_shrink``: the same with the covariance shrunk towards the
    *global* feature scale, ``C + 0.1 * v * I`` with ``v`` the mean per-cell
    variance over all cells and channels, so near-constant cells (a black
    background) cannot turn noise into large distances;
  * ``knn``: ``feature_knn`` as configured (stages 1-2, 64 x 64 cells);
  * ``gauss_fine``: a Gaussian per cell on Lite0's stride-2 activations
    (``blocks_0_0``, 16 channels) and stage 1 (24) at image size / 2 cells,
    shrunk like ``gauss_shrink``;
  * ``knn_fine``: PatchCore on the same 40 fine channels at image size / 2
    cells (the coreset is chosen from a random 250,000-patch subset of the
    pool, as the full pool's greedy selection takes minutes per category);
  * ``ssim``: the *initial* decoder's SSIM residual, calibrated per pixel
    (``residual_ssim_smooth_calibrated`` at the initialisation: a
    local-contrast map that does not change with training).

combination rules over each set of parts (statistics of held-out normal
images only):
  * ``mean_z``: the landed rule, the mean of (map - mean) / std;
  * ``max_z``: the maximum of those;
  * ``mean_tail``: the mean of (map - median) / (q99.9 - median), so a part
    whose normal images already reach high values counts less.

  PYTHONPATH=. python scripts/fine_defect_variants.py --config=configs/mvtec.py \
      --config.data.root=../shared/data/bsdata_256 --config.data.category=bsdata \
      --workdir=/tmp/fine_bsdata --out=docs/raw/fine_bsdata.json
"""

from __future__ import annotations

import json
import logging
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from cavga_jax import config_checks
from cavga_jax import data
from cavga_jax.evaluation import evaluator as evaluator_lib
from cavga_jax.evaluation import fitting
from cavga_jax.maps import anomaly_maps
from cavga_jax.maps import calibration
from cavga_jax.maps import feature_gaussian
from cavga_jax.maps import feature_knn
from cavga_jax.metrics import image_metrics
from cavga_jax.metrics import pixel_metrics
from cavga_jax.models import layers
from cavga_jax.training import run_setup
from cavga_jax.training import train_state

_CONFIG = config_flags.DEFINE_config_file('config')
_WORKDIR = flags.DEFINE_string('workdir', '/tmp/fine', 'data workdir')
_OUT = flags.DEFINE_string('out', 'fine.json', 'JSON to write')
_SHRINK = flags.DEFINE_float(
    'shrink', 0.1, 'relative shrinkage of the '
    'shrunk Gaussians (times the mean variance)')

FINE_POOL = 250_000
PART_SETS = {
    'features': ('gauss', 'knn'),
    'features_shrink': ('gauss_shrink', 'knn'),
    'knn_ssim': ('knn', 'ssim'),
    'shrink_knn_ssim': ('gauss_shrink', 'knn', 'ssim'),
    'fine': ('gauss_fine', 'knn_fine'),
    'fine_ssim': ('gauss_fine', 'knn_fine', 'ssim'),
    'all_fine': ('gauss_shrink', 'knn', 'gauss_fine', 'knn_fine', 'ssim'),
    # The headline's parts and the fine Gaussian, without the fine kNN (its
    # image AUROC is the lowest part's on KolektorSDD and BSData).
    'headline_gauss_fine': ('gauss_shrink', 'knn', 'gauss_fine', 'ssim'),
    'knn_both': ('knn', 'knn_fine'),
    'knn_both_ssim': ('knn', 'knn_fine', 'ssim'),
}


def gaussian_statistics(moments: feature_gaussian.FeatureMoments,
                        shrink: float | None):
  """(mean, precision) with the library's absolute regularisation, or with
  ``shrink`` times the mean variance over all cells added instead."""
  if shrink is None:
    return moments.statistics()
  n = moments._count  # pylint: disable=protected-access
  mean = moments._sum / n  # pylint: disable=protected-access
  covariance = ((moments._outer - n * mean[..., :, None] * mean[..., None, :])  # pylint: disable=protected-access
                / max(n - 1, 1))
  scale = float(np.mean(np.diagonal(covariance, axis1=-2, axis2=-1)))
  covariance += shrink * scale * np.eye(mean.shape[-1])
  import threadpoolctl  # pylint: disable=g-import-not-at-top
  with threadpoolctl.threadpool_limits(1, user_api='blas'):
    precision = np.linalg.inv(covariance)
  return mean.astype(np.float32), precision.astype(np.float32)


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  config = _CONFIG.value
  run = config_checks.check_config(config)
  made = run_setup.setup(run, _WORKDIR.value, restore=True, untrained=True)
  mesh, train, test = made.mesh, made.train_ds, made.test_ds
  generator = made.generator
  variables = made.state.generator_variables()
  size = test.images.shape[1]
  settings = evaluator_lib.map_settings(run.eval, size)
  gauss_channels = feature_gaussian.select_channels(
      [generator.encoder_widths[s - 1] for s in (1, 2, 3)], 100)
  grid, fine_grid = size // 4, size // 2

  def forward(images):
    x = train_state.images_to_float(images)
    stages, inter = generator.apply(
        variables,
        x,
        False, (1, 2, 3),
        method='encode_stages',
        capture_intermediates=lambda m, _: m.name == 'blocks_0_0')
    stride2 = inter['intermediates']['encoder']['blocks_0_0']['__call__'][0]
    outputs = generator.apply(variables, x, None, False)
    ssim = anomaly_maps.residual_ssim_smooth_map(
        dict(outputs, images=x), settings)
    fine = [stride2, stages[0]]
    return dict(
        gauss=feature_gaussian.stack_features(stages, gauss_channels, grid),
        knn=feature_knn.patch_features(stages[:2], grid),
        gauss_fine=feature_gaussian.stack_features(fine, np.arange(40),
                                                   fine_grid),
        knn_fine=feature_knn.patch_features(fine, fine_grid),
        ssim=ssim)

  forward = jax.jit(
      forward, compiler_options=layers.compiler_options(generator.conv_impl))

  def passes(images, what):
    for i in range(0, len(images), run.eval.batch_size):
      batch = images[i:i + run.eval.batch_size]
      yield {k: np.asarray(v) for k, v in forward(batch).items()}
      logging.info('%s: %d/%d', what, min(i + len(batch), len(images)),
                   len(images))

  fit, held_out = fitting.split_held_out(
      evaluator_lib.normal_training_images(train), run.eval.threshold_holdout)
  timings = {}
  tic = time.perf_counter()
  moments = {k: feature_gaussian.FeatureMoments() for k in ('gauss', 'fine')}
  pools = {k: feature_knn.PatchPool() for k in ('knn', 'knn_fine')}
  pixel = calibration.PixelMoments()
  for out in passes(fit, 'fit'):
    moments['gauss'].add(out['gauss'])
    moments['fine'].add(out['gauss_fine'])
    pools['knn'].add(out['knn'])
    pools['knn_fine'].add(out['knn_fine'])
    pixel.add(out['ssim'])
  timings['fit_pass_s'] = time.perf_counter() - tic
  tic = time.perf_counter()
  stats = {
      'gauss': gaussian_statistics(moments['gauss'], None),
      'gauss_shrink': gaussian_statistics(moments['gauss'], _SHRINK.value),
      'gauss_fine': gaussian_statistics(moments['fine'], _SHRINK.value)
  }
  timings['gaussian_fit_s'] = time.perf_counter() - tic
  tic = time.perf_counter()
  banks = {
      'knn':
          pools['knn'].memory_bank(
              feature_knn.KnnSettings(bank_size=4096),
              feature_knn.coreset_key(), mesh)
  }
  fine_pool = pools['knn_fine']
  all_fine = np.concatenate(fine_pool._batches)  # pylint: disable=protected-access
  rng = np.random.default_rng(0)
  subset = all_fine[rng.choice(
      len(all_fine), min(FINE_POOL, len(all_fine)), replace=False)]
  sub_pool = feature_knn.PatchPool()
  sub_pool.add(subset[:, None, None, :])
  banks['knn_fine'] = sub_pool.memory_bank(
      feature_knn.KnnSettings(bank_size=4096), feature_knn.coreset_key(), mesh)
  del all_fine, subset, pools, fine_pool, sub_pool
  timings['coreset_s'] = time.perf_counter() - tic
  ssim_mean, ssim_scale = pixel.statistics()

  def maps_of(images, what):
    result = {
        k: [] for k in ('gauss', 'gauss_shrink', 'gauss_fine', 'knn', 'knn_fine',
                       'ssim')
    }
    for out in passes(images, what):
      for name, key in (('gauss', 'gauss'), ('gauss_shrink', 'gauss'),
                        ('gauss_fine', 'gauss_fine')):
        mean, precision = stats[name]
        cells = feature_gaussian.mahalanobis(
            jnp.asarray(out[key]), jnp.asarray(mean), jnp.asarray(precision))
        result[name].append(
            np.asarray(
                anomaly_maps.upsample_and_blur(cells, size,
                                               settings.residual_sigma)))
      for name in ('knn', 'knn_fine'):
        cells = feature_knn.nearest_distances(out[name], banks[name])
        result[name].append(
            np.asarray(
                anomaly_maps.upsample_and_blur(cells, size,
                                               settings.residual_sigma)))
      result['ssim'].append(
          calibration.calibrate(out['ssim'], ssim_mean, ssim_scale))
    return {k: np.concatenate(v) for k, v in result.items()}

  tic = time.perf_counter()
  held_maps = maps_of(held_out, 'held-out')
  test_maps = maps_of(test.images, 'test')
  timings['score_pass_s'] = time.perf_counter() - tic
  result = dict(
      category=config.data.category,
      image_size=size,
      shrink=_SHRINK.value,
      timings=timings,
      parts={},
      combined={})
  for name, maps in test_maps.items():
    result['parts'][name] = scores(maps, test)
    print(name, json.dumps(result['parts'][name]), flush=True)
  for set_name, parts in PART_SETS.items():
    for rule in ('mean_z', 'max_z', 'mean_tail'):
      combined = combine(rule, {p: held_maps[p] for p in parts},
                         {p: test_maps[p] for p in parts})
      key = f'{set_name}/{rule}'
      result['combined'][key] = scores(combined, test)
      print(key, json.dumps(result['combined'][key]), flush=True)
  with open(_OUT.value, 'w') as f:
    json.dump(result, f, indent=2)


def combine(rule, held, test_maps):
  """One combination rule (module docstring) of the parts' test maps."""
  normalised = []
  for name, maps in test_maps.items():
    normal = held[name][:, ::2, ::2].astype(np.float64).ravel()
    if rule == 'mean_tail':
      low, high = np.quantile(normal, [0.5, 0.999])
    else:
      low, high = normal.mean(), normal.mean() + normal.std()
    normalised.append((maps - low) / max(high - low, 1e-12))
  stacked = np.stack(normalised)
  return (stacked.max(axis=0) if rule == 'max_z' else stacked.mean(
      axis=0)).astype(np.float32)


def scores(test_maps, test):
  """Pixel AUROC, AU-PRO, image AUROC (top-1 % mean and maximum), and
  prior_normal's pixel metrics (the mean normal test map)."""
  low, high = test_maps.min(), test_maps.max()
  normalised = (test_maps - low) / max(high - low, 1e-12)
  prior = np.broadcast_to(normalised[test.labels == 0].mean(axis=0),
                          normalised.shape)
  top = np.asarray(anomaly_maps.image_score(jnp.asarray(test_maps)))
  return dict(
      pixel_auroc=pixel_metrics.pixel_auroc(normalised, test.masks),
      aupro=pixel_metrics.aupro(normalised, test.masks),
      image_auroc=image_metrics.image_auroc(top, test.labels),
      image_auroc_max=image_metrics.image_auroc(
          test_maps.max(axis=(1, 2)), test.labels),
      prior_normal_pixel_auroc=pixel_metrics.pixel_auroc(prior, test.masks),
      prior_normal_aupro=pixel_metrics.aupro(prior, test.masks))


if __name__ == '__main__':
  app.run(main)
