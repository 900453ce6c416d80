"""Ground-truth-factor datasets: the rendered grid and TFDS dsprites."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow_datasets as tfds

from cavga_jax.data import sprite_renderer
from cavga_jax.data import sprites
from cavga_jax.errors import DataError

_NUM_EXAMPLES = 48


def _mass_centre(images: np.ndarray) -> np.ndarray:
  """(n, 2) (row, column) centres of the white pixels of (n, 64, 64, 1)."""
  mass = images[..., 0].astype(np.float64)
  grid = np.arange(64, dtype=np.float64)
  total = mass.sum(axis=(1, 2))
  rows = (mass.sum(axis=2) * grid).sum(axis=1) / total
  cols = (mass.sum(axis=1) * grid).sum(axis=1) / total
  return np.stack([rows, cols], axis=1)


def _full_frame(ds: sprites.RenderedSprites, factors: np.ndarray) -> np.ndarray:
  """Reference renderer: tests every pixel of the 64x64 frame (no window)."""
  out = np.zeros((len(factors), 64, 64, 1), np.uint8)
  grid = np.arange(64) + 0.5
  span = 64 - 2 * sprite_renderer._MARGIN
  for i, row in enumerate(factors):
    shape, scale, theta, x, y = (v[k] for v, k in zip(ds.values, row))
    dx = grid[None, :] - (sprite_renderer._MARGIN + x * span)
    dy = grid[:, None] - (sprite_renderer._MARGIN + y * span)
    size = sprite_renderer._UNIT * scale
    u = (np.cos(theta) * dx - np.sin(theta) * dy) / size
    v = (np.sin(theta) * dx + np.cos(theta) * dy) / size
    out[i, ..., 0] = sprite_renderer._inside(int(shape), u, v) * 255
  return out


def test_rendered_grid_and_images():
  ds = sprites.RenderedSprites()
  assert ds.factor_names == ('shape', 'scale', 'orientation', 'pos_x', 'pos_y')
  assert ds.factor_sizes == (3, 6, 40, 32, 32)
  assert ds.num_examples == 737_280 and ds.num_factors == 5
  indices = ds.sample_indices(40, np.random.default_rng(0))
  images = ds.images(indices)
  assert images.shape == (40, 64, 64, 1) and images.dtype == np.uint8
  assert set(np.unique(images)) == {0, 255}
  # Deterministic and independent of the batch it is drawn in.
  np.testing.assert_array_equal(ds.images(indices), images)
  np.testing.assert_array_equal(ds.images(indices[7:9]), images[7:9])
  # dSprites's row-major order: shape slowest, pos_y fastest.
  np.testing.assert_array_equal(
      ds.factors_of(np.array([0, 1, 32, 737_279])),
      [[0, 0, 0, 0, 0], [0, 0, 0, 0, 1], [0, 0, 0, 1, 0], [2, 5, 39, 31, 31]])
  np.testing.assert_array_equal(ds.indices_of(ds.factors_of(indices)), indices)
  with pytest.raises(IndexError):
    ds.images(np.array([ds.num_examples]))


def test_small_grid_factor_table():
  ds = sprites.load_sprites('rendered_sprites', orientations=4, positions=8)
  assert isinstance(ds, sprites.RenderedSprites)
  assert ds.factor_sizes == (3, 6, 4, 8, 8)
  assert ds.num_examples == 3 * 6 * 4 * 8 * 8
  table = ds.factors
  assert table.shape == (ds.num_examples, 5)
  np.testing.assert_array_equal(table, ds.factors_of(np.arange(len(table))))
  # The smaller grid spans the same value ranges.
  np.testing.assert_allclose(ds.values[3], np.linspace(0, 1, 8))
  np.testing.assert_allclose(ds.values[2][[0, -1]], [0, 2 * np.pi])


def _base(**changes) -> np.ndarray:
  """Factor rows: a large square at the centre, then the given changes."""
  row = dict(shape=0, scale=5, orientation=0, pos_x=16, pos_y=16)
  row.update(changes)
  return np.array([[row[name] for name in sprites.FACTOR_NAMES]])


def test_position_moves_the_mass_centre():
  ds = sprites.RenderedSprites()
  for shape in range(3):
    xs = ds.images_of_factors(
        np.concatenate([_base(shape=shape, pos_x=x) for x in range(32)]))
    ys = ds.images_of_factors(
        np.concatenate([_base(shape=shape, pos_y=y) for y in range(32)]))
    cx, cy = _mass_centre(xs), _mass_centre(ys)
    # pos_x moves the column only, pos_y the row only, about 1.2 px a step.
    assert (np.diff(cx[:, 1]) > 0.5).all() and np.ptp(cx[:, 0]) < 1.0
    assert (np.diff(cy[:, 0]) > 0.5).all() and np.ptp(cy[:, 1]) < 1.0
    assert 30 < cx[-1, 1] - cx[0, 1] < 45


def test_scale_shape_and_orientation_change_the_image():
  ds = sprites.RenderedSprites()
  for shape in range(3):
    counts = (ds.images_of_factors(
        np.concatenate([_base(shape=shape, scale=s) for s in range(6)]))
              > 0).sum(axis=(1, 2, 3))
    assert (np.diff(counts) > 0).all()
    # Area grows with scale**2 (0.5 -> 1: 4x), up to pixelisation.
    assert 3.0 < counts[-1] / counts[0] < 5.0
  shapes = ds.images_of_factors(
      np.concatenate([_base(shape=s) for s in range(3)]))
  areas = (shapes > 0).sum(axis=(1, 2, 3))
  assert areas[0] == 256  # a 16 x 16 square
  assert areas[0] > areas[2] > areas[1]  # square > heart > ellipse
  for a in range(3):
    for b in range(a):
      assert (shapes[a] != shapes[b]).sum() > 20
  # Rotation keeps the area but changes the pixels; a full
  # turn (index 39 = 2 pi) is the identity, as in dSprites.
  for shape in range(3):
    turned = ds.images_of_factors(
        np.concatenate([_base(shape=shape, orientation=o) for o in (0, 7, 39)]))
    count = (turned > 0).sum(axis=(1, 2, 3))
    assert abs(count[1] / count[0] - 1) < 0.1
    # The rotation centre is the middle of the shape's bounding box: the
    # mass centre of the point-symmetric square and ellipse stays there.
    shift = np.abs(_mass_centre(turned[1:2]) - _mass_centre(turned[:1]))
    assert shift.max() < (0.6 if shape < 2 else 2.0)
    assert (turned[1] != turned[0]).sum() > 20
    np.testing.assert_array_equal(turned[2], turned[0])


def test_every_image_is_non_empty_and_inside():
  ds = sprites.RenderedSprites()
  rng = np.random.default_rng(1)
  # Random examples plus the largest shapes at the four corners, all angles.
  corners = np.array([[s, 5, o, x, y]
                      for s in range(3)
                      for o in range(40)
                      for x in (0, 31)
                      for y in (0, 31)])
  factors = np.concatenate(
      [ds.factors_of(ds.sample_indices(300, rng)), corners])
  images = ds.images_of_factors(factors)
  assert ((images > 0).sum(axis=(1, 2, 3)) >= 30).all()
  # Nothing touches the border ...
  border = np.concatenate(
      [images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]], axis=1)
  assert not border.any()
  # ... and the window each shape is drawn in cuts nothing off.
  np.testing.assert_array_equal(images, _full_frame(ds, factors))


@pytest.mark.parametrize('grid', [dict(), dict(orientations=4, positions=8)])
def test_rendered_fixed_factor_sampling(grid):
  ds = sprites.RenderedSprites(**grid)
  rng = np.random.default_rng(2)
  for factor, size in enumerate(ds.factor_sizes):
    drawn = set()
    for _ in range(30):
      value, indices = ds.sample_indices_with_fixed_factor(factor, 64, rng)
      factors = ds.factors_of(indices)
      assert indices.shape == (64,) and (factors[:, factor] == value).all()
      for other in range(5):
        if other != factor:
          assert len(np.unique(factors[:, other])) > 1
      drawn.add(value)
    assert drawn <= set(range(size)) and len(drawn) >= min(size, 10)
  with pytest.raises(ValueError, match='factor must be in'):
    ds.sample_indices_with_fixed_factor(5, 4, rng)


def test_load_sprites_errors():
  with pytest.raises(DataError, match='not a sprites dataset'):
    sprites.load_sprites('mnist')
  with pytest.raises(DataError, match='positions must be a positive'):
    sprites.load_sprites('rendered_sprites', positions=0)
  with pytest.raises(DataError, match='apply to rendered_sprites only'):
    sprites.load_sprites('dsprites', positions=16)


@pytest.fixture
def mock_tfds():
  with tfds.testing.mock_data(num_examples=_NUM_EXAMPLES):
    yield


def _tfds_records() -> list[dict]:
  source = tfds.data_source('dsprites', split='train')
  return [source[i] for i in range(len(source))]


def test_tfds_dsprites(mock_tfds):
  del mock_tfds
  ds = sprites.load_sprites('dsprites')
  assert isinstance(ds, sprites.TfdsSprites)
  assert ds.factor_sizes == (3, 6, 40, 32, 32)
  assert ds.num_examples == _NUM_EXAMPLES
  records = _tfds_records()
  np.testing.assert_array_equal(
      ds.factors,
      [[int(r[name]) for name in sprites.TFDS_LABELS] for r in records])
  indices = np.array([3, 0, 3, 47])
  images = ds.images(indices)
  assert images.shape == (4, 64, 64, 1) and images.dtype == np.uint8
  # Any non-zero pixel (dSprites stores 0/1) comes out white.
  np.testing.assert_array_equal(
      images, [(records[i]['image'] > 0) * 255 for i in indices])
  assert set(np.unique(images)) <= {0, 255}
  np.testing.assert_array_equal(ds.factors_of(indices), ds.factors[indices])


def test_tfds_fixed_factor_sampling_on_a_partial_grid(mock_tfds):
  del mock_tfds
  ds = sprites.TfdsSprites()
  rng = np.random.default_rng(3)
  for factor in range(5):
    present = set(np.unique(ds.factors[:, factor]).tolist())
    # 48 random examples cannot hold all 32 or 40 values of most factors.
    drawn = set()
    for _ in range(60):
      value, indices = ds.sample_indices_with_fixed_factor(factor, 16, rng)
      assert (ds.factors[indices, factor] == value).all()
      drawn.add(value)
    assert drawn <= present
    if len(present) <= 6:
      assert drawn == present
  assert ds.sample_indices(5, rng).max() < _NUM_EXAMPLES


def test_tfds_dsprites_not_prepared(mock_tfds, tmp_path):
  del mock_tfds
  with pytest.raises(DataError, match='dsprites is not prepared'):
    sprites.load_sprites('dsprites', data_dir=str(tmp_path), download=False)
