"""One-class MNIST / Fashion-MNIST / CIFAR-10 through TFDS (mock data, no network)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import tensorflow_datasets as tfds

from cavga_jax import data as data_lib
from cavga_jax import typed_config
from cavga_jax.data import tfds_data
from cavga_jax.errors import DataError
from cavga_jax.programs import one_class
from cavga_jax.training import run_setup
from configs import tiny_one_class

_NUM_EXAMPLES = 24


@pytest.fixture
def mock_tfds():
  with tfds.testing.mock_data(num_examples=_NUM_EXAMPLES):
    yield


def _labels(name: str, split: str) -> np.ndarray:
  source = tfds.data_source(name, split=split)
  return np.array([int(source[i]['label']) for i in range(len(source))])


def _common_class(name: str) -> int:
  return int(np.bincount(_labels(name, 'train'), minlength=10).argmax())


@pytest.mark.parametrize('name,channels', [('mnist', 1), ('fashion_mnist', 3),
                                           ('cifar10', 3)])
def test_load_one_class(mock_tfds, name, channels):
  del mock_tfds
  normal = _common_class(name)
  train, test = tfds_data.load_one_class(
      name, normal, 32, channels, num_workers=1)
  train_labels, test_labels = _labels(name, 'train'), _labels(name, 'test')
  # Train: only the normal class; test: the full split, normal -> 0.
  assert train.images.shape == ((train_labels == normal).sum(), 32, 32,
                                channels)
  assert train.images.dtype == np.uint8 and not train.labels.any()
  assert test.images.shape == (_NUM_EXAMPLES, 32, 32, channels)
  np.testing.assert_array_equal(test.labels, test_labels != normal)
  assert not test.masks.any() and test.masks.shape == (_NUM_EXAMPLES, 32, 32)
  names = tfds_data.class_names(name)
  assert len(names) == 10
  assert test.defect_types == tuple(
      'good' if c == normal else names[c] for c in test_labels)
  assert test.paths[1] == f'{name}/test/00001'
  # Images are resized, not padded or blank.
  assert test.images.std() > 0


def test_get_datasets_dispatches_one_class(mock_tfds, tmp_path):
  del mock_tfds
  config = tiny_one_class.get_config()
  config.data.normal_class = _common_class('mnist')
  train, test = run_setup.load_datasets(
      typed_config.from_config(config), str(tmp_path))
  assert train.images.shape[1:] == (32, 32, 1)
  assert test.num_examples == _NUM_EXAMPLES
  assert 'mnist' in data_lib.KNOWN_DATASETS


@pytest.mark.parametrize('kwargs,message', [
    (dict(normal_class=10), 'normal_class must be an integer in'),
    (dict(normal_class=-1), 'normal_class must be an integer in'),
    (dict(channels=2), 'channels must be 1 or 3'),
    (dict(download=False), 'is not prepared'),
    (dict(name='svhn_cropped'), 'not a one-class TFDS dataset'),
])
def test_load_one_class_errors(mock_tfds, tmp_path, kwargs, message):
  del mock_tfds
  args = dict(
      name='mnist',
      normal_class=0,
      image_size=32,
      channels=1,
      data_dir=str(tmp_path))
  args.update(kwargs)
  with pytest.raises(DataError, match=message):
    tfds_data.load_one_class(**args)


def test_missing_normal_class_is_a_clear_error(mock_tfds):
  del mock_tfds
  missing = [c for c in range(10) if c not in set(_labels('mnist', 'train'))]
  if not missing:
    pytest.skip('every class occurs in the mock data')
  with pytest.raises(DataError, match=f'no image of class {missing[0]}'):
    tfds_data.load_one_class('mnist', missing[0], 32, 1)


def test_one_class_train_and_evaluate(mock_tfds, tmp_path, caplog):
  del mock_tfds
  config = tiny_one_class.get_config()
  normal = _common_class('mnist')
  result = one_class.run_one_class(config, str(tmp_path), classes=[normal])
  (row,) = result['classes']
  assert row['class'] == normal and row['num_test_images'] == _NUM_EXAMPLES
  assert 0.0 <= row['image_auroc'] <= 1.0
  assert result['mean_image_auroc'] == row['image_auroc']
  with open(tmp_path / f'class_{normal}' / 'eval' / 'metrics.json') as f:
    metrics = json.load(f)
  # No masks: localization metrics are NaN (with a warning), detection is not.
  assert math.isnan(metrics['pixel_auroc']) and math.isnan(metrics['aupro'])
  assert 'undefined' in caplog.text or 'nan' in caplog.text.lower()
  with open(tmp_path / 'one_class.json') as f:
    assert json.load(f)['classes'][0]['class'] == normal
  table = (tmp_path / 'one_class.md').read_text()
  assert f'| {normal} |' in table and '| mean |' in table
