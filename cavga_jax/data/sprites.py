"""Ground-truth-factor datasets on the dSprites factor grid.

Liu et al.'s attention disentanglement (SPEC section 3) is measured on
dSprites (Matthey et al. 2017): 64x64 binary images of one white shape on
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
`FactorDataset`:

* `RenderedSprites` ('rendered_sprites'): a numpy renderer of the grid. No
  download and no storage: the factors of example ``i`` are
  ``np.unravel_index(i, factor_sizes)`` (dSprites's own row-major order) and
  its image is drawn on demand, deterministically (~2 ms for 64 images on a
  CPU core). The shapes imitate dSprites, they are not its pixels.
* `TfdsSprites` ('dsprites'): the real dSprites through TFDS, read as an
  array_record random-access source (no TensorFlow needed to read; see
  `cavga_jax.data.tfds_data` about preparing).

`load_sprites(name, ...)` picks one by name. Images are (n, 64, 64, 1) uint8
with values 0 and 255 in both.
"""

from __future__ import annotations

import abc
import logging
import math
from typing import Any, Sequence

import numpy as np

from cavga_jax.data import tfds_data
from cavga_jax.errors import DataError

IMAGE_SIZE = 64
FACTOR_NAMES = ('shape', 'scale', 'orientation', 'pos_x', 'pos_y')
DSPRITES_FACTOR_SIZES = (3, 6, 40, 32, 32)
SHAPE_NAMES = ('square', 'ellipse', 'heart')
SPRITES_DATASETS = ('rendered_sprites', 'dsprites')
# The TFDS label feature of each factor, in FACTOR_NAMES order.
TFDS_LABELS = ('label_shape', 'label_scale', 'label_orientation',
               'label_x_position', 'label_y_position')
_TFDS_NAME = 'dsprites'

# Rendering geometry, in pixels. A shape at scale 1 spans about 2 * _UNIT px
# (square 16x16, ellipse 21x10, heart 17x16); the farthest point of any
# shape from its centre, over all rotations, is _MAX_RADIUS * _UNIT * scale,
# so the centres stay in [_MARGIN, 64 - _MARGIN] and every shape lies inside
# the image.
_UNIT = 8.0
_ELLIPSE_AXES = (1.3, 0.65)
_HEART_ZOOM, _HEART_SHIFT = 1.1, 0.118
_MAX_RADIUS = math.sqrt(2.0)  # the square's corner; ellipse 1.3, heart 1.22
_MARGIN = math.ceil(_MAX_RADIUS * _UNIT) + 1.0
# Side of the window each shape is drawn in (odd, > 2 * max radius + 2).
_PATCH = 2 * math.ceil(_MAX_RADIUS * _UNIT) + 3
# Images per vectorised rendering pass (bounds the float32 temporaries to
# a few MiB).
_RENDER_CHUNK = 256
# Records per batched TFDS read.
_READ_CHUNK = 1024

_log = logging.getLogger(__name__)
# Shared with the one-class TFDS loader.
_one_line = tfds_data._one_line  # pylint: disable=protected-access


