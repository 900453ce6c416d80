"""One-class detection on MNIST, Fashion-MNIST and CIFAR-10 through TFDS.

Protocol (docs/protocol.md section 4): train on the training images of one class
(`config.data.normal_class`); test on the *full* test split with that class
as normal (label 0) and every other class anomalous (label 1). There are no
defect masks: every mask is all False, so the localization metrics come out
NaN (with a warning) and the image AUROC is the number to read.

Reading needs no TensorFlow: the prepared dataset is read as an array_record
random-access source (`tfds.builder(...).as_data_source()`), whose PNGs TFDS
decodes with PIL (or OpenCV when installed). *Preparing* a dataset (download + conversion to
array_record, once per data_dir) is done by TFDS itself and, in
tensorflow-datasets 4.9, needs TensorFlow (its builders encode PNGs with
`tf.image.encode_png` and read files with `tf.io.gfile`); without it the
loader stops with a one-line `DataError` that says how to prepare the data.

Images are converted to `config.data.channels` (1: grayscale, 3: RGB;
MNIST's grayscale is repeated for 3 channels) and resized to
`config.data.image_size` with PIL's bilinear filter (MNIST 28 -> 32 px for
CAVGA-D), as the folder loader does.
"""

from __future__ import annotations

import concurrent.futures
import logging
from typing import Any

import numpy as np
from PIL import Image

from cavga_jax import typed_config
from cavga_jax.data.folder import AnomalyDataset
from cavga_jax.data.folder import check_image_format
from cavga_jax.data.folder import NORMAL_DEFECT
from cavga_jax.errors import DataError

# TFDS names of the one-class benchmarks (all have 10 classes).
ONE_CLASS_DATASETS = ('mnist', 'fashion_mnist', 'cifar10')
NUM_CLASSES = 10
# Records per batched read.
_READ_CHUNK = 1024

_log = logging.getLogger(__name__)


def _one_line(exc: BaseException) -> str:
  return ' '.join(f'{type(exc).__name__}: {exc}'.split())


def _tfds():
  # Imported on first use: importing tensorflow_datasets costs ~1 s, which
  # runs that never touch TFDS (MVTec, generated data) should not pay.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds


def _builder(name: str,
             data_dir: str | None,
             download: bool,
             known: tuple[str, ...] = ONE_CLASS_DATASETS,
             kind: str = 'one-class') -> Any:
  """The TFDS builder of `name`, prepared in array_record format.

  Args:
    name: the TFDS name.
    data_dir: TFDS data_dir; None uses TFDS's default.
    download: prepare the dataset if it is not prepared yet.
    known: the names this caller accepts (default: the one-class datasets;
      `cavga_jax.data.sprites` passes its own).
    kind: what `known` holds, for the error message ('one-class').

  Raises:
    DataError: unknown name, data not prepared and not allowed or not able
      to prepare it (TensorFlow missing), or the preparation failed.
  """
  if name not in known:
    raise DataError(f'config.data.name: {name!r} is not a {kind} TFDS '
                    f'dataset (known: {", ".join(known)})')
  tfds = _tfds()
  try:
    builder = tfds.builder(name, data_dir=data_dir, file_format='array_record')
    prepared = builder.is_prepared()
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f'{data_dir or "TFDS default data_dir"}: cannot open TFDS '
                    f'dataset {name} ({_one_line(e)})') from None
  if prepared:
    return builder
  where = str(builder.data_dir)
  if not download:
    raise DataError(f'{where}: TFDS dataset {name} is not prepared there and '
                    f'config.data.download is False (set it to True, or point '
                    f'config.data.root at the data_dir that holds {name})')
  _log.info('Preparing TFDS dataset %s in %s (download and conversion, once)',
            name, where)
  try:
    builder.download_and_prepare()
  except ImportError as e:
    if 'tensorflow' not in str(e).lower():
      raise DataError(f'{where}: preparing TFDS dataset {name} failed '
                      f'({_one_line(e)})') from None
    # The raw download stays in <data_dir>/downloads and is reused.
    raise DataError(
        f'{where}: preparing TFDS dataset {name} needs TensorFlow once '
        f'(tensorflow-datasets encodes the images with it): `pip install '
        f'tensorflow` and rerun, or run `tfds build {name} '
        f'--file_format=array_record --data_dir=<dir>` where TensorFlow is '
        f'installed and set --config.data.root=<dir>; training and '
        f'evaluation then read the prepared files without TensorFlow') from None
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f'{where}: preparing TFDS dataset {name} failed '
                    f'({_one_line(e)})') from None
  return builder


def _split_source(builder: Any, split: str) -> Any:
  try:
    return builder.as_data_source(split=split)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(
        f'{builder.data_dir}: cannot read the {split} split of {builder.name} '
        f'as array_record (prepared in another file format? rebuild with '
        f'`tfds build {builder.name} --file_format=array_record`) '
        f'({_one_line(e)})') from None


def class_names(name: str,
                data_dir: str | None = None,
                download: bool = True) -> tuple[str, ...]:
  """The label names of a one-class dataset, e.g. ('airplane', ...) for CIFAR-10."""
  builder = _builder(name, data_dir, download)
  return tuple(builder.info.features['label'].names)


