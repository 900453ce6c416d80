"""Issue 36's local-contrast probe: the initial decoder's SSIM at another scale.

The headline's local-contrast part ``initial_ssim_calibrated`` is the SSIM
residual of the *initial* decoder (a random texture, not a reconstruction,
so the map measures local structure) with SSIM's Gaussian window (sigma 1.5 px),
blurred like the other maps and calibrated per pixel on the normal training
images. This adds ``ssim_scaled``: the same on the image and reconstruction
resized by ``--scale`` (0.5: the same window at half resolution, twice the
scale; 2: half the scale), resized back, blurred and calibrated the same
way, and scores, against the headline:

  * ``headline+scaled``: the headline's three parts and ``ssim_scaled``;
  * ``scaled_for_ssim``: ``ssim_scaled`` in place of the headline's SSIM;

each under the headline's rule (``mean_tail``, normalisers of the held-out
normal images, ``combined_maps``). The three parts' maps come from
``scripts/image_score_variants.py``'s cache in the same workdir (run it
first, both with ``--config.eval.ssim_scale=1``, the scale of those
parts before ``configs/mvtec.py`` chose 2); the headline is recomputed from
them as a check.

  PYTHONPATH=. python scripts/ssim_scale_variant.py --config=configs/mvtec.py \
      --config.data.root=../shared/data/bsdata_256 --config.data.category=bsdata \
      --config.eval.ssim_scale=1 --workdir=/tmp/isv/bsdata --scale=0.5 --out=docs/raw/ssim_scale_0.5_bsdata.json
"""

from __future__ import annotations

import dataclasses
import json
import os

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np
from sklearn import metrics as sk_metrics

from cavga_jax import config_checks
from cavga_jax.evaluation import evaluator as evaluator_lib
from cavga_jax.evaluation import fitting
from cavga_jax.maps import anomaly_maps
from cavga_jax.maps import calibration
from cavga_jax.maps import combined_maps
from cavga_jax.metrics import pixel_metrics
from cavga_jax.models import layers
from cavga_jax.training import run_setup
from cavga_jax.training import train_state

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/mvtec.py')
_WORKDIR = flags.DEFINE_string('workdir', None, 'workdir with the maps cache')
_OUT = flags.DEFINE_string('out', None, 'JSON file of the results')
_SCALE = flags.DEFINE_float('scale', 0.5, 'resize factor of the SSIM input')
PARTS = ('feature_gaussian_shrunk', 'feature_knn', 'initial_ssim_calibrated')


def main(argv):
  del argv
  config = _CONFIG.value
  run = config_checks.check_config(config)
  made = run_setup.setup(run, _WORKDIR.value, restore=True, untrained=True)
  generator = made.generator
  variables = made.state.generator_variables()
  test = made.test_ds
  size = test.images.shape[1]
  settings = evaluator_lib.map_settings(run.eval, size)

  def scaled(images):
    # The library's map at this scale (``eval.ssim_scale``), uncalibrated.
    x = train_state.images_to_float(images)
    outputs = dict(generator.apply(variables, x, None, False), images=x)
    return anomaly_maps.residual_ssim_smooth_map(
        outputs, dataclasses.replace(settings, ssim_scale=_SCALE.value))

  scaled = jax.jit(
      scaled, compiler_options=layers.compiler_options(generator.conv_impl))

  def maps_of(images):
    return np.concatenate([
        np.asarray(scaled(images[i:i + 16])) for i in range(0, len(images), 16)
    ])

  fit_images, held_images = fitting.split_held_out(
      evaluator_lib.normal_training_images(made.train_ds),
      run.eval.threshold_holdout)
  moments = calibration.PixelMoments()
  for i in range(0, len(fit_images), 16):
    moments.add(maps_of(fit_images[i:i + 16]))
  mean, scale = moments.statistics()
  cache = np.load(os.path.join(_WORKDIR.value, 'image_score_maps.npz'))
  held = {p: cache[f'held_{p}'] for p in PARTS}
  tests = {p: cache[f'test_{p}'] for p in PARTS}
  held['ssim_scaled'] = calibration.calibrate(maps_of(held_images), mean, scale)
  tests['ssim_scaled'] = calibration.calibrate(
      maps_of(test.images), mean, scale)
  scales = combined_maps.normalisers(held)
  masks, labels = np.asarray(test.masks), np.asarray(test.labels)

  def scores(maps):
    flat = maps.reshape(len(maps), -1)
    k = max(1, int(round(flat.shape[1] * 0.01)))
    top = np.sort(flat, axis=1)[:, -k:].mean(axis=1)
    # prior_normal: the mean normal test map, the same for every image.
    prior = np.broadcast_to(np.mean(maps[labels == 0], axis=0), masks.shape)
    return dict(
        pixel_auroc=pixel_metrics.pixel_auroc(maps, masks),
        aupro=pixel_metrics.aupro(maps, masks),
        image_auroc=float(sk_metrics.roc_auc_score(labels, top)),
        prior_normal_pixel_auroc=pixel_metrics.pixel_auroc(prior, masks))

  variants = {
      'ssim_scaled':
          tests['ssim_scaled'],
      'headline':
          combined_maps.combine_parts(tests, scales, PARTS,
                                      combined_maps.MEAN_TAIL),
      'headline+scaled':
          combined_maps.combine_parts(tests, scales, PARTS + ('ssim_scaled',),
                                      combined_maps.MEAN_TAIL),
      'scaled_for_ssim':
          combined_maps.combine_parts(tests, scales, PARTS[:2] +
                                      ('ssim_scaled',),
                                      combined_maps.MEAN_TAIL),
  }
  results = {name: scores(maps) for name, maps in variants.items()}
  results['scale'] = _SCALE.value
  print(json.dumps(results, indent=1))
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  flags.mark_flag_as_required('workdir')
  app.run(main)