class FactorDataset(abc.ABC):
  """A dataset of images with discrete ground-truth factors of variation.

  Subclasses provide `factor_names`, `factor_sizes`, `factors` and
  `images`; the sampling methods work from the rows of `factors` present,
  so they are right for the full grid and for any subset of it (a partial
  dataset, TFDS mock data).

  Attributes:
    factor_names: (F,) names of the factors.
    factor_sizes: (F,) number of possible values of each factor; factor k
      takes integer values in [0, factor_sizes[k]).
  """

  factor_names: tuple[str, ...]
  factor_sizes: tuple[int, ...]

  @property
  @abc.abstractmethod
  def factors(self) -> np.ndarray:
    """(N, F) int64: the factor values of every example, row i = example i."""

  @abc.abstractmethod
  def images(self, indices: np.ndarray) -> np.ndarray:
    """(n, H, W, C) uint8 images of the examples `indices` ((n,) ints)."""

  @property
  def num_examples(self) -> int:
    return int(self.factors.shape[0])

  def factors_of(self, indices: np.ndarray) -> np.ndarray:
    """(n, F) int64 factors of the examples `indices` ((n,) ints)."""
    return self.factors[_check_indices(indices, self.num_examples)]

  @property
  def num_factors(self) -> int:
    return len(self.factor_names)

  def sample_indices(self, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n,) int64 example indices drawn uniformly, with replacement."""
    _check_count(n)
    return rng.integers(0, self.num_examples, size=n, dtype=np.int64)

  def sample_indices_with_fixed_factor(
      self, factor: int, n: int, rng: np.random.Generator
  ) -> tuple[int, np.ndarray]:
    """n examples that share one value of `factor`.

    The value is drawn uniformly among the values of `factor` present in the
    dataset, then n examples having it are drawn uniformly with replacement
    (on the full grid: the other factors are uniform and independent).

    Args:
      factor: the factor index in [0, F).
      n: number of examples.
      rng: the random generator.

    Returns:
      (value, indices): the fixed value and (n,) int64 example indices.
    """
    _check_count(n)
    values, order, starts, counts = self._groups(self._check_factor(factor))
    j = rng.integers(len(values))
    picks = starts[j] + rng.integers(0, counts[j], size=n)
    return int(values[j]), order[picks]

  def _check_factor(self, factor: int) -> int:
    if not 0 <= factor < self.num_factors:
      raise ValueError(f'factor must be in [0, {self.num_factors}), got '
                       f'{factor!r}')
    return int(factor)

  def _groups(self, factor: int) -> tuple[np.ndarray, ...]:
    """(values present, example order sorted by value, group starts, counts)."""
    cache = self.__dict__.setdefault('_group_cache', {})
    if factor not in cache:
      column = self.factors[:, factor]
      order = np.argsort(column, kind='stable')
      values, starts, counts = np.unique(column[order], return_index=True,
                                         return_counts=True)
      cache[factor] = (values, order.astype(np.int64), starts, counts)
    return cache[factor]


def _check_count(n: int) -> None:
  if n < 0:
    raise ValueError(f'the number of examples must be >= 0, got {n}')


def _check_indices(indices: np.ndarray, num_examples: int) -> np.ndarray:
  indices = np.asarray(indices)
  if indices.ndim != 1 or not (indices.size == 0 or np.issubdtype(
      indices.dtype, np.integer)):
    raise ValueError(f'indices must be a 1-D integer array, got shape '
                     f'{indices.shape} and dtype {indices.dtype}')
  if indices.size and (indices.min() < 0 or indices.max() >= num_examples):
    raise IndexError(f'example indices must be in [0, {num_examples}), got '
                     f'[{indices.min()}, {indices.max()}]')
  return indices.astype(np.int64)


def factor_values(sizes: Sequence[int] = DSPRITES_FACTOR_SIZES
                  ) -> tuple[np.ndarray, ...]:
  """The physical value of each factor index (the table in the module doc).

  Args:
    sizes: (shape, scale, orientation, pos_x, pos_y) grid sizes; shape must
      be 3.

  Returns:
    Five float32 arrays: shape ids 0..2, scales, orientations (radians),
    x and y positions in [0, 1].
  """
  shapes, scales, orientations, xs, ys = sizes
  return (np.arange(shapes, dtype=np.float32),
          np.linspace(0.5, 1.0, scales, dtype=np.float32),
          np.linspace(0.0, 2 * np.pi, orientations, dtype=np.float32),
          np.linspace(0.0, 1.0, xs, dtype=np.float32),
          np.linspace(0.0, 1.0, ys, dtype=np.float32))


def _inside(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Whether the shape-frame points (u right, v down, unit size) are inside."""
  if shape == 0:  # square of half side 1
    return np.maximum(np.abs(u), np.abs(v)) <= 1.0
  if shape == 1:  # ellipse, long axis along u
    a, b = _ELLIPSE_AXES
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0
  # Heart: (X^2 + Y^2 - 1)^3 <= X^2 Y^3 with Y up, pointing down in the image,
  # shifted so its bounding box is centred.
  x = u * _HEART_ZOOM
  y = _HEART_SHIFT - v * _HEART_ZOOM
  r = x * x + y * y - 1.0
  return r * r * r <= x * x * y * y * y


