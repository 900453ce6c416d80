"""Ground-truth-factor datasets on the dSprites factor grid.

Liu et al.'s attention disentanglement (docs/protocol.md section 3) is
measured on dSprites (Matthey et al. 2017): 64x64 binary images of one white shape on
black, generated from five independent factors

==============  =====  ==============================================
factor          size   values (index i of the factor)
==============  =====  ==============================================
shape           3      square, ellipse, heart
scale           6      linspace(0.5, 1, 6)[i]
orientation     40     linspace(0, 2 pi, 40)[i] (radians; like dSprites,
                       the first and last values coincide)
pos_x           32     linspace(0, 1, 32)[i] (left to right)
pos_y           32     linspace(0, 1, 32)[i] (top to bottom)
==============  =====  ==============================================

i.e. 3 * 6 * 40 * 32 * 32 = 737,280 images. Two sources share one interface,
`factor_dataset.FactorDataset`:

* `RenderedSprites` ('rendered_sprites'): the grid drawn by
  `sprite_renderer`. No download and no storage: the factors of example
  ``i`` are ``np.unravel_index(i, factor_sizes)`` (dSprites's own row-major
  order) and its image is drawn on demand, deterministically (~2 ms for 64
  images on a CPU core). The shapes imitate dSprites, they are not its pixels.
* `TfdsSprites` ('dsprites'): the real dSprites through TFDS, read as an
  array_record random-access source (no TensorFlow needed to read; see
  `cavga_jax.data.tfds_data` about preparing).

`load_sprites(name, ...)` picks one by name. Images are (n, 64, 64, 1) uint8
with values 0 and 255 in both.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from cavga_jax.data import factor_dataset
from cavga_jax.data import sprite_renderer
from cavga_jax.data import tfds_data
from cavga_jax.errors import DataError

FACTOR_NAMES = ('shape', 'scale', 'orientation', 'pos_x', 'pos_y')
SPRITES_DATASETS = ('rendered_sprites', 'dsprites')
# The TFDS label feature of each factor, in FACTOR_NAMES order.
TFDS_LABELS = ('label_shape', 'label_scale', 'label_orientation',
               'label_x_position', 'label_y_position')
_TFDS_NAME = 'dsprites'
# Records per batched TFDS read.
_READ_CHUNK = 1024

_log = logging.getLogger(__name__)
# Shared with the one-class TFDS loader.
_one_line = tfds_data._one_line  # pylint: disable=protected-access


class RenderedSprites(factor_dataset.FactorDataset):
  """The dSprites grid drawn with numpy: no download, no storage.

  Example i has the factors ``np.unravel_index(i, factor_sizes)`` (shape
  slowest, pos_y fastest, as in the dSprites file) and the image
  `render_sprites` draws from their values (`factor_values`). The factor
  table is built only when `factors` is read (the sampling methods do not
  need it).

  Smaller grids keep the value ranges and only use fewer steps, e.g.
  ``RenderedSprites(positions=16)`` (92,160 images, 2.5 px steps) or
  ``RenderedSprites(orientations=10, positions=8)`` for fast tests and
  configs; the default is the dSprites grid (737,280 images).

  Args:
    scales: number of scale values in [0.5, 1].
    orientations: number of orientation values in [0, 2 pi].
    positions: number of x and of y positions in [0, 1].
  """

  factor_names = FACTOR_NAMES

  def __init__(self,
               scales: int = 6,
               orientations: int = 40,
               positions: int = 32):
    for name, size in (('scales', scales), ('orientations', orientations),
                       ('positions', positions)):
      if isinstance(
          size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise DataError(f'rendered_sprites: {name} must be a positive '
                        f'integer, got {size!r}')
    self.factor_sizes = (len(sprite_renderer.SHAPE_NAMES), int(scales),
                         int(orientations), int(positions), int(positions))
    self.values = sprite_renderer.factor_values(self.factor_sizes)
    self._factors = None

  @property
  def num_examples(self) -> int:
    return math.prod(self.factor_sizes)

  @property
  def factors(self) -> np.ndarray:
    if self._factors is None:
      grid = np.indices(self.factor_sizes, dtype=np.int64)
      self._factors = grid.reshape(len(self.factor_sizes), -1).T
    return self._factors

  def factors_of(self, indices: np.ndarray) -> np.ndarray:
    """(n, 5) int64 factors of the examples `indices` (no table needed)."""
    indices = factor_dataset.check_indices(indices, self.num_examples)
    return np.stack(np.unravel_index(indices, self.factor_sizes), axis=1)

  def indices_of(self, factors: np.ndarray) -> np.ndarray:
    """(n,) example indices of the (n, 5) int factor rows `factors`."""
    return np.ravel_multi_index(
        tuple(np.asarray(factors).T), self.factor_sizes).astype(np.int64)

  def images_of_factors(self, factors: np.ndarray) -> np.ndarray:
    """(n, 64, 64, 1) uint8 images of the (n, 5) int factor rows `factors`."""
    factors = np.asarray(factors, np.int64)
    if factors.ndim != 2 or factors.shape[1] != len(self.factor_sizes):
      raise ValueError(f'factors must have shape (n, 5), got {factors.shape}')
    if factors.size and ((factors < 0).any() or
                         (factors >= np.asarray(self.factor_sizes)).any()):
      raise IndexError(f'factor values must be in [0, size) with sizes '
                       f'{self.factor_sizes}')
    return sprite_renderer.render_sprites(
        *(values[column] for values, column in zip(self.values, factors.T)))

  def images(self, indices: np.ndarray) -> np.ndarray:
    """(n, 64, 64, 1) uint8 images (0 or 255) of the examples `indices`."""
    return self.images_of_factors(self.factors_of(indices))

  def sample_indices_with_fixed_factor(
      self, factor: int, n: int,
      rng: np.random.Generator) -> tuple[int, np.ndarray]:
    """As `FactorDataset`'s, drawing the free factors directly (no table)."""
    factor_dataset.check_count(n)
    factor = self._check_factor(factor)
    value = int(rng.integers(self.factor_sizes[factor]))
    factors = np.stack([
        rng.integers(0, size, size=n, dtype=np.int64)
        for size in self.factor_sizes
    ],
                       axis=1)
    factors[:, factor] = value
    return value, self.indices_of(factors)


