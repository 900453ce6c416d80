"""The feature-kNN map (PatchCore) against brute-force numpy references."""

import jax
import numpy as np
import pytest
from scipy.spatial import distance

from cavga_jax.evaluation import fitting
from cavga_jax.evaluation import inference
from cavga_jax.maps import anomaly_maps
from cavga_jax.maps import combined_maps
from cavga_jax.maps import feature_knn
from cavga_jax.maps import fitted_map


def _brute_force_greedy(x: np.ndarray, size: int, start: int) -> np.ndarray:
  """Greedy k-center in float64 numpy: farthest point from those chosen."""
  chosen = [start]
  nearest = ((x - x[start])**2).sum(axis=1)
  for _ in range(size - 1):
    index = int(np.argmax(nearest))
    chosen.append(index)
    nearest = np.minimum(nearest, ((x - x[index])**2).sum(axis=1))
  return np.sort(chosen)


def test_coreset_equals_brute_force_greedy_and_keeps_the_size():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(600, 24)).astype(np.float32)  # D < projection: none
  key = jax.random.key(3)
  indices = feature_knn.greedy_coreset(x, 57, key, projection_dims=128)
  assert len(indices) == len(set(indices.tolist())) == 57
  _, start_key = jax.random.split(key)
  start = int(jax.random.randint(start_key, (), 0, 600, np.int32))
  np.testing.assert_array_equal(indices, _brute_force_greedy(x, 57, start))


def test_coreset_on_a_projection_keeps_the_size_and_covers_clusters():
  rng = np.random.default_rng(1)
  centres = rng.normal(scale=20.0, size=(8, 300))
  x = (centres[rng.integers(0, 8, 4000)] + rng.normal(size=(4000, 300))).astype(
      np.float32)
  indices = feature_knn.greedy_coreset(
      x, 8, jax.random.key(0), projection_dims=32)
  assert len(np.unique(indices)) == 8
  # The 8 farthest-first points land in 8 different clusters.
  labels = np.argmin(distance.cdist(x[indices], centres), axis=1)
  assert len(set(labels.tolist())) == 8
  assert len(feature_knn.greedy_coreset(x[:5], 8, jax.random.key(0))) == 5


@pytest.mark.parametrize('chunk', [1, 7, 4096])
def test_nearest_distances_equal_brute_force(chunk):
  rng = np.random.default_rng(2)
  bank = rng.normal(size=(40, 12)).astype(np.float32)
  features = rng.normal(size=(3, 5, 5, 12)).astype(np.float32)
  ours = feature_knn.nearest_distances(features, bank, chunk)
  reference = distance.cdist(
      features.reshape(-1, 12).astype(np.float64),
      bank.astype(np.float64)).min(axis=1)
  np.testing.assert_allclose(
      ours, reference.reshape(3, 5, 5), rtol=1e-4, atol=1e-4)


def test_patch_features_average_neighbourhoods_like_torch_avgpool():
  rng = np.random.default_rng(3)
  f = rng.normal(size=(1, 4, 4, 2)).astype(np.float32)
  ours = np.asarray(feature_knn.patch_features([f], 4, 3))
  padded = np.pad(f, ((0, 0), (1, 1), (1, 1), (0, 0)))
  # AvgPool2d(3, 1, 1) counts the zero padding (count_include_pad=True).
  expected = np.stack(
      [[padded[0, i:i + 3, j:j + 3].sum((0, 1)) / 9
        for j in range(4)]
       for i in range(4)])[None]
  np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-6)


def test_knn_map_of_the_evaluator_equals_brute_force():
  rng = np.random.default_rng(4)
  bank = rng.normal(size=(30, 6)).astype(np.float32)
  features = rng.normal(size=(2, 4, 4, 6)).astype(np.float32)
  predictions = fitting.outputs_with_fitted_maps(
      {
          'maps': {}, 'map_scores': {},
          inference.INPUTS: {feature_knn.NAME: features}
      }, fitting.FittedMaps(maps={feature_knn.NAME: dict(bank=bank)}),
      fitted_map.Context(16, anomaly_maps.MapSettings(residual_sigma=0.0)),
      {feature_knn.NAME: feature_knn.KnnSettings(chunk=5)})
  knn_map = predictions['maps'][feature_knn.NAME]
  assert knn_map.shape == (2, 16, 16)
  cells = distance.cdist(features.reshape(-1, 6), bank).min(1).reshape(2, 4, 4)
  # The distances are brute force; the upsampling is the residual maps' own.
  np.testing.assert_allclose(
      knn_map,
      anomaly_maps.upsample_and_blur(cells, 16, 0.0),
      rtol=1e-4,
      atol=1e-5)
  np.testing.assert_allclose(
      predictions['map_scores'][feature_knn.NAME],
      knn_map.max(axis=(1, 2)),
      rtol=1e-6)
  assert inference.INPUTS not in predictions


def test_memory_bank_is_the_coreset_of_the_pool():
  rng = np.random.default_rng(5)
  pool = feature_knn.PatchPool()
  batches = [rng.normal(size=(2, 3, 3, 4)).astype(np.float32) for _ in range(3)]
  for b in batches:
    pool.add(b)
  settings = feature_knn.KnnSettings(bank_size=10)
  bank = pool.memory_bank(settings, jax.random.key(0))
  everything = np.concatenate([b.reshape(-1, 4) for b in batches])
  assert bank.shape == (10, 4)
  # Every bank row is one of the pooled patches.
  assert distance.cdist(bank, everything).min(axis=1).max() == 0.0
  with pytest.raises(ValueError, match='no normal images'):
    feature_knn.PatchPool().memory_bank(settings, jax.random.key(0))


def test_combined_maps_standardise_on_normal_images_only():
  rng = np.random.default_rng(6)
  normal = {
      'feature_gaussian': rng.normal(5.0, 2.0, (4, 8, 8)),
      'feature_knn': rng.normal(-1.0, 0.5, (4, 8, 8))
  }
  scales = combined_maps.normalisers(normal)
  test = {
      'feature_gaussian': np.full((1, 8, 8), 9.0), 'feature_knn': np.full(
          (1, 8, 8), 0.0)
  }
  combined = combined_maps.combine(test, scales)
  assert set(combined) == {'combined_features'}  # the residual is missing
  expected = (
      (9.0 - normal['feature_gaussian'].mean())
      / normal['feature_gaussian'].std() +
      (0.0 - normal['feature_knn'].mean()) / normal['feature_knn'].std()) / 2
  np.testing.assert_allclose(combined['combined_features'], expected, rtol=1e-5)