def render_sprites(shape: np.ndarray, scale: np.ndarray,
                   orientation: np.ndarray, pos_x: np.ndarray,
                   pos_y: np.ndarray) -> np.ndarray:
  """Draws dSprites-like images from physical factor values.

  A pixel is white (255) when its centre lies inside the shape: the unit
  shape (square, ellipse or heart; see `_inside`) scaled by `_UNIT * scale`
  px, rotated by `orientation` radians (counter-clockwise on screen) about
  its centre, centred at `_MARGIN + pos * (64 - 2 * _MARGIN)` px (x: column,
  y: row).

  Args:
    shape: (n,) int shape ids (0 square, 1 ellipse, 2 heart).
    scale: (n,) scales in [0.5, 1].
    orientation: (n,) angles in radians.
    pos_x: (n,) horizontal positions in [0, 1].
    pos_y: (n,) vertical positions in [0, 1].

  Returns:
    (n, 64, 64, 1) uint8 images with values 0 and 255.
  """
  shape = np.asarray(shape, np.int64)
  n = shape.shape[0]
  if n and (shape.min() < 0 or shape.max() >= len(SHAPE_NAMES)):
    raise ValueError(f'shape ids must be in [0, {len(SHAPE_NAMES)}), got '
                     f'[{shape.min()}, {shape.max()}]')
  out = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE, 1), np.uint8)
  span = IMAGE_SIZE - 2 * _MARGIN
  # Each shape is drawn in a _PATCH x _PATCH window around its centre (it
  # fits: its radius is at most _MAX_RADIUS * _UNIT < _PATCH / 2 - 1), then
  # pasted into the black image: 5-6x fewer pixels to test than 64 x 64.
  offsets = np.arange(_PATCH)
  params = [np.asarray(p, np.float32)
            for p in (scale, orientation, pos_x, pos_y)]
  for start in range(0, n, _RENDER_CHUNK):
    stop = min(start + _RENDER_CHUNK, n)
    s, theta, x, y = (p[start:stop] for p in params)
    cx = _MARGIN + x * span
    cy = _MARGIN + y * span
    ox = np.clip(np.floor(cx).astype(np.int64) - _PATCH // 2, 0,
                 IMAGE_SIZE - _PATCH)
    oy = np.clip(np.floor(cy).astype(np.int64) - _PATCH // 2, 0,
                 IMAGE_SIZE - _PATCH)
    # Pixel centre minus shape centre, in px.
    dx = ((ox[:, None] + offsets + 0.5) - cx[:, None])[:, None, :]  # (m,1,P)
    dy = ((oy[:, None] + offsets + 0.5) - cy[:, None])[:, :, None]  # (m,P,1)
    cos = np.cos(theta)[:, None, None]
    sin = np.sin(theta)[:, None, None]
    size = (_UNIT * s)[:, None, None]
    # Rotating the shape by +theta counter-clockwise on screen (y down) is
    # rotating the pixel offsets by -theta into the shape frame.
    u = ((cos * dx - sin * dy) / size).astype(np.float32)   # (m, P, P)
    v = ((sin * dx + cos * dy) / size).astype(np.float32)
    patch = np.empty(u.shape, np.uint8)
    for k in np.unique(shape[start:stop]):
      rows = np.flatnonzero(shape[start:stop] == k)
      patch[rows] = _inside(int(k), u[rows], v[rows]) * np.uint8(255)
    m = np.arange(start, stop)[:, None, None]
    out[m, (oy[:, None] + offsets)[:, :, None],
        (ox[:, None] + offsets)[:, None, :], 0] = patch
  return out


