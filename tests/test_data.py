"""Tests for cavga_jax.data: folder loading, generated data, batching."""

from __future__ import annotations

import json
import os
import pathlib
import threading
import time

import ml_collections
import numpy as np
from PIL import Image
import pytest

from cavga_jax import data as data_lib
from cavga_jax import typed_config
from cavga_jax.data import dark_objects
from cavga_jax.data import folder
from cavga_jax.data import generated
from cavga_jax.data import pipeline
from cavga_jax.data import textures
from cavga_jax.errors import DataError

_BOTTLE_ROOT = (
    pathlib.Path(__file__).resolve().parent.parent.parent / 'shared' / 'data'
    / 'mvtec_bottle_256')

# ---------------------------------------------------------------------------
# Helpers.


def _save(array: np.ndarray, path: pathlib.Path, **kwargs) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path, **kwargs)
  return path


def _rgb(size: int, value: int) -> np.ndarray:
  image = np.full((size, size, 3), value, np.uint8)
  image[0, 0] = (value + 100) % 256  # Not constant, so resizing is visible.
  return image


def _mask(size: int) -> np.ndarray:
  mask = np.zeros((size, size), np.uint8)
  mask[2:5, 3:7] = 255
  return mask


def _make_category(root: pathlib.Path,
                   category: str = 'widget',
                   size: int = 16) -> pathlib.Path:
  """A tiny valid MVTec-layout category: 3 train, 2 good + 2 crack test."""
  cat = root / category
  for i in range(3):
    _save(_rgb(size, 10 * i), cat / 'train' / 'good' / f'{i:03d}.png')
  for i in range(2):
    _save(_rgb(size, 50 + i), cat / 'test' / 'good' / f'{i:03d}.png')
    _save(_rgb(size, 90 + i), cat / 'test' / 'crack' / f'{i:03d}.png')
    _save(_mask(size), cat / 'ground_truth' / 'crack' / f'{i:03d}_mask.png')
  return cat


@pytest.fixture(scope='module')
def small_generated(tmp_path_factory) -> pathlib.Path:
  root = tmp_path_factory.mktemp('generated')
  return generated.generate_dataset(
      str(root),
      seed=3,
      image_size=32,
      num_train=5,
      num_test_good=3,
      num_test_per_defect=4)


# ---------------------------------------------------------------------------
# Generated dataset.


def test_generated_layout_and_counts(small_generated):
  cat = small_generated
  assert cat.name == 'textures'
  assert len(list((cat / 'train' / 'good').glob('*.png'))) == 5
  assert len(list((cat / 'test' / 'good').glob('*.png'))) == 3
  for defect in textures.DEFECT_TYPES:
    assert len(list((cat / 'test' / defect).glob('*.png'))) == 4
    masks = sorted((cat / 'ground_truth' / defect).glob('*.png'))
    assert [m.name for m in masks] == [f'{i:03d}_mask.png' for i in range(4)]
    with Image.open(masks[0]) as m:
      assert m.mode == 'L'
      assert set(np.unique(np.asarray(m))) <= {0, 255}
  with Image.open(cat / 'train' / 'good' / '000.png') as im:
    assert (im.mode, im.size) == ('RGB', (32, 32))
  marker = json.loads((cat / generated.MARKER_NAME).read_text())
  assert marker['seed'] == 3 and marker['image_size'] == 32
  # No temporary folders are left behind.
  assert sorted(p.name for p in cat.parent.iterdir()) == ['textures']


def _load_all(cat: pathlib.Path, split: str) -> folder.AnomalyDataset:
  return folder.load_split(str(cat.parent), cat.name, split, 32, 3)


def test_generated_is_deterministic(tmp_path, small_generated):
  kwargs = dict(
      image_size=32, num_train=5, num_test_good=3, num_test_per_defect=4)
  same = generated.generate_dataset(str(tmp_path / 'a'), seed=3, **kwargs)
  other = generated.generate_dataset(str(tmp_path / 'b'), seed=4, **kwargs)
  for split in ('train', 'test'):
    ref = _load_all(small_generated, split)
    np.testing.assert_array_equal(_load_all(same, split).images, ref.images)
    np.testing.assert_array_equal(_load_all(same, split).masks, ref.masks)
    assert not np.array_equal(_load_all(other, split).images, ref.images)
  # Files are byte-identical too.
  rel = 'test/blob/002.png'
  assert (same / rel).read_bytes() == (small_generated / rel).read_bytes()


def test_generated_image_does_not_depend_on_counts(tmp_path, small_generated):
  cat = generated.generate_dataset(
      str(tmp_path),
      seed=3,
      image_size=32,
      num_train=2,
      num_test_good=1,
      num_test_per_defect=1)
  for rel in ('train/good/001.png', 'test/good/000.png', 'test/spot/000.png',
              'ground_truth/spot/000_mask.png'):
    assert (cat / rel).read_bytes() == (small_generated / rel).read_bytes()


