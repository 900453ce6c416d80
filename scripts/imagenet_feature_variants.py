"""Scores a few documented feature-map variants of CAVGA-E's ImageNet encoder.

Chooses, on the developers' categories only, which EfficientNet-Lite0 stages,
grid and channel count ``feature_gaussian`` and ``feature_knn`` use
(docs/results.md, "ImageNet features"). One encoder pass per image (stages
1-3 at the ImageNet initialisation, ``train_state.initial_state``); every
variant is fitted on the same normal training images as ``evaluate.py``
(``fitting.split_held_out``) and scored with the library's metrics, beside
``prior_normal`` (each variant's mean map over the normal test images).

  PYTHONPATH=. python scripts/imagenet_feature_variants.py --config=configs/mvtec.py \
      --config.model.variant=E --config.model.pretrained=efficientnet_lite0_imagenet \
      --config.model.input_norm=imagenet --config.data.root=../shared/data/bsdata_256 \
      --config.data.category=bsdata --workdir=/tmp/variants --out=variants_bsdata.json
"""

from __future__ import annotations

import json
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
from cavga_jax.maps import combined_maps
from cavga_jax.maps import feature_gaussian
from cavga_jax.maps import feature_knn
from cavga_jax.metrics import image_metrics
from cavga_jax.metrics import pixel_metrics
from cavga_jax.models import layers
from cavga_jax.training import run_setup
from cavga_jax.training import train_state

_CONFIG = config_flags.DEFINE_config_file('config')
_WORKDIR = flags.DEFINE_string('workdir', '/tmp/variants', 'data workdir')
_OUT = flags.DEFINE_string('out', 'variants.json', 'JSON to write')
_ONLY = flags.DEFINE_list('only', [], 'variant names to run (default: all)')

# name -> ('gaussian', stages, dims, grid divisor) | ('knn', stages, bank
# size, grid divisor).
VARIANTS = {
    'gaussian_s123_d100_g4': ('gaussian', (1, 2, 3), 100, 4),
    'gaussian_s12_d64_g4': ('gaussian', (1, 2), 64, 4),
    'gaussian_s123_d176_g8': ('gaussian', (1, 2, 3), 176, 8),
    'knn_s23_g8': ('knn', (2, 3), 4096, 8),
    'knn_s12_g4': ('knn', (1, 2), 4096, 4),
    'knn_s123_g4': ('knn', (1, 2, 3), 4096, 4),
}


def main(argv):
  del argv
  config = _CONFIG.value
  run = config_checks.check_config(config)
  made = run_setup.setup(run, _WORKDIR.value, restore=True, untrained=True)
  mesh, train, test = made.mesh, made.train_ds, made.test_ds
  generator = made.generator
  variables = made.state.generator_variables()
  stages_fn = jax.jit(
      lambda v, images: generator.apply(
          v,
          train_state.images_to_float(images),
          False, (1, 2, 3),
          method='encode_stages'),
      compiler_options=layers.compiler_options(generator.conv_impl))
  fit, held_out = fitting.split_held_out(
      evaluator_lib.normal_training_images(train), run.eval.threshold_holdout)

  def stage_outputs(images):
    outs = [
        stages_fn(variables, b)[:3]
        for b, _ in data.eval_batches(images, run.eval.batch_size)
    ]
    n = len(images)
    return [
        np.concatenate([np.asarray(o[s]) for o in outs])[:n] for s in range(3)
    ]

  tic = time.perf_counter()
  outputs = {
      name: stage_outputs(images)
      for name, images in (('fit', fit), ('held_out', held_out), ('test',
                                                                  test.images))
  }
  extraction_s = time.perf_counter() - tic
  size = test.images.shape[1]
  sigma = evaluator_lib.map_settings(run.eval, size).residual_sigma
  result = dict(extraction_s=extraction_s, variants={})
  maps_of = {}
  variants = {
      k: v for k, v in VARIANTS.items() if not _ONLY.value or k in _ONLY.value
  }
  for name, (kind, stages, second, divisor) in variants.items():
    tic = time.perf_counter()
    grid = feature_gaussian.grid_size(size, divisor)
    pick = lambda split: [jnp.asarray(outputs[split][s - 1]) for s in stages]
    if kind == 'gaussian':
      channels = feature_gaussian.select_channels(
          [generator.encoder_widths[s - 1] for s in stages], second)
      feats = {
          split:
              np.asarray(
                  feature_gaussian.stack_features(pick(split), channels, grid))
          for split in outputs
      }
      moments = feature_gaussian.FeatureMoments()
      for i in range(0, len(feats['fit']), 16):
        moments.add(feats['fit'][i:i + 16])
      mean, precision = moments.statistics()
      cells = {
          split:
              np.asarray(
                  feature_gaussian.mahalanobis(
                      jnp.asarray(feats[split]), jnp.asarray(mean),
                      jnp.asarray(precision))) for split in ('held_out', 'test')
      }
    else:
      feats = {
          split: np.asarray(feature_knn.patch_features(pick(split), grid))
          for split in outputs
      }
      pool = feature_knn.PatchPool()
      pool.add(feats['fit'])
      bank = pool.memory_bank(
          feature_knn.KnnSettings(bank_size=second), feature_knn.coreset_key(),
          mesh)
      cells = {
          split: np.asarray(feature_knn.nearest_distances(feats[split], bank))
          for split in ('held_out', 'test')
      }
    maps = {
        split:
            np.asarray(
                anomaly_maps.upsample_and_blur(jnp.asarray(c), size, sigma))
        for split, c in cells.items()
    }
    maps_of[name] = maps
    result['variants'][name] = _scores(maps['test'], test, kind)
    result['variants'][name]['fit_and_test_s'] = time.perf_counter() - tic
    print(name, json.dumps(result['variants'][name]), flush=True)
  for gaussian in (n for n in variants if n.startswith('gaussian')):
    for knn in (n for n in variants if n.startswith('knn')):
      parts = {
          'feature_gaussian': maps_of[gaussian], 'feature_knn': maps_of[knn]
      }
      scales = combined_maps.normalisers(
          {k: v['held_out'] for k, v in parts.items()})
      combined = combined_maps.combine({k: v['test'] for k, v in parts.items()},
                                       scales)['combined_features']
      name = f'combined[{gaussian}+{knn}]'
      result['variants'][name] = _scores(combined, test, 'gaussian')
      print(name, json.dumps(result['variants'][name]), flush=True)
  with open(_OUT.value, 'w') as f:
    json.dump(result, f, indent=2)


def _scores(test_maps, test, kind):
  """Pixel AUROC, AU-PRO, image AUROC, and prior_normal's pixel metrics."""
  scores = (
      test_maps.max(axis=(1, 2)) if kind == 'knn' else np.asarray(
          anomaly_maps.image_score(jnp.asarray(test_maps))))
  low, high = test_maps.min(), test_maps.max()
  normalised = (test_maps - low) / max(high - low, 1e-12)
  prior = np.broadcast_to(normalised[test.labels == 0].mean(axis=0),
                          normalised.shape)
  return dict(
      pixel_auroc=pixel_metrics.pixel_auroc(normalised, test.masks),
      aupro=pixel_metrics.aupro(normalised, test.masks),
      image_auroc=image_metrics.image_auroc(scores, test.labels),
      prior_normal_pixel_auroc=pixel_metrics.pixel_auroc(prior, test.masks),
      prior_normal_aupro=pixel_metrics.aupro(prior, test.masks))


if __name__ == '__main__':
  app.run(main)