class RenderedSprites(FactorDataset):
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

  def __init__(self, scales: int = 6, orientations: int = 40,
               positions: int = 32):
    for name, size in (('scales', scales), ('orientations', orientations),
                       ('positions', positions)):
      if isinstance(size, bool) or not isinstance(
          size, (int, np.integer)) or size < 1:
        raise DataError(f'rendered_sprites: {name} must be a positive '
                        f'integer, got {size!r}')
    self.factor_sizes = (len(SHAPE_NAMES), int(scales), int(orientations),
                         int(positions), int(positions))
    self.values = factor_values(self.factor_sizes)
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
    indices = _check_indices(indices, self.num_examples)
    return np.stack(np.unravel_index(indices, self.factor_sizes), axis=1)

  def indices_of(self, factors: np.ndarray) -> np.ndarray:
    """(n,) example indices of the (n, 5) int factor rows `factors`."""
    return np.ravel_multi_index(tuple(np.asarray(factors).T),
                                self.factor_sizes).astype(np.int64)

  def images_of_factors(self, factors: np.ndarray) -> np.ndarray:
    """(n, 64, 64, 1) uint8 images of the (n, 5) int factor rows `factors`."""
    factors = np.asarray(factors, np.int64)
    if factors.ndim != 2 or factors.shape[1] != len(self.factor_sizes):
      raise ValueError(f'factors must have shape (n, 5), got {factors.shape}')
    if factors.size and ((factors < 0).any() or (
        factors >= np.asarray(self.factor_sizes)).any()):
      raise IndexError(f'factor values must be in [0, size) with sizes '
                       f'{self.factor_sizes}')
    return render_sprites(*(values[column] for values, column in zip(
        self.values, factors.T)))

  def images(self, indices: np.ndarray) -> np.ndarray:
    """(n, 64, 64, 1) uint8 images (0 or 255) of the examples `indices`."""
    return self.images_of_factors(self.factors_of(indices))

  def sample_indices_with_fixed_factor(
      self, factor: int, n: int, rng: np.random.Generator
  ) -> tuple[int, np.ndarray]:
    """As `FactorDataset`'s, drawing the free factors directly (no table)."""
    _check_count(n)
    factor = self._check_factor(factor)
    value = int(rng.integers(self.factor_sizes[factor]))
    factors = np.stack([rng.integers(0, size, size=n, dtype=np.int64)
                        for size in self.factor_sizes], axis=1)
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


class TfdsSprites(FactorDataset):
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

  def __init__(self, data_dir: str | None = None, download: bool = True,
               split: str = 'train'):
    builder = tfds_data._builder(  # pylint: disable=protected-access
        _TFDS_NAME, data_dir or None, download, known=(_TFDS_NAME,),
        kind='ground-truth-factor')
    self._where = f'{builder.data_dir}: {_TFDS_NAME}/{split}'
    features = builder.info.features
    missing = [name for name in TFDS_LABELS + ('image',)
               if name not in features]
    if missing:
      raise DataError(f'{self._where}: no feature {", ".join(missing)} '
                      f'(features: {", ".join(features)})')
    self.factor_sizes = tuple(int(features[name].num_classes)
                              for name in TFDS_LABELS)
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
      _log.info('%s: reading the labels with image decoding (%s)',
                self._where, _one_line(e))
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
    indices = _check_indices(indices, self.num_examples)
    out = np.zeros((len(indices), IMAGE_SIZE, IMAGE_SIZE, 1), np.uint8)
    try:
      records = _get_records(self._source, indices.tolist())
    except Exception as e:  # pylint: disable=broad-except
      raise DataError(f'{self._where}: cannot read records '
                      f'({_one_line(e)})') from None
    for i, (key, record) in enumerate(zip(indices, records)):
      image = np.asarray(record['image'])
      if image.shape != (IMAGE_SIZE, IMAGE_SIZE, 1):
        raise DataError(f'{self._where}: record {key} has an image of shape '
                        f'{image.shape}, expected (64, 64, 1)')
      out[i] = (image > 0) * np.uint8(255)
    return out


def load_sprites(name: str, data_dir: str | None = None,
                 download: bool = True, scales: int = 6,
                 orientations: int = 40, positions: int = 32
                 ) -> FactorDataset:
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
    return RenderedSprites(scales=scales, orientations=orientations,
                           positions=positions)
  if name == _TFDS_NAME:
    if (scales, orientations, positions) != DSPRITES_FACTOR_SIZES[1:4]:
      raise DataError(f'{name}: the grid sizes (scales={scales}, '
                      f'orientations={orientations}, positions={positions}) '
                      f'apply to rendered_sprites only')
    return TfdsSprites(data_dir=data_dir, download=download)
  raise DataError(f'config.data.name: {name!r} is not a sprites dataset '
                  f'(known: {", ".join(SPRITES_DATASETS)})')