def _mtimes(cat: pathlib.Path) -> dict[str, int]:
  return {str(p): p.stat().st_mtime_ns for p in cat.rglob('*')}


def test_generated_is_idempotent(tmp_path):
  kwargs = dict(
      seed=0,
      image_size=16,
      num_train=2,
      num_test_good=1,
      num_test_per_defect=1)
  cat = generated.generate_dataset(str(tmp_path), **kwargs)
  before = _mtimes(cat)
  time.sleep(0.01)
  assert generated.generate_dataset(str(tmp_path), **kwargs) == cat
  assert _mtimes(cat) == before

  # Different parameters: regenerated.
  cat = generated.generate_dataset(str(tmp_path), **{**kwargs, 'num_train': 3})
  assert len(list((cat / 'train' / 'good').glob('*.png'))) == 3
  assert json.loads((cat / generated.MARKER_NAME).read_text())['num_train'] == 3

  # Incomplete folder (a file was deleted): regenerated.
  (cat / 'test' / 'scratch' / '000.png').unlink()
  generated.generate_dataset(str(tmp_path), **{**kwargs, 'num_train': 3})
  assert (cat / 'test' / 'scratch' / '000.png').is_file()
  assert sorted(p.name for p in tmp_path.iterdir()) == ['textures']


def test_generated_concurrent_calls_agree(tmp_path):
  kwargs = dict(
      seed=1,
      image_size=16,
      num_train=3,
      num_test_good=1,
      num_test_per_defect=1)
  results, errors = [], []

  def run():
    try:
      results.append(generated.generate_dataset(str(tmp_path), **kwargs))
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=run) for _ in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors
  assert len(set(results)) == 1
  assert sorted(p.name for p in tmp_path.iterdir()) == ['textures']
  assert len(list((tmp_path / 'textures').rglob('*.png'))) == 3 + 1 + 6


def test_generated_refuses_to_delete_foreign_folder(tmp_path):
  user_file = tmp_path / 'textures' / 'precious.txt'
  user_file.parent.mkdir()
  user_file.write_text('user data')
  with pytest.raises(DataError, match='not written by generate_dataset'):
    generated.generate_dataset(str(tmp_path), seed=0, image_size=16)
  assert user_file.read_text() == 'user data'


@pytest.mark.parametrize('kwargs, keyword', [
    (dict(seed=-1), 'seed'),
    (dict(image_size=4), 'image_size'),
    (dict(num_train=0), 'num_train'),
    (dict(category='../x'), 'category'),
])
def test_generated_bad_parameters(tmp_path, kwargs, keyword):
  args = dict(
      seed=0,
      image_size=16,
      num_train=1,
      num_test_good=1,
      num_test_per_defect=1)
  args.update(kwargs)
  with pytest.raises(DataError, match=keyword):
    generated.generate_dataset(str(tmp_path), **args)


@pytest.mark.parametrize('size', [32, 64])
@pytest.mark.parametrize('defect', textures.DEFECT_TYPES)
def test_generated_masks_are_exact(defect, size):
  for index in range(8):
    image, mask = textures.anomalous_image(7, defect, index, size)
    clean = textures.normal_image(7, defect, index, size)
    assert image.shape == (size, size, 3) and image.dtype == np.uint8
    assert mask.shape == (size, size) and mask.dtype == bool
    # The mask is exactly the set of changed pixels.
    np.testing.assert_array_equal(np.any(image != clean, axis=-1), mask)
    assert 0.01 <= mask.mean() <= 0.08, (defect, index, mask.mean())


def test_generated_files_match_renderers(small_generated):
  test = _load_all(small_generated, 'test')
  for i, (path, defect) in enumerate(zip(test.paths, test.defect_types)):
    index = int(pathlib.Path(path).stem)
    if defect == 'good':
      expected = textures.normal_image(3, 'good', index, 32)
      np.testing.assert_array_equal(test.images[i], expected)
      assert not test.masks[i].any()
    else:
      image, mask = textures.anomalous_image(3, defect, index, 32)
      np.testing.assert_array_equal(test.images[i], image)
      np.testing.assert_array_equal(test.masks[i], mask)


def test_generated_normal_images_vary_a_little():
  images = np.stack([
      textures.normal_image(0, 'train', i, 32) for i in range(4)
  ]).astype(np.float64)
  assert not np.array_equal(images[0], images[1])
  # Same family: mean colours are close.
  means = images.mean(axis=(1, 2))
  assert np.ptp(means, axis=0).max() < 40


def test_generated_default_size_is_fast(tmp_path):
  start = time.perf_counter()
  generated.generate_dataset(str(tmp_path), seed=0, image_size=64)
  assert time.perf_counter() - start < 5.0