def _read_split(
    source: Any, where: str,
    keep_class: int | None) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
  """Reads a split in index order, keeping only `keep_class` (None: all).

  TFDS decodes the PNGs (with PIL or OpenCV, no TensorFlow). Skipping the
  decoding of the dropped classes (`tfds.decode.SkipDecoding`) would need
  TensorFlow under `tfds.testing.mock_data`, and decoding 28-32 px images
  costs only seconds per split.

  Returns:
    (images, labels, indices): the kept (H, W, C) uint8 images, their
    labels and their record indices.
  """
  images, labels, indices = [], [], []
  batched = hasattr(source, '__getitems__')
  start = 0
  try:
    for start in range(0, len(source), _READ_CHUNK):
      keys = list(range(start, min(start + _READ_CHUNK, len(source))))
      records = None
      if batched:
        try:
          # ~3x faster than one record at a time on array_record.
          records = source.__getitems__(keys)
        except TypeError:
          # The data source of tfds.testing.mock_data (TFDS 4.9.10) has a
          # broken __getitems__; read it one record at a time.
          batched = False
      if records is None:
        records = [source[k] for k in keys]
      for k, record in zip(keys, records):
        label = int(record['label'])
        if keep_class is None or label == keep_class:
          images.append(np.asarray(record['image']))
          labels.append(label)
          indices.append(k)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f'{where}: cannot read records {start}-'
                    f'{start + _READ_CHUNK - 1} ({_one_line(e)})') from None
  return images, np.asarray(labels, np.int64), np.asarray(indices, np.int64)


def _convert(image: np.ndarray, image_size: int, channels: int,
             out: np.ndarray) -> None:
  """Converts one (H, W, 1|3) uint8 image into the (S, S, C) row `out`."""
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  pil = Image.fromarray(image)
  pil = pil.convert('L' if channels == 1 else 'RGB')
  if pil.size != (image_size, image_size):
    pil = pil.resize((image_size, image_size), Image.BILINEAR)
  out[...] = np.asarray(pil, np.uint8).reshape(out.shape)


def _to_dataset(name: str, split: str, images: list[np.ndarray],
                labels: np.ndarray, indices: np.ndarray, normal_class: int,
                names: tuple[str, ...], image_size: int, channels: int,
                num_workers: int) -> AnomalyDataset:
  """Resizes the read images into an AnomalyDataset."""
  n = len(images)
  out = np.empty((n, image_size, image_size, channels), np.uint8)

  def convert(i: int) -> None:
    _convert(images[i], image_size, channels, out[i])

  if num_workers <= 1 or n < 1024:
    for i in range(n):
      convert(i)
  else:
    # PIL releases the GIL while resizing.
    with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
      for _ in pool.map(convert, range(n), chunksize=256):
        pass
  return AnomalyDataset(
      images=out,
      masks=np.zeros((n, image_size, image_size), bool),
      labels=(labels != normal_class).astype(np.int32),
      defect_types=tuple(
          NORMAL_DEFECT if c == normal_class else names[c] for c in labels),
      # Not files: '<dataset>/<split>/<record index>' identifies the image.
      paths=tuple(f'{name}/{split}/{i:05d}' for i in indices))


def load_one_class(
    name: str,
    normal_class: int,
    image_size: int,
    channels: int,
    data_dir: str | None = None,
    download: bool = True,
    num_workers: int = 8) -> tuple[AnomalyDataset, AnomalyDataset]:
  """The one-class (train, test) splits of a TFDS classification dataset.

  Args:
    name: 'mnist', 'fashion_mnist' or 'cifar10'.
    normal_class: the class in [0, 10) that is normal.
    image_size: output height and width S.
    channels: 1 or 3.
    data_dir: TFDS data_dir; None or '' uses TFDS's default
      (`$TFDS_DATA_DIR` or `~/tensorflow_datasets`).
    download: prepare the dataset if it is not prepared yet.
    num_workers: decoding threads.

  Returns:
    (train, test). train: the training images of `normal_class`, all label
    0. test: every test image, label 0 for `normal_class` and 1 otherwise,
    defect type 'good' or the class name. Images (N, S, S, C) uint8, masks
    (N, S, S) all False.

  Raises:
    DataError: bad arguments, the dataset cannot be prepared or read, or the
      training split has no image of `normal_class`.
  """
  if isinstance(normal_class, bool) or not isinstance(
      normal_class, (int, np.integer)) or not 0 <= normal_class < NUM_CLASSES:
    raise DataError(f'config.data.normal_class must be an integer in '
                    f'[0, {NUM_CLASSES}), got {normal_class!r}')
  check_image_format(name, image_size, channels)
  normal_class, image_size = int(normal_class), int(image_size)
  builder = _builder(name, data_dir or None, download)
  names = tuple(builder.info.features['label'].names)
  splits = []
  for split in ('train', 'test'):
    where = f'{builder.data_dir}: {name}/{split}'
    source = _split_source(builder, split)
    images, labels, indices = _read_split(
        source, where, normal_class if split == 'train' else None)
    if not images:
      raise DataError(f'{where}: no image of class {normal_class} '
                      f'({names[normal_class]}) among {len(source)}' if split ==
                      'train' else f'{where}: the test split is empty')
    splits.append(
        _to_dataset(name, split, images, labels, indices, normal_class, names,
                    image_size, channels, num_workers))
  return splits[0], splits[1]


def one_class_datasets(
    data: typed_config.DataSettings) -> tuple[AnomalyDataset, AnomalyDataset]:
  """`load_one_class` from the data settings (used by `data.get_datasets`).

  Fields read (`config.data`): `name`, `normal_class`, `image_size`,
  `channels`, `root` (TFDS data_dir, '' for TFDS's default), `download` and
  `num_workers`.
  """
  return load_one_class(
      data.name,
      data.normal_class,
      int(data.image_size),
      int(data.channels),
      data_dir=data.root or None,
      download=bool(data.download),
      num_workers=int(data.num_workers))
