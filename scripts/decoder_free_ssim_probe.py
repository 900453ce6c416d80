"""The headline's SSIM part without the decoder? (issue 36, deploy speed)

  PYTHONPATH=. python scripts/decoder_free_ssim_probe.py --config=configs/mvtec.py \
      --config.data.root=../shared/data/bsdata_256 --config.data.category=bsdata \
      --workdir=/tmp/dfs/bsdata --out=docs/raw/decoder_free_ssim_bsdata.json

``combined_robust``'s local-structure part ``initial_ssim_calibrated`` is
the SSIM residual of the image against the *initial* decoder's output, a
random texture of the ImageNet encoder's features; the decoder is half of
``predict.py``'s scoring time (docs/benchmarks.md). Two decoder-free
references in its place, fixed before measuring:

* ``mean_image``: the mean of the fit images (the normal training images
  less the held-out ones), the same reference for every image;
* ``self_blur``: the image itself blurred (Gaussian, sigma 2 px per
  channel), so the residual is the image's own fine structure.

Each is scored exactly like the decoder's part: ``1 - SSIM`` at the
config's ``eval.ssim_scale``, blurred by ``eval.residual_sigma``, calibrated
per pixel on the fit images, then put in place of ``initial_ssim_calibrated``
in ``combined_robust`` (rule ``mean_tail``, normalisers of the held-out
images). The other two parts and the decoder's own part come from the fit
``evaluate.py --untrained --maps=headline`` saves in the workdir (fitted
and saved first if missing); ``decoder`` recomputes the headline from them
as a check. Per variant, the part alone and the combination: pixel AUROC,
AU-PRO and image AUROC (top-1 % mean image score)
and ``prior_normal``'s pixel AUROC. A measurement: nothing here changes a
map.
"""

from __future__ import annotations

import json

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from cavga_jax.evaluation import evaluator as evaluator_lib
from cavga_jax.evaluation import inference
from cavga_jax.evaluation import scoring
from cavga_jax.maps import anomaly_maps
from cavga_jax.maps import calibration
from cavga_jax.maps import combined_maps
from cavga_jax.metrics import image_metrics
from cavga_jax.metrics import pixel_metrics
from cavga_jax.programs import evaluate as eval_lib
from cavga_jax.programs import runtime
from cavga_jax.training import train_state

_CONFIG = runtime.define_config_flag('The run configuration.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'The run workdir.')
_OUT = flags.DEFINE_string('out', None, 'Where to write the JSON record.')
flags.mark_flags_as_required(['config', 'workdir'])

FEATURE_PARTS = ('feature_gaussian_shrunk', 'feature_knn')
DECODER_PART = 'initial_ssim_calibrated'
BLUR_SIGMA = 2.0  # self_blur's Gaussian, px


def _blur_channels(x: jax.Array, sigma: float) -> jax.Array:
  """(B, S, S, C) -> each channel blurred (reflect padding)."""
  batch, size, _, channels = x.shape
  planes = jnp.moveaxis(x, -1, 1).reshape(batch * channels, size, size)
  blurred = anomaly_maps.gaussian_blur(planes, sigma)
  return jnp.moveaxis(blurred.reshape(batch, channels, size, size), 1, -1)


def main(argv):
  del argv
  config, workdir = _CONFIG.value, _WORKDIR.value
  config.eval.maps = 'headline'
  config.eval.map = 'combined_robust'
  runtime.enable_compilation_cache()
  made, evaluator = eval_lib.evaluation_setup(config, workdir, untrained=True)
  state, test = made.state, made.test_ds
  fitted = eval_lib.fitted_maps(config, made.run.eval, workdir, evaluator,
                                state, made.step, True)

  def library_step(batch):
    return evaluator.outputs_with_fitted_maps(
        evaluator.eval_step(state.gen_params, state.gen_batch_stats, batch,
                            evaluator.feature_variables), fitted)['maps']

  parts = FEATURE_PARTS + (DECODER_PART,)

  def library_maps(images, what):
    maps = inference.predict(library_step, images, evaluator.batch_size,
                             evaluator.mesh, what)
    return {name: maps[name] for name in parts}

  held = library_maps(evaluator.held_out, 'held-out images')
  tests = library_maps(test.images, 'test images')
  settings = evaluator_lib.map_settings(made.run.eval, test.images.shape[1])
  mean_image = jnp.mean(
      train_state.images_to_float(jnp.asarray(evaluator.fit_images)), axis=0)
  references = {
      'mean_image': lambda x: jnp.broadcast_to(mean_image, x.shape),
      'self_blur': lambda x: _blur_channels(x, BLUR_SIGMA),
  }

  def raw_maps(reference):
    """(images, what) -> (N, S, S) uncalibrated maps, one compiled step."""
    step = jax.jit(lambda batch: anomaly_maps.residual_ssim_smooth_map(
        dict(
            images=train_state.images_to_float(batch),
            reconstruction=reference(train_state.images_to_float(batch))),
        settings))
    return lambda images, what: inference.predict(
        step, images, evaluator.batch_size, evaluator.mesh, what)

  for name, reference in references.items():
    maps_of = raw_maps(reference)
    moments = calibration.PixelMoments()
    moments.add(maps_of(evaluator.fit_images, f'{name}: fit images'))
    mean, scale = moments.statistics()
    held[name] = calibration.calibrate(
        maps_of(evaluator.held_out, f'{name}: held-out images'), mean, scale)
    tests[name] = calibration.calibrate(
        maps_of(test.images, f'{name}: test images'), mean, scale)
    print(
        f'{name}: calibrated on {len(evaluator.fit_images)} images', flush=True)

  normalisers = combined_maps.normalisers(held)

  def metrics(values):
    scores = np.asarray(anomaly_maps.image_score(jnp.asarray(values)))
    prior = scoring.prior_maps({'m': values}, 'm', test.labels)
    return dict(
        pixel_auroc=pixel_metrics.pixel_auroc(values, test.masks),
        aupro=pixel_metrics.aupro(values, test.masks),
        image_auroc=image_metrics.image_auroc(scores, test.labels),
        prior_normal_pixel_auroc=pixel_metrics.pixel_auroc(
            prior[anomaly_maps.PRIOR_NORMAL], test.masks))

  record = dict(category=config.data.category, variants={})
  for name in (DECODER_PART, *references):
    combined = combined_maps.combine_parts(tests, normalisers, FEATURE_PARTS +
                                           (name,), combined_maps.MEAN_TAIL)
    record['variants'][name] = dict(
        part=metrics(tests[name]), combined=metrics(combined))
    print(name, json.dumps(record['variants'][name]), flush=True)
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump(record, f, indent=1)


if __name__ == '__main__':
  app.run(main)