# The 'dark_objects' scene (issue 36's test data).


def test_generated_dark_objects_category(tmp_path):
  kwargs = dict(
      seed=2,
      image_size=32,
      num_train=3,
      num_test_good=2,
      num_test_per_defect=2)
  cat = generated.generate_dataset(
      str(tmp_path), category='dark_objects', **kwargs)
  assert sorted(p.name for p in (cat / 'ground_truth').iterdir()) == sorted(
      dark_objects.DEFECT_TYPES)
  marker = json.loads((cat / generated.MARKER_NAME).read_text())
  assert marker['scene'] == 'dark_objects'
  assert marker['scene_version'] == dark_objects.VERSION
  assert marker['defect_types'] == list(dark_objects.DEFECT_TYPES)
  test = _load_all(cat, 'test')
  assert test.num_examples == 2 + 2 * len(dark_objects.DEFECT_TYPES)
  for i, (path, defect) in enumerate(zip(test.paths, test.defect_types)):
    index = int(pathlib.Path(path).stem)
    if defect == 'good':
      expected = dark_objects.normal_image(2, 'good', index, 32)
    else:
      expected, mask = dark_objects.anomalous_image(2, defect, index, 32)
      np.testing.assert_array_equal(test.masks[i], mask)
    np.testing.assert_array_equal(test.images[i], expected)
  # The textures' marker keeps the keys it had before there were scenes, so
  # existing generated folders are not regenerated.
  textures_cat = generated.generate_dataset(str(tmp_path), **kwargs)
  assert set(json.loads(
      (textures_cat / generated.MARKER_NAME).read_text())) == {
          'generator_version', 'seed', 'image_size', 'category', 'num_train',
          'num_test_good', 'num_test_per_defect', 'defect_types'
      }


@pytest.mark.parametrize('size', [16, 64])
@pytest.mark.parametrize('defect', dark_objects.DEFECT_TYPES)
def test_generated_dark_objects_masks_are_exact_and_on_the_object(defect, size):
  for index in range(6):
    image, mask = dark_objects.anomalous_image(7, defect, index, size)
    clean = dark_objects.normal_image(7, defect, index, size)
    assert image.shape == (size, size, 3) and image.dtype == np.uint8
    # The mask is exactly the set of changed pixels, never empty.
    np.testing.assert_array_equal(np.any(image != clean, axis=-1), mask)
    assert mask.any()
    if size == 64:
      assert 0.005 <= mask.mean() <= 0.06, (defect, index, mask.mean())
    # On the object: no masked pixel was dark background in the clean image.
    assert clean[mask].mean(axis=-1).min() > 30, (defect, index)


def test_generated_dark_objects_move_on_a_noisy_black_background():
  images = np.stack([
      dark_objects.normal_image(0, 'train', i, 64) for i in range(8)
  ]).astype(np.float64)
  bright = images.mean(axis=-1) > 60
  assert 0.15 <= bright.mean(axis=(1, 2)).min()
  assert bright.mean(axis=(1, 2)).max() <= 0.32
  # Unaligned: the object's centre moves by several cells between images.
  centres = np.array([[np.nonzero(b)[k].mean() for k in (0, 1)] for b in bright
                     ])
  assert np.ptp(centres, axis=0).min() > 8
  # The 4 x 4 corners are always background: dark, with independent
  # Gaussian noise of a few grey levels.
  corners = np.concatenate([
      images[:, :4, :4], images[:, :4, -4:], images[:, -4:, :4], images[:, -4:,
                                                                        -4:]
  ],
                           axis=1)
  assert corners.mean() < 20
  assert 1.5 < corners.std(axis=(1, 2, 3)).min()
  assert corners.std(axis=(1, 2, 3)).max() < 5
  assert not np.array_equal(corners[0], corners[1])


def test_generated_unknown_scene_stream_is_a_data_error():
  with pytest.raises(DataError, match='unknown defect type'):
    dark_objects.anomalous_image(0, 'blob', 0, 16)
  with pytest.raises(DataError, match='unknown dark_objects stream'):
    dark_objects.normal_image(0, 'blob', 0, 16)


# ---------------------------------------------------------------------------
# load_split.


@pytest.mark.parametrize('channels', [1, 3])
def test_load_split_generated(small_generated, channels):
  root, cat = str(small_generated.parent), small_generated.name
  train = folder.load_split(root, cat, 'train', 16, channels)
  test = folder.load_split(root, cat, 'test', 16, channels, num_workers=1)
  assert train.num_examples == 5
  assert train.images.shape == (5, 16, 16, channels)
  assert train.images.dtype == np.uint8
  assert train.masks.shape == (5, 16, 16) and train.masks.dtype == bool
  assert not train.masks.any()
  assert train.labels.dtype == np.int32 and not train.labels.any()
  assert set(train.defect_types) == {'good'}

  assert test.num_examples == 3 + 4 * 3
  assert test.images.shape == (15, 16, 16, channels)
  assert test.defect_types == (('blob',) * 4 + ('good',) * 3 +
                               ('scratch',) * 4 + ('spot',) * 4)
  np.testing.assert_array_equal(test.labels,
                                [d != 'good' for d in test.defect_types])
  np.testing.assert_array_equal(test.masks.any(axis=(1, 2)), test.labels == 1)
  assert all(pathlib.Path(p).is_file() for p in test.paths)
  assert list(test.paths) == sorted(test.paths)