def _get_records(source: Any, keys: list[int]) -> list[Any]:
  """Reads records `keys` of a TFDS data source, batched when it can."""
  if hasattr(source, '__getitems__'):
    try:
      return list(source.__getitems__(keys))
    except TypeError:
      # The data source of tfds.testing.mock_data (TFDS 4.9.10) has a broken
      # __getitems__; read one record at a time.
      pass
  return [source[k] for k in keys]


def _labels(records: list[Any]) -> np.ndarray:
  return np.asarray([[int(r[name]) for name in TFDS_LABELS] for r in records],
                    np.int64).reshape(len(records), len(TFDS_LABELS))


class TfdsSprites(factor_dataset.FactorDataset):
  """dSprites from TFDS ('dsprites'), read without TensorFlow.

  The factor table comes from the `label_shape`, `label_scale`,
  `label_orientation`, `label_x_position` and `label_y_position` features
  (read once when the dataset is opened: the whole train split, i.e. 737,280
  records; their PNGs are not decoded when TFDS can skip them, see
  `_read_factors`). Images are decoded on demand. TFDS stores dSprites's
  images with values 0 and 1; they come out as 0 and 255 (any non-zero
  pixel is white), as `RenderedSprites` draws them. TFDS shuffles the
  examples when preparing, so index i is not the grid position of
  `RenderedSprites` (the factor table says what it is).

  Args:
    data_dir: TFDS data_dir; None or '' uses TFDS's default.
    download: prepare the dataset if it is not prepared yet (needs
      TensorFlow once, see `cavga_jax.data.tfds_data`).
    split: the TFDS split (dSprites only has 'train'; a slice such as
      'train[:10%]' gives a partial grid).

  Raises:
    DataError: the dataset cannot be prepared or read, or lacks a label
      feature.
  """

  factor_names = FACTOR_NAMES

  def __init__(self,
               data_dir: str | None = None,
               download: bool = True,
               split: str = 'train'):
    builder = tfds_data._builder(  # pylint: disable=protected-access
        _TFDS_NAME,
        data_dir or None,
        download,
        known=(_TFDS_NAME,),
        kind='ground-truth-factor')
    self._where = f'{builder.data_dir}: {_TFDS_NAME}/{split}'
    features = builder.info.features
    missing = [
        name for name in TFDS_LABELS + ('image',) if name not in features
    ]
    if missing:
      raise DataError(f'{self._where}: no feature {", ".join(missing)} '
                      f'(features: {", ".join(features)})')
    self.factor_sizes = tuple(
        int(features[name].num_classes) for name in TFDS_LABELS)
    self._source = tfds_data._split_source(  # pylint: disable=protected-access
        builder, split)
    self._factors = self._read_factors(builder, split)
    if not len(self._factors):
      raise DataError(f'{self._where}: the split is empty')

  @property
  def factors(self) -> np.ndarray:
    return self._factors

  def _read_factors(self, builder: Any, split: str) -> np.ndarray:
    """Reads the label features of every record in chunks.

    With a real array_record source, `tfds.decode.SkipDecoding()` on the
    image keeps the PNG bytes undecoded (pure numpy). Under
    `tfds.testing.mock_data` (TFDS 4.9.10) that source needs TensorFlow to
    encode its fake images, so when the first read with skipping fails, the
    labels are read from the fully decoding source instead.
    """
    tfds = tfds_data._tfds()  # pylint: disable=protected-access
    source = None
    try:
      source = builder.as_data_source(
          split=split, decoders={'image': tfds.decode.SkipDecoding()})
      if len(source):
        _get_records(source, [0])
    except Exception as e:  # pylint: disable=broad-except
      _log.info('%s: reading the labels with image decoding (%s)', self._where,
                _one_line(e))
      source = self._source
    n = len(source)
    factors = np.empty((n, len(TFDS_LABELS)), np.int64)
    start = 0
    try:
      for start in range(0, n, _READ_CHUNK):
        keys = list(range(start, min(start + _READ_CHUNK, n)))
        factors[start:start + len(keys)] = _labels(_get_records(source, keys))
    except Exception as e:  # pylint: disable=broad-except
      raise DataError(f'{self._where}: cannot read records {start}-'
                      f'{start + _READ_CHUNK - 1} '
                      f'({_one_line(e)})') from None
    bad = (factors < 0) | (factors >= np.asarray(self.factor_sizes))
    if bad.any():
      row = int(np.argwhere(bad)[0, 0])
      raise DataError(f'{self._where}: record {row} has labels '
                      f'{factors[row].tolist()} outside the sizes '
                      f'{self.factor_sizes}')
    return factors

  def images(self, indices: np.ndarray) -> np.ndarray:
    """(n, 64, 64, 1) uint8 images (0 or 255) of the examples `indices`."""
    indices = factor_dataset.check_indices(indices, self.num_examples)
    size = sprite_renderer.IMAGE_SIZE
    out = np.zeros((len(indices), size, size, 1), np.uint8)
    try:
      records = _get_records(self._source, indices.tolist())
    except Exception as e:  # pylint: disable=broad-except
      raise DataError(f'{self._where}: cannot read records '
                      f'({_one_line(e)})') from None
    for i, (key, record) in enumerate(zip(indices, records)):
      image = np.asarray(record['image'])
      if image.shape != (size, size, 1):
        raise DataError(f'{self._where}: record {key} has an image of shape '
                        f'{image.shape}, expected (64, 64, 1)')
      out[i] = (image > 0) * np.uint8(255)
    return out


