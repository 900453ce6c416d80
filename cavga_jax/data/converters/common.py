"""Shared pieces of the converters: atomic output folders, image I/O."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
import concurrent.futures
import contextlib
import os
import pathlib
import shutil
import tempfile
from typing import TypeVar

import numpy as np
from PIL import Image

from cavga_jax.errors import DataError

IMAGE_FORMATS = ('jpg', 'png')
JPEG_QUALITY = 95

_T = TypeVar('_T')
_R = TypeVar('_R')


def one_line(exc: BaseException) -> str:
  """`Type: message` on one line, for embedding in a DataError."""
  return ' '.join(f'{type(exc).__name__}: {exc}'.split())


def require_dir(path: pathlib.Path, what: str) -> pathlib.Path:
  """Returns `path` if it is a folder, else raises DataError naming `what`."""
  if not path.is_dir():
    raise DataError(f'{path}: {what} folder does not exist')
  return path


@contextlib.contextmanager
def atomic_output(output: str | os.PathLike,
                  overwrite: bool) -> Iterator[pathlib.Path]:
  """Yields a fresh temporary folder that becomes `output` on success.

  The folder is a hidden sibling of `output` (same file system, so the final
  rename is atomic). If the body raises, it is deleted and `output` is left
  as it was: a failed conversion never leaves a half-written dataset.

  Args:
    output: the folder to create.
    overwrite: replace an existing non-empty `output`; otherwise that is an
      error (raised before any work is done).

  Raises:
    DataError: `output` exists and is not an empty folder (without
      `overwrite`), or cannot be created.
  """
  target = pathlib.Path(output).absolute()
  if target.exists() and not target.is_dir():
    raise DataError(f'{target}: output exists and is not a folder')
  if target.is_dir() and any(target.iterdir()) and not overwrite:
    raise DataError(f'{target}: output folder exists and is not empty (pass '
                    f'--overwrite to replace it)')
  try:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(
        tempfile.mkdtemp(prefix=f'.{target.name}.tmp-', dir=target.parent))
  except OSError as e:
    raise DataError(f'{target}: cannot create output ({one_line(e)})') from None
  try:
    yield tmp
    if target.exists():
      # os.replace cannot replace a non-empty folder: move the old one aside
      # first so that `output` is missing only for an instant.
      trash = pathlib.Path(
          tempfile.mkdtemp(prefix=f'.{target.name}.old-', dir=target.parent))
      os.replace(target, trash / 'old')
      os.replace(tmp, target)
      shutil.rmtree(trash, ignore_errors=True)
    else:
      os.replace(tmp, target)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def open_image(path: pathlib.Path, what: str) -> Image.Image:
  """Fully decodes an image file; DataError if it is empty or corrupt."""
  try:
    if path.stat().st_size == 0:
      raise DataError(f'{path}: {what} file is empty (0 bytes)')
    with Image.open(path) as image:
      # Truncated files often open and only fail when the pixels are read.
      image.load()
      return image.copy()
  except DataError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f'{path}: cannot decode {what}, the file is truncated or '
                    f'not an image ({one_line(e)})') from None


def save_image(image: Image.Image, path: pathlib.Path, image_format: str,
               resize: int) -> None:
  """Saves an RGB/L image as `image_format`, resized to resize x resize if > 0."""
  if resize and image.size != (resize, resize):
    image = image.resize((resize, resize), Image.BILINEAR)
  if image_format == 'jpg':
    image.convert('RGB' if image.mode not in ('L', 'RGB') else image.mode).save(
        path, quality=JPEG_QUALITY)
  else:
    image.save(path)


def save_mask(mask: np.ndarray, path: pathlib.Path, resize: int) -> None:
  """Saves a boolean (H, W) mask as an 8-bit PNG with values 0 and 255."""
  image = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8))
  if resize and image.size != (resize, resize):
    # Nearest keeps the mask binary and aligned with the bilinear image.
    image = image.resize((resize, resize), Image.NEAREST)
  image.save(path)


def parallel_map(fn: Callable[[_T], _R], items: Sequence[_T],
                 num_workers: int) -> list[_R]:
  """`[fn(x) for x in items]` on threads; re-raises the first error in order.

  Video decoding (PyAV) and image coding (PIL) release the GIL, so threads
  scale on the few cores a conversion machine has.
  """
  if num_workers <= 1 or len(items) <= 1:
    return [fn(item) for item in items]
  with concurrent.futures.ThreadPoolExecutor(
      max_workers=min(num_workers, len(items))) as pool:
    return list(pool.map(fn, items))


def check_common_args(image_format: str, resize: int, num_workers: int) -> None:
  """Validates the options that both converters take."""
  if image_format not in IMAGE_FORMATS:
    raise DataError(f'image format must be one of {", ".join(IMAGE_FORMATS)}, '
                    f'got {image_format!r}')
  if resize < 0:
    raise DataError(f'resize must be >= 0 (0 keeps the size), got {resize}')
  if num_workers < 1:
    raise DataError(f'num_workers must be >= 1, got {num_workers}')