def test_load_split_resizes_with_pil_bilinear(tmp_path):
  cat = _make_category(tmp_path, size=16)
  image = np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3)
  _save(image, cat / 'train' / 'good' / '000.png')
  got = folder.load_split(str(tmp_path), 'widget', 'train', 8, 3)
  expected = Image.fromarray(image).resize((8, 8), Image.BILINEAR)
  np.testing.assert_array_equal(got.images[0], np.asarray(expected))
  test = folder.load_split(str(tmp_path), 'widget', 'test', 32, 3)
  expected_mask = np.asarray(
      Image.fromarray(_mask(16)).resize((32, 32), Image.NEAREST)) > 127
  np.testing.assert_array_equal(test.masks[0], expected_mask)


def test_load_split_converts_image_modes(tmp_path):
  good = tmp_path / 'widget' / 'train' / 'good'
  size = 4
  palette = Image.new('P', (size, size), 1)
  palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
  good.mkdir(parents=True)
  palette.save(good / 'b_palette.png')
  _save(np.full((size, size), 100, np.uint8), good / 'a_gray.png')
  rgba = np.zeros((size, size, 4), np.uint8)
  rgba[...] = (40, 50, 60, 7)
  _save(rgba, good / 'c_rgba.png')
  _save(np.full((size, size, 2), (70, 9), np.uint8), good / 'd_la.png')
  wide = np.full((size, size), 65535, np.uint16)
  wide[0, 0] = 32896  # 128 * 257
  wide[0, 1] = 1000  # Would be clipped to 255 by a plain PIL conversion.
  _save(wide, good / 'e_16bit.png')
  Image.new('1', (size, size), 1).save(good / 'f_bilevel.png')
  _save(np.full((size, size, 3), (200, 100, 50), np.uint8), good / 'g_rgb.png')
  (good / 'notes.txt').write_text('ignored')

  with Image.open(good / 'e_16bit.png') as im:
    assert im.mode.startswith('I')  # Really a 16-bit file.
  rgb = folder.load_split(str(tmp_path), 'widget', 'train', size, 3)
  assert [pathlib.Path(p).stem for p in rgb.paths] == [
      'a_gray', 'b_palette', 'c_rgba', 'd_la', 'e_16bit', 'f_bilevel', 'g_rgb'
  ]
  px = rgb.images[:, -1, -1]
  np.testing.assert_array_equal(px, [(100, 100, 100),
                                     (10, 20, 30), (40, 50, 60), (70, 70, 70),
                                     (255, 255, 255), (255, 255, 255),
                                     (200, 100, 50)])
  assert tuple(rgb.images[4, 0, 0]) == (128, 128, 128)
  assert tuple(rgb.images[4, 0, 1]) == (4, 4, 4)

  gray = folder.load_split(str(tmp_path), 'widget', 'train', size, 1)
  assert gray.images.shape == (7, size, size, 1)
  lum = lambda r, g, b: round((r * 299 + g * 587 + b * 114) / 1000)
  np.testing.assert_allclose(
      gray.images[:, -1, -1, 0],
      [100,
       lum(10, 20, 30),
       lum(40, 50, 60), 70, 255, 255,
       lum(200, 100, 50)],
      atol=1)
  assert gray.images[4, 0, 0, 0] == 128


def test_load_split_accepts_extensions(tmp_path):
  good = tmp_path / 'widget' / 'train' / 'good'
  for name, fmt in (('a.BMP', 'BMP'), ('b.jpeg', 'JPEG'), ('c.JPG', 'JPEG'),
                    ('d.tiff', 'TIFF'), ('e.tif', 'TIFF'), ('f.Png', 'PNG')):
    _save(_rgb(8, 100), good / name, format=fmt)
  (good / '.hidden.png').write_bytes(b'resource fork')
  got = folder.load_split(str(tmp_path), 'widget', 'train', 8, 3)
  assert [pathlib.Path(p).name for p in got.paths
         ] == ['a.BMP', 'b.jpeg', 'c.JPG', 'd.tiff', 'e.tif', 'f.Png']


def _truncate(path: pathlib.Path, keep: float = 0.6) -> None:
  data = path.read_bytes()
  path.write_bytes(data[:int(len(data) * keep)])


