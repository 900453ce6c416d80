"""Normal-calibrated maps: per-pixel moments, z-scores, the evaluator's maps."""

import jax
import numpy as np
import pytest

from cavga_jax import config_checks
from cavga_jax import typed_config
from cavga_jax.errors import CavgaError
from cavga_jax.evaluation import evaluator as evaluator_lib
from cavga_jax.evaluation import fitting
from cavga_jax.evaluation import inference
from cavga_jax.maps import calibration
from cavga_jax.maps import fitted_map
from cavga_jax.programs import train as train_lib


def _normal_maps(rng, n=12, size=8):
  # Residual-like maps: large and variable on the left half ("a rim that is
  # always hard"), small and steady on the right.
  maps = rng.normal(0.1, 0.01, (n, size, size))
  maps[:, :, :size // 2] = rng.normal(1.0, 0.2, (n, size, size // 2))
  return maps.astype(np.float32)


def test_pixel_moments_match_numpy_over_batches_in_any_order():
  rng = np.random.default_rng(0)
  maps = _normal_maps(rng)
  forward, backward = calibration.PixelMoments(), calibration.PixelMoments()
  for batch in np.array_split(maps, 3):
    forward.add(batch)
  for batch in np.array_split(maps, 4)[::-1]:
    backward.add(batch)
  mean, scale = forward.statistics()
  np.testing.assert_allclose(mean, maps.mean(0), rtol=1e-5)
  std = maps.std(0)
  np.testing.assert_allclose(
      scale, np.maximum(std, calibration.STD_FLOOR * std.mean()), rtol=1e-4)
  np.testing.assert_allclose(backward.statistics()[0], mean, rtol=1e-6)


def test_std_floor_keeps_constant_pixels_finite():
  maps = np.ones((5, 4, 4), np.float32)
  maps[:, 0, 0] = np.arange(5)  # one pixel varies, the rest never do
  moments = calibration.PixelMoments()
  moments.add(maps)
  mean, scale = moments.statistics()
  assert np.all(scale > 0) and np.isfinite(scale).all()
  assert scale[0, 0] == pytest.approx(np.std(np.arange(5)), rel=1e-5)
  assert scale[1, 1] == pytest.approx(
      calibration.STD_FLOOR * np.std(np.arange(5)) / 16, rel=1e-4)
  z = calibration.calibrate(maps, mean, scale)
  np.testing.assert_allclose(z[:, 1:, 1:], 0.0, atol=1e-6)


def test_no_normal_images_is_an_error():
  with pytest.raises(ValueError, match='no normal images'):
    calibration.PixelMoments().statistics()


def test_calibration_finds_a_defect_that_the_raw_residual_misses():
  # A small defect on the steady right half raises the residual less than
  # the left half's normal variation: the raw map ranks it below normal
  # pixels, the calibrated map above all of them.
  rng = np.random.default_rng(1)
  normal = _normal_maps(rng)
  test = _normal_maps(rng, n=4)
  masks = np.zeros(test.shape, bool)
  masks[2:, 2:4, 5:7] = True
  test[masks] += 0.3
  moments = calibration.PixelMoments()
  moments.add(normal)
  mean, scale = moments.statistics()
  predictions = fitting.outputs_with_fitted_maps(
      {
          'maps': dict(residual=test), 'map_scores': {},
          inference.INPUTS: {'residual_calibrated': test}
      },
      fitting.FittedMaps(
          maps={'residual_calibrated': dict(mean=mean, scale=scale)}),
      fitted_map.Context(8), {})
  calibrated = predictions['maps']['residual_calibrated']
  from sklearn.metrics import roc_auc_score  # pylint: disable=g-import-not-at-top
  assert roc_auc_score(masks.ravel(), test.ravel()) < 0.6
  assert roc_auc_score(masks.ravel(), calibrated.ravel()) == 1.0
  scores = predictions['map_scores']['residual_calibrated']
  assert scores.shape == (4,) and scores[2:].min() > scores[:2].max()


def test_calibrated_headline_needs_calibration(tiny_config):
  tiny_config.eval.map = 'residual_calibrated'
  config_checks.check_config(tiny_config)
  tiny_config.eval.calibrate = False
  with pytest.raises(CavgaError, match='needs config.eval.calibrate=True'):
    config_checks.check_config(tiny_config)


def test_normal_step_gives_the_eval_steps_maps_and_features(tiny_config):
  # The pass over the normal images skips Grad-CAM but must measure the same
  # maps and features as the test pass.
  generator, _ = train_lib.build_models(tiny_config)
  images = np.random.default_rng(0).integers(
      0, 256, (2, 32, 32, 3), dtype=np.uint8)
  variables = jax.jit(
      generator.init, static_argnums=(2, 3))(jax.random.key(0),
                                             images.astype(np.float32), None,
                                             False)
  eval_settings = typed_config.from_config(tiny_config).eval
  settings = evaluator_lib.map_settings(eval_settings, images.shape[1])
  fitted = evaluator_lib.fitted_settings(eval_settings)
  args = (variables['params'], variables['batch_stats'], images)
  full = jax.jit(inference.make_eval_step(generator, settings, fitted))(*args)
  normal = jax.jit(inference.make_normal_step(generator, settings,
                                              fitted))(*args)
  assert set(normal) == set(full[inference.INPUTS]) == set(fitted)
  for unit in calibration.MAPS:
    # initial_ssim_calibrated reads the feature networks' reconstruction:
    # here (no feature_variables) the evaluated ones, the same SSIM map.
    base = unit.parts[0] if unit.parts else 'residual_ssim_smooth'
    np.testing.assert_allclose(
        normal[unit.name], full['maps'][base], rtol=1e-5, atol=1e-6)
  # Tiny encoder stages 1-2 have 8 + 16 channels, fewer than feature_dims:
  # all kept, on a grid of 32 px / 4.
  assert full[inference.INPUTS]['feature_gaussian'].shape == (2, 8, 8, 24)
  for name in fitted:
    np.testing.assert_allclose(
        normal[name], full[inference.INPUTS][name], rtol=1e-5, atol=1e-6)
  # The paper's evaluation alone (what the benchmarks time against the
  # PyTorch peer) gives the same 1 - A and score as the full step.
  paper = jax.jit(
      inference.make_eval_step(generator, map_names=('attention',)))(*args)
  assert set(paper['maps']) == {'attention'}
  np.testing.assert_allclose(
      paper['maps']['attention'],
      full['maps']['attention'],
      rtol=1e-5,
      atol=1e-6)
  np.testing.assert_allclose(paper['score'], full['score'], rtol=1e-6)
  tiny_config.eval.calibrate = False
  eval_settings = typed_config.from_config(tiny_config).eval
  assert evaluator_lib.feature_settings(eval_settings) is None
  assert evaluator_lib.fitted_settings(eval_settings) == {}
