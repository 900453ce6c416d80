"""The feature-Gaussian map (maps.feature_gaussian) and its evaluation."""

import dataclasses

import jax
import numpy as np
import pytest

from cavga_jax import config_checks
from cavga_jax.errors import CavgaError
from cavga_jax.evaluation import fitting
from cavga_jax.evaluation import inference
from cavga_jax.maps import anomaly_maps
from cavga_jax.maps import feature_gaussian
from cavga_jax.maps import fitted_map
from cavga_jax.metrics import pixel_metrics
from cavga_jax.models import cavga
from conftest import dataset_from_masks


def test_moments_match_numpy_mean_and_regularised_covariance_in_any_order():
  rng = np.random.default_rng(0)
  features = rng.normal(size=(11, 2, 3, 4)) * [1.0, 2.0, 0.5, 3.0] + 5.0
  forward, backward = (feature_gaussian.FeatureMoments(),
                       feature_gaussian.FeatureMoments())
  for batch in np.array_split(features, 3):
    forward.add(batch)
  for batch in np.array_split(features, 4)[::-1]:
    backward.add(batch)
  mean, precision = forward.statistics()
  assert mean.shape == (2, 3, 4) and precision.shape == (2, 3, 4, 4)
  for h in range(2):
    for w in range(3):
      cells = features[:, h, w]
      np.testing.assert_allclose(mean[h, w], cells.mean(0), rtol=1e-5)
      covariance = (
          np.cov(cells, rowvar=False)
          + feature_gaussian.REGULARIZATION * np.eye(4))
      np.testing.assert_allclose(
          precision[h, w], np.linalg.inv(covariance), rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(
      backward.statistics()[1], precision, rtol=1e-4, atol=1e-5)


def test_shrinkage_adds_the_mean_variance_over_all_cells_to_each_diagonal():
  rng = np.random.default_rng(1)
  # Cells of very different scales; one nearly constant (the case it is for).
  scales = np.array([1.0, 3.0, 1e-3])[None, :, None, None]
  features = rng.normal(size=(9, 3, 1, 4)) * scales + 2.0
  moments = feature_gaussian.FeatureMoments()
  moments.add(features)
  shrinkage = 0.1
  mean, precision = moments.statistics(shrinkage)
  covariances = [np.cov(features[:, h, 0], rowvar=False) for h in range(3)]
  # v: the mean of the unbiased variances over every cell and channel.
  v = np.mean([np.diag(c) for c in covariances])
  for h in range(3):
    expected = np.linalg.inv(covariances[h]
                             + (feature_gaussian.REGULARIZATION + shrinkage * v)
                             * np.eye(4))
    np.testing.assert_allclose(precision[h, 0], expected, rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(mean, features.mean(0), rtol=1e-6)
  # No shrinkage is the map as it was, bit for bit.
  plain = moments.statistics()
  zero = moments.statistics(0.0)
  np.testing.assert_array_equal(plain[1], zero[1])
  assert feature_gaussian.SHRUNK_MAP.settings.shrinkage == shrinkage
  assert feature_gaussian.MAP.settings.shrinkage == 0.0


def test_both_gaussians_share_one_accumulator_and_fit_as_if_alone(monkeypatch):
  rng = np.random.default_rng(2)
  batches = [rng.normal(size=(5, 2, 2, 3)) for _ in range(3)]
  adds = []
  original = feature_gaussian.FeatureMoments.add
  monkeypatch.setattr(feature_gaussian.FeatureMoments, 'add', lambda self, f:
                      (adds.append(1), original(self, f)))
  names = (feature_gaussian.NAME, feature_gaussian.SHRUNK_NAME)
  settings = {
      feature_gaussian.NAME: feature_gaussian.MAP.settings,
      feature_gaussian.SHRUNK_NAME: feature_gaussian.SHRUNK_MAP.settings
  }
  both = fitting.fit_statistics(({name: b for name in names} for b in batches),
                                settings, None)
  assert len(adds) == len(batches)  # one accumulator, filled once
  for name in names:
    alone = fitting.fit_statistics(({name: b} for b in batches),
                                   {name: settings[name]}, None)
    for key in ('mean', 'precision'):
      np.testing.assert_array_equal(both.maps[name][key], alone.maps[name][key])
  assert not np.array_equal(both.maps[names[0]]['precision'],
                            both.maps[names[1]]['precision'])
  # Other features (another channel count) get their own accumulator.
  other = dict(settings)
  other[names[1]] = dataclasses.replace(settings[names[1]], dims=2)
  adds.clear()
  fitting.fit_statistics(({name: b for name in names} for b in batches), other,
                         None)
  assert len(adds) == 2 * len(batches)


def test_no_normal_features_is_an_error():
  with pytest.raises(ValueError, match='no normal images'):
    feature_gaussian.FeatureMoments().statistics()


def test_mahalanobis_by_hand():
  # One cell, precision diag(1/4, 1): (2, 3) from mean (0, 1) -> sqrt(1 + 4).
  features = np.array([[[[2.0, 3.0]]], [[[0.0, 1.0]]]], np.float32)
  mean = np.array([[[0.0, 1.0]]], np.float32)
  precision = np.array([[np.diag([0.25, 1.0])]], np.float32)
  distances = np.asarray(
      feature_gaussian.mahalanobis(features, mean, precision))
  np.testing.assert_allclose(distances[:, 0, 0], [np.sqrt(5.0), 0.0], atol=1e-6)


def test_channel_subset_is_fixed_sorted_and_keeps_all_when_few():
  first = feature_gaussian.select_channels((64, 128), 100)
  assert len(first) == 100 and np.all(np.diff(first) > 0)
  assert first.max() < 192
  np.testing.assert_array_equal(
      first, feature_gaussian.select_channels((64, 128), 100))
  np.testing.assert_array_equal(
      feature_gaussian.select_channels((8, 16), 100), np.arange(24))


def _defect_dataset(n=4, size=16):
  masks = np.zeros((n, size, size), bool)
  masks[2, 4:8, 4:8] = True
  masks[3, 8:12, 2:6] = True
  return dataset_from_masks(masks)


def test_features_unusual_for_their_cell_find_the_defect():
  # Normal features vary a lot in some channels and cells; the defects shift
  # a channel that is steady in normal images. The feature map ranks every
  # defect pixel above every normal one (AU-PRO, pixel AUROC 1).
  rng = np.random.default_rng(1)
  grid, dims = 4, 3
  scale = np.array([5.0, 0.1, 1.0])
  normal = rng.normal(size=(40, grid, grid, dims)) * scale
  test = rng.normal(size=(4, grid, grid, dims)) * scale * 0.5
  dataset = _defect_dataset()
  test[2, 1, 1, 1] += 3.0  # cell (1, 1) covers pixels 4:8 at 16 px
  test[3, 2, 0, 1] += 3.0  # cell (2, 0) covers pixels 8:12, 0:4
  moments = feature_gaussian.FeatureMoments()
  moments.add(normal)
  mean, precision = moments.statistics()
  predictions = fitting.outputs_with_fitted_maps(
      {
          'maps': {}, 'map_scores': {},
          inference.INPUTS: {feature_gaussian.NAME: test.astype(np.float32)}
      },
      fitting.FittedMaps(
          maps={feature_gaussian.NAME: dict(mean=mean, precision=precision)}),
      fitted_map.Context(16, anomaly_maps.MapSettings(residual_sigma=0.0)),
      {feature_gaussian.NAME: feature_gaussian.FeatureSettings()})
  assert inference.INPUTS not in predictions
  feature_map = predictions['maps'][feature_gaussian.NAME]
  assert feature_map.shape == (4, 16, 16)
  cells = feature_map[:, 2::4, 2::4]  # cell centres, away from blending
  assert cells[2, 1, 1] > cells[:2].max() and cells[3, 2, 0] > cells[:2].max()
  assert pixel_metrics.pixel_auroc(cells, dataset.masks[:, 2::4, 2::4]) == 1.0
  scores = predictions['map_scores'][feature_gaussian.NAME]
  assert scores.shape == (4,) and scores[2:].min() > scores[:2].max()


def test_encode_stages_equal_encode_up_to_each_stage():
  # ResNet: stage 1 includes the stem, so continuing from a stage must skip
  # it (the DCGAN encoder shares the start/stop loop).
  generator = cavga.CAVGAGenerator(
      variant='R',
      image_size=32,
      latent_channels=4,
      encoder_widths=(4, 8, 8, 16),
      decoder_widths=(16, 8, 8, 4, 4),
      conv_impl='lax')
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
  variables = jax.jit(
      generator.init, static_argnums=(2, 3))(jax.random.key(1), x, None, False)

  @jax.jit
  def both(variables, x):
    stages = generator.apply(
        variables, x, False, (1, 2, 4), method='encode_stages')
    expected = [
        generator.apply(variables, x, False, stage, method='encode')
        for stage in (1, 2, 4)
    ]
    return stages, expected

  for output, expected in zip(*both(variables, x)):
    np.testing.assert_allclose(output, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('field, value, expected', [
    ('eval.feature_stages', (2, 1), 'must be increasing encoder stages'),
    ('eval.feature_stages', (), 'must be increasing encoder stages'),
    ('eval.feature_stages', (0, 1), 'must be increasing encoder stages'),
    ('eval.feature_stages', (3, 5), 'must be increasing encoder stages'),
    ('eval.feature_dims', 0, 'config.eval.feature_dims=0 must be an integer'),
])
def test_bad_feature_settings_are_one_line_errors(tiny_config, field, value,
                                                  expected):
  section, name = field.split('.')
  tiny_config[section][name] = value
  with pytest.raises(CavgaError) as info:
    config_checks.check_config(tiny_config)
  assert expected in str(info.value) and '\n' not in str(info.value)


def test_feature_headline_needs_calibration(tiny_config):
  tiny_config.eval.map = feature_gaussian.NAME
  config_checks.check_config(tiny_config)
  tiny_config.eval.calibrate = False
  with pytest.raises(CavgaError, match='needs config.eval.calibrate=True'):
    config_checks.check_config(tiny_config)