def _noisy_jpeg(path: pathlib.Path) -> pathlib.Path:
  rng = np.random.default_rng(0)
  return _save(
      rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
      path,
      format='JPEG',
      quality=95)


def _case_root_missing(root):
  return dict(root=root / 'missing'), root / 'missing', 'does not exist'


def _case_category_missing(root):
  return dict(category='carpet'), root / 'carpet', 'widget'


def _case_split_missing(root):
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.rmtree(root / 'widget' / 'test')
  return dict(split='test'), root / 'widget' / 'test', 'split folder'


def _case_train_split_missing(root):
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.rmtree(root / 'widget' / 'train')
  return {}, root / 'widget' / 'train', 'split folder does not exist'


def _case_train_good_missing(root):
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.rmtree(root / 'widget' / 'train' / 'good')
  (root / 'widget' / 'train' / 'other').mkdir()
  return {}, root / 'widget' / 'train' / 'good', 'does not exist'


def _case_no_images(root):
  for p in (root / 'widget' / 'train' / 'good').iterdir():
    p.unlink()
  (root / 'widget' / 'train' / 'good' / 'readme.txt').write_text('x')
  return {}, root / 'widget' / 'train' / 'good', 'no images'


def _case_empty_test_split(root):
  import shutil  # pylint: disable=g-import-not-at-top
  for path in (root / 'widget' / 'test').rglob('*.png'):
    path.unlink()
  shutil.rmtree(root / 'widget' / 'ground_truth')
  return dict(split='test'), root / 'widget' / 'test', 'split has no images'


def _case_zero_byte(root):
  path = root / 'widget' / 'train' / 'good' / '001.png'
  path.write_bytes(b'')
  return {}, path, 'empty'


def _case_not_an_image(root):
  path = root / 'widget' / 'train' / 'good' / '001.png'
  path.write_text('this is not a png')
  return {}, path, 'not an image'


def _case_truncated_png(root):
  path = _save(
      np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8),
      root / 'widget' / 'train' / 'good' / '001.png')
  _truncate(path)
  with Image.open(path):  # The header still parses: fails only on load().
    pass
  return {}, path, 'truncated'


def _case_truncated_jpeg(root):
  path = _noisy_jpeg(root / 'widget' / 'test' / 'good' / '001.jpg')
  (root / 'widget' / 'test' / 'good' / '001.png').unlink()
  _truncate(path)
  return dict(split='test'), path, 'truncated'


def _case_mask_missing(root):
  path = root / 'widget' / 'ground_truth' / 'crack' / '001_mask.png'
  path.unlink()
  return dict(split='test'), path, 'mask is missing'


def _case_mask_folder_missing(root):
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.rmtree(root / 'widget' / 'ground_truth')
  path = root / 'widget' / 'ground_truth' / 'crack' / '000_mask.png'
  return dict(split='test'), path, 'mask is missing'


def _case_mask_wrong_size(root):
  path = _save(
      np.zeros((16, 15), np.uint8),
      root / 'widget' / 'ground_truth' / 'crack' / '001_mask.png')
  return dict(split='test'), path, 'differs from image size'


def _case_mask_zero_one(root):
  # A 0/1 label mask: thresholding would silently give an empty mask.
  path = _save(
      _mask(16) // 255,
      root / 'widget' / 'ground_truth' / 'crack' / '001_mask.png')
  return dict(split='test'), path, 'mask is not binary: values are 0..1'


def _case_mask_gray(root):
  # A heat map (or a photo) instead of a 0/255 mask.
  ramp = np.tile(np.linspace(0, 255, 16).astype(np.uint8), (16, 1))
  path = _save(ramp,
               root / 'widget' / 'ground_truth' / 'crack' / '001_mask.png')
  return (dict(split='test'), path,
          'mask is not binary: 75% of its pixels are gray')


def _case_mask_all_zero(root):
  # A defect image whose mask marks nothing: its pixels would count as
  # normal and the image as a defect without a defect (issue 37).
  path = _save(
      np.zeros((16, 16), np.uint8),
      root / 'widget' / 'ground_truth' / 'crack' / '001_mask.png')
  return dict(split='test'), path, 'mask is all zero'


def _case_mask_truncated(root):
  path = _save(
      np.random.default_rng(1).integers(0, 256, (16, 16), dtype=np.uint8),
      root / 'widget' / 'ground_truth' / 'crack' / '000_mask.png')
  _truncate(path)
  return dict(split='test'), path, 'truncated'


def _case_mask_without_image(root):
  path = _save(
      _mask(16), root / 'widget' / 'ground_truth' / 'crack' / '007_mask.png')
  return dict(split='test'), path, 'no test image'


def _case_mask_for_unknown_defect(root):
  path = _save(
      _mask(16), root / 'widget' / 'ground_truth' / 'hole' / '000_mask.png')
  return dict(split='test'), path, 'no test image'


