"""Loads datasets stored in the MVTec AD folder layout.

Layout::

  <root>/<category>/train/good/*.png
  <root>/<category>/test/<defect>/*.png            # defect 'good' = normal
  <root>/<category>/ground_truth/<defect>/<stem>_mask.png

Every problem with the input raises `cavga_jax.errors.DataError` whose message
is one line naming the offending path and the problem; PIL and OS errors never
escape.

Images of any PIL mode are converted, not rejected: grayscale is expanded to
RGB (or kept for ``channels=1``), palette images go through their palette,
alpha is dropped, 16-bit images are rescaled to 8 bits (65535 -> 255).

Masks are converted to 8-bit grayscale the same way and a pixel is a defect
pixel when its value is >= 128 (MVTec AD masks are 0 and 255). The threshold
tolerates anti-aliased edges and JPEG noise, but a mask that is clearly not a
0/255 mask is rejected rather than silently binarised:

* it has nonzero values yet none >= 128 (e.g. a 0/1 or class-index label
  mask, which thresholding would turn into an empty mask);
* more than `MAX_GRAY_MASK_FRACTION` of its pixels are gray, i.e. in
  `GRAY_MASK_VALUES` (a heat map, an attention map or a photo).

Masks must have the size of their image; they are resized with the image
after thresholding (nearest neighbour), so they stay binary.

Images and masks are decoded by ``cavga_jax.data.images`` (upright by their
EXIF orientation, like ``predict.py``'s).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import pathlib

import numpy as np
from PIL import Image

from cavga_jax.data.images import model_input
from cavga_jax.data.images import one_line
from cavga_jax.data.images import open_image
from cavga_jax.data.images import read_image
from cavga_jax.data.images import to_8bit
from cavga_jax.errors import DataError

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')
NORMAL_DEFECT = 'good'
SPLITS = ('train', 'test')
MASK_SUFFIX = '_mask'

# Mask pixels >= this value (after conversion to 8-bit gray) are defects.
MASK_THRESHOLD = 128
# Values that are neither clearly background nor clearly defect, and the
# fraction of such pixels above which a mask is rejected as not binary.
GRAY_MASK_VALUES = (32, 223)
MAX_GRAY_MASK_FRACTION = 0.05


@dataclasses.dataclass(frozen=True, eq=False)
class AnomalyDataset:
  """An in-memory anomaly-detection split.

  Attributes:
    images: (N, H, W, C) uint8 images.
    masks: (N, H, W) bool ground-truth defect masks; all False for normal
      images.
    labels: (N,) int32, 0 for normal and 1 for anomalous images.
    defect_types: N strings, 'good' or the defect folder name.
    paths: N image file paths.
  """
  images: np.ndarray
  masks: np.ndarray
  labels: np.ndarray
  defect_types: tuple[str, ...]
  paths: tuple[str, ...]

  def __post_init__(self):
    n = self.images.shape[0]
    # A mismatch here is a programming error in whoever built the dataset, so
    # fail at construction rather than deep inside training or evaluation.
    if (self.images.ndim != 4 or self.masks.shape != self.images.shape[:3]
        or self.labels.shape != (n,) or len(self.defect_types) != n
        or len(self.paths) != n):
      raise ValueError(
          'AnomalyDataset: inconsistent shapes: images '
          f'{self.images.shape}, masks {self.masks.shape}, labels '
          f'{self.labels.shape}, {len(self.defect_types)} defect types, '
          f'{len(self.paths)} paths')

  @property
  def num_examples(self) -> int:
    """Number of images N."""
    return int(self.images.shape[0])


@dataclasses.dataclass(frozen=True)
class _Item:
  """One image to decode (and its mask for anomalous test images)."""
  path: pathlib.Path
  defect: str
  mask_path: pathlib.Path | None


def _is_image_file(path: pathlib.Path) -> bool:
  # Hidden files (e.g. macOS '._000.png' resource forks) carry image
  # extensions but are not images.
  return (path.is_file() and not path.name.startswith('.')
          and path.suffix.lower() in IMAGE_EXTENSIONS)


def _list_images(folder: pathlib.Path) -> list[pathlib.Path]:
  try:
    entries = list(folder.iterdir())
  except OSError as e:
    raise DataError(f'{folder}: cannot list folder ({one_line(e)})') from None
  return sorted((p for p in entries if _is_image_file(p)), key=lambda p: p.name)


def _list_subfolders(folder: pathlib.Path) -> list[pathlib.Path]:
  try:
    entries = list(folder.iterdir())
  except OSError as e:
    raise DataError(f'{folder}: cannot list folder ({one_line(e)})') from None
  folders = (p for p in entries if p.is_dir() and not p.name.startswith('.'))
  return sorted(folders, key=lambda p: p.name)


def _decode_item(item: _Item, image_size: int, channels: int,
                 image_out: np.ndarray, mask_out: np.ndarray) -> None:
  """Decodes one image (and mask) into the preallocated output rows."""
  converted = read_image(item.path, channels)
  original_size = converted.size
  size = (image_size, image_size)
  image_out[...] = model_input(converted, image_size, channels)

  if item.mask_path is None:
    mask_out[...] = False
    return
  mask = open_image(item.mask_path, 'mask')
  if mask.size != original_size:
    raise DataError(
        f'{item.mask_path}: mask size {mask.size[0]}x{mask.size[1]} differs '
        f'from image size {original_size[0]}x{original_size[1]} of '
        f'{item.path}')
  try:
    gray = to_8bit(mask, 1)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f'{item.mask_path}: cannot convert mask of mode '
                    f'{mask.mode} ({one_line(e)})') from None
  binary = _binarize_mask(np.asarray(gray), item.mask_path)
  if not binary.any():
    # Checked at the file's size: resizing can legitimately erase a tiny
    # defect, an all-zero file marks none at all.
    raise DataError(
        f'{item.mask_path}: mask is all zero, so it marks no defect of the '
        f'defect image {item.path}; mark the defect with 255 or move the '
        'image to test/good')
  if gray.size != size:
    # NEAREST keeps the mask binary and aligned with the bilinear image.
    binary = np.asarray(Image.fromarray(binary).resize(size, Image.NEAREST))
  mask_out[...] = binary


def _binarize_mask(values: np.ndarray, path: pathlib.Path) -> np.ndarray:
  """Thresholds an 8-bit mask at MASK_THRESHOLD; rejects non-binary masks."""
  defect = values >= MASK_THRESHOLD
  top = int(values.max()) if values.size else 0
  if 0 < top < MASK_THRESHOLD:
    raise DataError(
        f'{path}: mask is not binary: values are 0..{top} and none is >= '
        f'{MASK_THRESHOLD}, so it would mark no defect pixel; defect pixels '
        'must be 255 (a 0/1 mask must be multiplied by 255)')
  low, high = GRAY_MASK_VALUES
  gray = np.count_nonzero((values >= low) & (values <= high))
  if gray > MAX_GRAY_MASK_FRACTION * values.size:
    raise DataError(
        f'{path}: mask is not binary: {100 * gray / values.size:.0f}% of its '
        f'pixels are gray ({low}..{high}); masks must be 0 (normal) and 255 '
        '(defect), binarise it first')
  return defect


def _category_dir(root: str, category: str) -> pathlib.Path:
  root_path = pathlib.Path(root)
  if not root_path.is_dir():
    raise DataError(f'{root_path}: dataset root folder does not exist')
  category_path = root_path / category
  if not category or not category_path.is_dir():
    found = [p.name for p in _list_subfolders(root_path)]
    raise DataError(
        f'{category_path}: category folder does not exist (categories found '
        f'under {root_path}: {", ".join(found) if found else "none"})')
  return category_path


def _train_items(category_path: pathlib.Path) -> list[_Item]:
  good = category_path / 'train' / NORMAL_DEFECT
  if not good.is_dir():
    raise DataError(f'{good}: train folder of normal images does not exist')
  return [_Item(p, NORMAL_DEFECT, None) for p in _list_images(good)]


def _mask_stem(mask_path: pathlib.Path) -> str | None:
  stem = mask_path.stem
  if not stem.endswith(MASK_SUFFIX) or len(stem) == len(MASK_SUFFIX):
    return None
  return stem[:-len(MASK_SUFFIX)]


def _test_items(category_path: pathlib.Path) -> list[_Item]:
  test_path = category_path / 'test'
  truth_path = category_path / 'ground_truth'
  items = []
  image_stems: dict[str, set[str]] = {}
  for defect_path in _list_subfolders(test_path):
    defect = defect_path.name
    images = _list_images(defect_path)
    image_stems[defect] = {p.stem for p in images}
    if defect == NORMAL_DEFECT:
      items.extend(_Item(p, defect, None) for p in images)
      continue
    masks = {}
    mask_folder = truth_path / defect
    if mask_folder.is_dir():
      for mask_path in _list_images(mask_folder):
        stem = _mask_stem(mask_path)
        if stem is not None:
          masks.setdefault(stem, mask_path)
    for p in images:
      if p.stem not in masks:
        raise DataError(f'{mask_folder / (p.stem + MASK_SUFFIX + ".png")}: '
                        f'mask is missing for test image {p}')
      items.append(_Item(p, defect, masks[p.stem]))

  # Masks without an image usually mean a renamed or deleted test image; the
  # layout is then not what the user thinks it is, so refuse to guess.
  if truth_path.is_dir():
    for mask_folder in _list_subfolders(truth_path):
      defect = mask_folder.name
      stems = image_stems.get(defect, set())
      for mask_path in _list_images(mask_folder):
        stem = _mask_stem(mask_path)
        if stem is None:
          raise DataError(f'{mask_path}: mask file name is not '
                          f'<image stem>{MASK_SUFFIX}<ext>')
        if stem not in stems:
          raise DataError(f'{mask_path}: mask has no test image '
                          f'(no {test_path / defect / stem}.* exists)')
  return items


def check_image_format(source: str, image_size: int, channels: int) -> None:
  """Raises DataError (naming ``source``) for unusable size or channels."""
  if channels not in (1, 3):
    raise DataError(f'{source}: channels must be 1 or 3, got {channels}')
  if int(image_size) < 1:
    raise DataError(f'{source}: image_size must be positive, got {image_size}')


def load_split(root: str,
               category: str,
               split: str,
               image_size: int,
               channels: int,
               num_workers: int = 8) -> AnomalyDataset:
  """Loads one split of a category in the MVTec AD layout.

  Images are converted to `channels` channels (3: RGB, grayscale expanded;
  1: PIL 'L'; 16-bit images are rescaled to 8 bits) and resized to
  `image_size` x `image_size` with PIL's bilinear filter (antialiased when
  downscaling). Masks are binarised (>= 128 after conversion to 8-bit
  grayscale; clearly non-binary masks are rejected, see the module
  docstring), then resized with nearest neighbour. Files are sorted by name.

  Args:
    root: folder holding the category folders.
    category: category folder name, e.g. 'bottle'.
    split: 'train' (loads train/good only) or 'test' (every defect folder).
    image_size: output height and width in pixels.
    channels: 1 or 3.
    num_workers: decoding threads (PIL releases the GIL while decoding);
      values <= 1 decode in the calling thread.

  Returns:
    The split; images (N, image_size, image_size, channels) uint8, masks
    (N, image_size, image_size) bool, labels (N,) int32.

  Raises:
    DataError: a folder is missing or empty, an image or mask cannot be
      decoded, a mask is missing, has the wrong size, is not binary or has
      no image.
  """
  if split not in SPLITS:
    raise DataError(f'{root}: unknown split {split!r} (expected one of '
                    f'{", ".join(SPLITS)})')
  check_image_format(root, image_size, channels)
  image_size = int(image_size)

  category_path = _category_dir(root, category)
  split_path = category_path / split
  if not split_path.is_dir():
    raise DataError(f'{split_path}: split folder does not exist')
  items = (
      _train_items(category_path)
      if split == 'train' else _test_items(category_path))
  if not items:
    empty = split_path / NORMAL_DEFECT if split == 'train' else split_path
    raise DataError(f'{empty}: split has no images (extensions '
                    f'{", ".join(IMAGE_EXTENSIONS)})')

  n = len(items)
  images = np.empty((n, image_size, image_size, channels), np.uint8)
  masks = np.empty((n, image_size, image_size), bool)

  def decode(i: int) -> None:
    _decode_item(items[i], image_size, channels, images[i], masks[i])

  if num_workers <= 1:
    for i in range(n):
      decode(i)
  else:
    with concurrent.futures.ThreadPoolExecutor(
        max_workers=min(num_workers, n)) as pool:
      # Consuming the results in order re-raises the error of the first bad
      # file in sorted order, so the reported file does not depend on timing.
      for _ in pool.map(decode, range(n)):
        pass

  defect_types = tuple(item.defect for item in items)
  labels = np.array([d != NORMAL_DEFECT for d in defect_types], np.int32)
  return AnomalyDataset(
      images=images,
      masks=masks,
      labels=labels,
      defect_types=defect_types,
      paths=tuple(os.fspath(item.path) for item in items))
