"""FactorVAE score and MIG on known representations of known factors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn import metrics as sk_metrics

from cavga_jax.data import factor_dataset
from cavga_jax.data import sprites
from cavga_jax.vae import disentanglement

_SIZES = (3, 4, 5, 6)


class _PixelFactors(factor_dataset.FactorDataset):
  """A tiny full grid whose images carry their factors in the first pixels.

  Image i is black except row 0, columns 0..F-1, which hold the factor
  values of example i; representations read them back, so a test can build
  a representation with any known relation to the factors.
  """

  def __init__(self, sizes=_SIZES, keep=None):
    self.factor_names = tuple(f'f{k}' for k in range(len(sizes)))
    self.factor_sizes = tuple(sizes)
    table = np.array(list(itertools.product(*map(range, sizes))), np.int64)
    self._factors = table if keep is None else table[keep(table)]

  @property
  def factors(self):
    return self._factors

  def images(self, indices):
    out = np.zeros((len(indices), 64, 64, 1), np.uint8)
    out[:, 0, :len(self.factor_sizes), 0] = self._factors[indices]
    return out


def _read_factors(images):
  return images[:, 0, :len(_SIZES), 0].astype(np.float64)


def _copy(images):
  """The factors scaled to [0, 1]: perfectly disentangled."""
  return _read_factors(images) / (np.array(_SIZES) - 1)


def _noise_fn(dims=4, seed=0):
  """Codes that ignore the image."""
  rng = np.random.default_rng(seed)
  return lambda images: rng.normal(size=(len(images), dims))


def test_factor_vae_perfect_representation():
  scores = disentanglement.factor_vae_score(
      _copy,
      _PixelFactors(),
      np.random.default_rng(0),
      batch_size=32,
      num_train=200,
      num_eval=200,
      num_variance_estimate=500)
  assert scores == {
      'train_accuracy': 1.0, 'eval_accuracy': 1.0, 'num_active_dims': 4
  }


def test_factor_vae_noise_is_at_chance():
  scores = disentanglement.factor_vae_score(
      _noise_fn(),
      _PixelFactors(),
      np.random.default_rng(1),
      batch_size=32,
      num_train=300,
      num_eval=600,
      num_variance_estimate=500)
  # The vote's factor is independent of the winning dim: 1/4 +- 0.018 (1 sd).
  assert abs(scores['eval_accuracy'] - 0.25) < 0.08
  assert scores['num_active_dims'] == 4


def test_factor_vae_prunes_collapsed_dims():

  def with_collapsed(images):
    codes = _copy(images)
    tiny = 1e-3 * np.sin(np.arange(len(images)))[:, None]
    return np.concatenate([tiny, codes, np.zeros((len(images), 1))], axis=1)

  scores = disentanglement.factor_vae_score(
      with_collapsed,
      _PixelFactors(),
      np.random.default_rng(2),
      batch_size=16,
      num_train=100,
      num_eval=100,
      num_variance_estimate=300)
  assert scores == {
      'train_accuracy': 1.0, 'eval_accuracy': 1.0, 'num_active_dims': 4
  }
  constant = disentanglement.factor_vae_score(
      lambda images: np.ones((len(images), 3)),
      _PixelFactors(),
      np.random.default_rng(2),
      batch_size=16,
      num_train=10,
      num_eval=10,
      num_variance_estimate=100)
  assert constant == {
      'train_accuracy': 0.0, 'eval_accuracy': 0.0, 'num_active_dims': 0
  }


def test_factor_vae_entangled_representation_is_worse():
  # Dims 0 and 1 both mix factors 0 and 1; factors 2 and 3 are clean.
  def mixed(images):
    codes = _copy(images)
    codes[:, :2] = codes[:, :2] @ np.array([[1.0, 1.0], [1.0, -1.0]])
    return codes

  scores = disentanglement.factor_vae_score(
      mixed,
      _PixelFactors(),
      np.random.default_rng(3),
      batch_size=32,
      num_train=200,
      num_eval=200,
      num_variance_estimate=500)
  assert 0.4 < scores['eval_accuracy'] < 0.9


def test_mig_perfect_and_noise():
  perfect = disentanglement.mig_score(
      _copy, _PixelFactors(), np.random.default_rng(4), num_samples=2000)
  assert perfect['mig'] > 0.9
  assert min(perfect['mig_per_factor'].values()) > 0.9
  assert perfect['skipped_factors'] == []
  assert perfect['mutual_info'].shape == (4, 4)
  # Each code dim carries its own factor: the MI matrix is near-diagonal.
  np.testing.assert_allclose(
      np.diag(perfect['mutual_info']), perfect['factor_entropy'], rtol=1e-9)
  np.testing.assert_allclose(
      perfect['factor_entropy'], np.log(_SIZES), atol=0.02)
  noise = disentanglement.mig_score(
      _noise_fn(), _PixelFactors(), np.random.default_rng(5), num_samples=2000)
  assert 0.0 <= noise['mig'] < 0.1


def test_mig_duplicated_factor_has_no_gap():

  def duplicated(images):
    codes = _copy(images)
    return np.concatenate([codes, codes[:, :1]**2], axis=1)

  scores = disentanglement.mig_score(
      duplicated, _PixelFactors(), np.random.default_rng(6), num_samples=2000)
  gaps = scores['mig_per_factor']
  assert gaps['f0'] < 0.1
  assert min(gaps['f1'], gaps['f2'], gaps['f3']) > 0.9
  assert scores['mig'] < 0.8


def test_mig_skips_a_constant_factor():
  dataset = _PixelFactors(keep=lambda table: table[:, 2] == 3)
  scores = disentanglement.mig_score(
      _copy, dataset, np.random.default_rng(7), num_samples=500)
  assert scores['skipped_factors'] == ['f2']
  assert sorted(scores['mig_per_factor']) == ['f0', 'f1', 'f3']
  assert scores['mig'] == pytest.approx(
      np.mean(list(scores['mig_per_factor'].values())))
  assert scores['mig'] > 0.9


def test_mutual_information_matches_sklearn():
  rng = np.random.default_rng(8)
  for n, ka, kb in [(50, 2, 3), (1000, 20, 6), (300, 7, 40), (10, 1, 4)]:
    a = rng.integers(0, ka, size=n)
    b = (a * 3 + rng.integers(0, kb, size=n)) % kb  # dependent on a
    assert disentanglement.mutual_information(a, b) == pytest.approx(
        sk_metrics.mutual_info_score(a, b), abs=1e-12)
    assert disentanglement.entropy(b) == pytest.approx(
        sk_metrics.mutual_info_score(b, b), abs=1e-12)
  a = rng.integers(0, 5, size=200)
  assert disentanglement.mutual_information(a, a) == pytest.approx(
      disentanglement.entropy(a))


def test_discretize_is_an_equal_width_histogram():
  rng = np.random.default_rng(9)
  codes = np.stack(
      [rng.normal(size=500),
       rng.uniform(size=500),
       np.full(500, 2.0)], axis=1)
  bins = disentanglement.discretize(codes, num_bins=20)
  assert bins.min() >= 0 and bins.max() < 20
  for j in range(3):
    np.testing.assert_array_equal(
        np.bincount(bins[:, j], minlength=20),
        np.histogram(codes[:, j], 20)[0])
  assert len(np.unique(bins[:, 2])) == 1


def test_representations_are_chunked_with_one_shape():
  shapes = []

  def record(images):
    shapes.append(images.shape)
    return _copy(images)

  dataset = _PixelFactors()
  indices = np.arange(70) * 5
  codes = disentanglement.representations(
      record, dataset, indices, chunk_size=32)
  assert shapes == [(32, 64, 64, 1)] * 3
  np.testing.assert_array_equal(codes, _copy(dataset.images(indices)))
  with pytest.raises(ValueError, match='codes'):
    disentanglement.representations(
        lambda x: np.zeros((3, 2)), dataset, indices, chunk_size=32)
  with pytest.raises(ValueError, match='non-finite'):
    disentanglement.representations(lambda x: np.full((len(x), 2), np.nan),
                                    dataset, indices)


def test_metrics_on_rendered_sprites():
  """A real image representation: the white pixels' centre and count."""

  def centre_and_area(images):
    mass = images[..., 0].astype(np.float64)
    grid = np.arange(64.0)
    total = mass.sum(axis=(1, 2))
    return np.stack(
        [(mass.sum(axis=1) * grid).sum(axis=1) / total,
         (mass.sum(axis=2) * grid).sum(axis=1) / total, total / 255],
        axis=1)

  dataset = sprites.RenderedSprites(orientations=4, positions=8)
  mig = disentanglement.mig_score(
      centre_and_area, dataset, np.random.default_rng(10), num_samples=1000)
  gaps = mig['mig_per_factor']
  assert gaps['pos_x'] > 0.9 and gaps['pos_y'] > 0.9
  assert gaps['orientation'] < 0.1  # no dim sees the angle
  # 3 dims can each predict one of the 5 factors: at most about 3/5.
  factor_vae = disentanglement.factor_vae_score(
      centre_and_area,
      dataset,
      np.random.default_rng(11),
      batch_size=32,
      num_train=100,
      num_eval=100,
      num_variance_estimate=500)
  assert factor_vae['num_active_dims'] == 3
  assert 0.4 < factor_vae['eval_accuracy'] < 0.75