def _case_mask_badly_named(root):
  path = _save(_mask(16), root / 'widget' / 'ground_truth' / 'crack' / 'x.png')
  return dict(split='test'), path, 'mask file name'


def _case_bad_split(root):
  return dict(split='val'), root, 'unknown split'


def _case_bad_channels(root):
  return dict(channels=2), root, 'channels'


# The bad-input table: each case breaks a valid tiny category (built by
# `_make_category`) and returns (load_split overrides, the path the error
# must name, a phrase the error must contain).
_BAD_INPUT_CASES = [
    _case_root_missing,
    _case_category_missing,
    _case_split_missing,
    _case_train_split_missing,
    _case_train_good_missing,
    _case_no_images,
    _case_empty_test_split,
    _case_zero_byte,
    _case_not_an_image,
    _case_truncated_png,
    _case_truncated_jpeg,
    _case_mask_missing,
    _case_mask_folder_missing,
    _case_mask_wrong_size,
    _case_mask_zero_one,
    _case_mask_gray,
    _case_mask_all_zero,
    _case_mask_truncated,
    _case_mask_without_image,
    _case_mask_for_unknown_defect,
    _case_mask_badly_named,
    _case_bad_split,
    _case_bad_channels,
]


@pytest.mark.parametrize(
    'case', _BAD_INPUT_CASES, ids=lambda f: f.__name__[len('_case_'):])
@pytest.mark.parametrize('num_workers', [1, 4])
def test_load_split_errors(tmp_path, case, num_workers):
  _make_category(tmp_path)
  overrides, bad_path, keyword = case(tmp_path)
  args = dict(
      root=str(tmp_path),
      category='widget',
      split='train',
      image_size=8,
      channels=3,
      num_workers=num_workers)
  args.update({k: str(v) if k == 'root' else v for k, v in overrides.items()})
  with pytest.raises(DataError) as info:
    folder.load_split(**args)
  message = str(info.value)
  assert '\n' not in message
  assert str(bad_path) in message
  assert keyword in message
  # No PIL/OS exception is chained into the traceback.
  error = info.value
  assert error.__cause__ is None
  assert error.__context__ is None or error.__suppress_context__


def _mask_variants(size: int) -> dict[str, tuple[Image.Image, np.ndarray]]:
  """Masks in other modes or with edge noise, and the defect pixels expected."""
  binary = _mask(size) > 0
  antialiased = _mask(size)
  antialiased[1, 3:7] = 100  # Edge pixels below the threshold...
  antialiased[5, 3:7] = 180  # ...and above it.
  palette = Image.fromarray(binary.astype(np.uint8), 'P')
  palette.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
  rgba = np.zeros((size, size, 4), np.uint8)
  rgba[binary] = 255
  rgba[..., 3] = 255
  return {
      '16bit': (Image.fromarray(binary.astype(np.uint16) * 65535), binary),
      'palette': (palette, binary),
      'rgb': (Image.fromarray(np.stack([_mask(size)] * 3, -1)), binary),
      'rgba': (Image.fromarray(rgba), binary),
      'bilevel': (Image.fromarray(binary), binary),
      'antialiased':
          (Image.fromarray(antialiased), binary | (antialiased >= 128)),
  }


@pytest.mark.parametrize('variant', sorted(_mask_variants(16)))
def test_load_split_converts_masks_to_binary(tmp_path, variant):
  cat = _make_category(tmp_path)
  mask, expected = _mask_variants(16)[variant]
  path = cat / 'ground_truth' / 'crack' / '001_mask.png'
  mask.save(path)
  if variant == '16bit':
    with Image.open(path) as im:
      assert im.mode.startswith('I')  # Really a 16-bit file.
  test = folder.load_split(str(tmp_path), 'widget', 'test', 16, 3)
  assert test.masks.dtype == bool and test.masks.shape == (4, 16, 16)
  assert test.paths[1].endswith('crack/001.png')
  np.testing.assert_array_equal(test.masks[1], expected)
  # Resized to another size, masks stay binary and follow nearest neighbour.
  bigger = folder.load_split(str(tmp_path), 'widget', 'test', 32, 1)
  np.testing.assert_array_equal(bigger.masks[1],
                                expected.repeat(2, 0).repeat(2, 1))


def test_load_split_accepts_jpeg_masks(tmp_path):
  # JPEG ringing around the defect stays far from the threshold.
  cat = _make_category(tmp_path, size=32)
  mask = np.zeros((32, 32), np.uint8)
  mask[8:20, 10:24] = 255
  path = cat / 'ground_truth' / 'crack' / '001_mask.jpg'
  (cat / 'ground_truth' / 'crack' / '001_mask.png').unlink()
  _save(mask, path, format='JPEG', quality=75)
  with Image.open(path) as im:
    assert set(np.unique(np.asarray(im))) - {0, 255}  # Not exactly binary.
  test = folder.load_split(str(tmp_path), 'widget', 'test', 32, 3)
  np.testing.assert_array_equal(test.masks[1], mask > 0)