def load_sprites(name: str,
                 data_dir: str | None = None,
                 download: bool = True,
                 scales: int = 6,
                 orientations: int = 40,
                 positions: int = 32) -> factor_dataset.FactorDataset:
  """The ground-truth-factor dataset called `name`.

  Args:
    name: 'rendered_sprites' (`RenderedSprites`) or 'dsprites'
      (`TfdsSprites`).
    data_dir: TFDS data_dir for 'dsprites' (None or '': TFDS's default);
      unused by 'rendered_sprites'.
    download: for 'dsprites', prepare the dataset if it is not prepared.
    scales: grid size of 'rendered_sprites' (see `RenderedSprites`).
    orientations: grid size of 'rendered_sprites'.
    positions: grid size of 'rendered_sprites'.

  Returns:
    The dataset.

  Raises:
    DataError: unknown name, a grid size other than dSprites's for
      'dsprites', or the dataset cannot be loaded.
  """
  if name == 'rendered_sprites':
    return RenderedSprites(
        scales=scales, orientations=orientations, positions=positions)
  if name == _TFDS_NAME:
    if ((scales, orientations, positions)
        != sprite_renderer.DSPRITES_FACTOR_SIZES[1:4]):
      raise DataError(f'{name}: the grid sizes (scales={scales}, '
                      f'orientations={orientations}, positions={positions}) '
                      f'apply to rendered_sprites only')
    return TfdsSprites(data_dir=data_dir, download=download)
  raise DataError(f'config.data.name: {name!r} is not a sprites dataset '
                  f'(known: {", ".join(SPRITES_DATASETS)})')