def test_load_split_reports_first_bad_file_in_order(tmp_path):
  good = _make_category(tmp_path) / 'train' / 'good'
  (good / '001.png').write_bytes(b'')
  (good / '002.png').write_bytes(b'')
  for _ in range(3):
    with pytest.raises(DataError, match='001.png'):
      folder.load_split(str(tmp_path), 'widget', 'train', 8, 3, num_workers=4)


def test_anomaly_dataset_checks_shapes():
  with pytest.raises(ValueError, match='inconsistent'):
    folder.AnomalyDataset(
        images=np.zeros((2, 4, 4, 3), np.uint8),
        masks=np.zeros((2, 4, 5), bool),
        labels=np.zeros(2, np.int32),
        defect_types=('good',) * 2,
        paths=('a', 'b'))


# ---------------------------------------------------------------------------
# get_datasets.


def _config(**data) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = ml_collections.ConfigDict(
      dict(
          name='generated',
          root='',
          category='textures',
          image_size=16,
          channels=3,
          num_train=4,
          num_test_good=2,
          num_test_per_defect=2))
  config.data.update(data)
  return config


def test_get_datasets_generated(tmp_path, caplog):
  caplog.set_level('INFO')
  train, test = data_lib.get_datasets(
      typed_config.section(_config(), 'data'), str(tmp_path))
  assert (tmp_path / 'data' / 'textures' / generated.MARKER_NAME).is_file()
  assert train.images.shape == (4, 16, 16, 3)
  assert test.num_examples == 2 + 2 * 3
  assert 'train split' in caplog.text and 'scratch=2' in caplog.text
  # generated_seed overrides config.seed.
  config = _config(root=str(tmp_path / 'other'))
  config.data.generated_seed = 5
  train5, _ = data_lib.get_datasets(
      typed_config.section(config, 'data'), str(tmp_path))
  expected = textures.normal_image(5, 'train', 0, 16)
  np.testing.assert_array_equal(train5.images[0], expected)


def test_get_datasets_generated_dark_objects(tmp_path):
  train, test = data_lib.get_datasets(
      typed_config.section(_config(category='dark_objects'), 'data'),
      str(tmp_path))
  assert train.images.shape == (4, 16, 16, 3)
  assert sorted(set(test.defect_types)) == sorted(('good',)
                                                  + dark_objects.DEFECT_TYPES)
  np.testing.assert_array_equal(train.images[0],
                                dark_objects.normal_image(0, 'train', 0, 16))


def test_get_datasets_mvtec(tmp_path):
  _make_category(tmp_path)
  config = _config(
      name='mvtec',
      root=str(tmp_path),
      category='widget',
      image_size=8,
      channels=1)
  train, test = data_lib.get_datasets(
      typed_config.section(config, 'data'), str(tmp_path / 'work'))
  assert train.images.shape == (3, 8, 8, 1)
  assert test.defect_types == ('crack', 'crack', 'good', 'good')


@pytest.mark.parametrize('data, keyword', [
    (dict(name='mvtec', root=''), 'config.data.root is not set'),
    (dict(name='mvtec', root=None), 'config.data.root is not set'),
    (dict(name='imagenet'), 'generated, mvtec'),
])
def test_get_datasets_errors(tmp_path, data, keyword):
  config = _config()
  config.data.root = None
  config.data.update(data)
  with pytest.raises(DataError, match=keyword):
    data_lib.get_datasets(typed_config.section(config, 'data'), str(tmp_path))


# ---------------------------------------------------------------------------
# Batching.


@pytest.mark.parametrize('n, batch_size', [(10, 3), (7, 7), (5, 12), (1, 4)])
def test_epoch_permutation_indices_tile_epochs(n, batch_size):
  num_steps = 4 * n  # Enough for several epochs in every case.
  stream = np.concatenate([
      pipeline.epoch_permutation_indices(n, batch_size, s, seed=9)
      for s in range(num_steps)
  ])
  for e in range(len(stream) // n):
    epoch = stream[e * n:(e + 1) * n]
    np.testing.assert_array_equal(np.sort(epoch), np.arange(n))
    np.testing.assert_array_equal(epoch,
                                  np.random.default_rng([9, e]).permutation(n))


def test_epoch_permutation_indices_is_a_function_of_seed_and_step():
  a = pipeline.epoch_permutation_indices(100, 8, 37, seed=1)
  assert a.shape == (8,) and np.issubdtype(a.dtype, np.integer)
  np.testing.assert_array_equal(
      a, pipeline.epoch_permutation_indices(100, 8, 37, seed=1))
  assert not np.array_equal(
      a, pipeline.epoch_permutation_indices(100, 8, 37, seed=2))
  assert not np.array_equal(
      a, pipeline.epoch_permutation_indices(100, 8, 38, seed=1))


@pytest.mark.parametrize('args', [(0, 4, 0, 0), (10, 0, 0, 0), (10, 4, -1, 0),
                                  (10, 4, 0, -3)])
def test_epoch_permutation_indices_rejects_bad_arguments(args):
  with pytest.raises(DataError):
    pipeline.epoch_permutation_indices(*args)


def _images(n: int = 7) -> np.ndarray:
  return np.arange(n * 2 * 2 * 3, dtype=np.uint8).reshape(n, 2, 2, 3)


@pytest.mark.parametrize('start_step', [0, 5, 23])
def test_train_batches_match_indices(start_step):
  images = _images()
  with pipeline.TrainBatches(images, 3, seed=4, start_step=start_step) as it:
    for step in range(start_step, start_step + 10):
      assert it.step == step
      batch = it.next()
      idx = pipeline.epoch_permutation_indices(7, 3, step, 4)
      np.testing.assert_array_equal(batch, images[idx])
      assert batch.dtype == np.uint8


def test_train_batches_put_fn_and_iteration():
  images = _images()
  with pipeline.TrainBatches(
      images, 4, seed=1, prefetch=1, put_fn=lambda b: ('put', b.sum())) as it:
    got = [x for _, x in zip(range(3), it)]
  for step, (tag, total) in enumerate(got):
    idx = pipeline.epoch_permutation_indices(7, 4, step, 1)
    assert tag == 'put' and total == images[idx].sum()


def test_train_batches_with_jax_device_put():
  jax = pytest.importorskip('jax')
  images = _images()
  with pipeline.TrainBatches(images, 2, seed=0, put_fn=jax.device_put) as it:
    batch = next(it)
  assert isinstance(batch, jax.Array)
  np.testing.assert_array_equal(
      np.asarray(batch), images[pipeline.epoch_permutation_indices(7, 2, 0, 0)])


def test_train_batches_reraises_producer_errors():
  calls = []

  def put_fn(batch):
    calls.append(1)
    if len(calls) == 3:
      raise KeyError('device is gone')
    return batch

  it = pipeline.TrainBatches(_images(), 2, seed=0, put_fn=put_fn)
  it.next()
  it.next()
  with pytest.raises(KeyError, match='device is gone'):
    it.next()
  with pytest.raises(KeyError):  # Stays failed instead of hanging.
    it.next()
  it.close()
  assert not it._thread.is_alive()  # pylint: disable=protected-access


def test_train_batches_close_stops_thread():
  before = threading.active_count()
  it = pipeline.TrainBatches(_images(), 2, seed=0, prefetch=2)
  it.next()
  time.sleep(0.05)  # Let the producer fill the queue and block.
  it.close()
  assert not it._thread.is_alive()  # pylint: disable=protected-access
  assert threading.active_count() == before
  with pytest.raises(RuntimeError, match='closed'):
    it.next()
  it.close()  # Idempotent.


@pytest.mark.parametrize('n, batch_size', [(7, 3), (6, 3), (2, 5)])
def test_eval_batches_pad_last_batch(n, batch_size):
  images = _images(n)
  dataset = folder.AnomalyDataset(
      images=images,
      masks=np.zeros(images.shape[:3], bool),
      labels=np.zeros(n, np.int32),
      defect_types=('good',) * n,
      paths=tuple(str(i) for i in range(n)))
  batches = list(pipeline.eval_batches(dataset, batch_size))
  assert len(batches) == -(-n // batch_size)
  assert all(b.shape == (batch_size, 2, 2, 3) for b, _ in batches)
  assert sum(v for _, v in batches) == n
  np.testing.assert_array_equal(
      np.concatenate([b[:v] for b, v in batches]), images)
  last, valid = batches[-1]
  assert (last[valid:] == images[-1]).all()


# ---------------------------------------------------------------------------
# Real data.


@pytest.mark.skipif(
    not (_BOTTLE_ROOT / 'bottle').is_dir(), reason=f'{_BOTTLE_ROOT} is absent')
def test_mvtec_bottle_test_split():
  test = folder.load_split(str(_BOTTLE_ROOT), 'bottle', 'test', 64, 3)
  assert test.images.shape == (83, 64, 64, 3)
  assert int(test.labels.sum()) == 63
  has_defect = test.masks.any(axis=(1, 2))
  np.testing.assert_array_equal(has_defect, test.labels == 1)
  assert set(test.defect_types) == {
      'good', 'broken_large', 'broken_small', 'contamination'
  }
  assert all(os.path.isfile(p) for p in test.paths)
