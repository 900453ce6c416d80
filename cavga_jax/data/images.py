"""Decoding one image file: any PIL mode to 8-bit gray or RGB, upright.

Images of any PIL mode are converted, not rejected: grayscale is expanded to
RGB (or kept for ``channels=1``), palette images go through their palette,
alpha is dropped, 16-bit images are rescaled to 8 bits (65535 -> 255).
Every file is turned upright by its EXIF orientation
(``PIL.ImageOps.exif_transpose``) as it is decoded, so the training loader
(``folder``) and ``predict.py`` both see a rotated JPEG the way a viewer
shows it. Every problem raises a one-line ``DataError`` naming the file.
"""

from __future__ import annotations

import math
import pathlib

import numpy as np
from PIL import Image
from PIL import ImageOps

from cavga_jax.errors import DataError

# Modes that hold more than 8 bits per sample in a single band. PIL's own
# conversion of these to 'L' clips at 255 instead of rescaling.
_WIDE_INT_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I')
# Modes ``Image.reduce`` averages as they are: not palette indices or bits,
# and no alpha (which it premultiplies in a full-size copy, while to_8bit
# drops it).
_REDUCIBLE_MODES = ('L', 'RGB', 'RGBX', 'CMYK', 'YCbCr', 'I')


def one_line(exc: BaseException) -> str:
  """An exception as one line: its type and message, whitespace collapsed."""
  text = f'{type(exc).__name__}: {exc}'
  return ' '.join(text.split())


def to_8bit(image: Image.Image, channels: int) -> Image.Image:
  """Converts a loaded PIL image of any mode to 'L' (channels 1) or 'RGB'."""
  mode = image.mode
  if mode in _WIDE_INT_MODES:
    # 16-bit data: rescale the full range to 8 bits (65535 -> 255) instead of
    # letting PIL clip everything above 255 to white.
    wide = np.asarray(image).astype(np.int64)
    image = Image.fromarray(
        np.clip((wide + 128) // 257, 0, 255).astype(np.uint8))
  elif mode == 'F':
    raise ValueError('32-bit float images are not supported')
  if channels == 1:
    return image.convert('L')
  if mode in ('P', 'PA') and 'transparency' in image.info:
    # Going through RGBA applies the palette's transparency entry the way PIL
    # expects; the alpha band is then dropped like for RGBA images.
    image = image.convert('RGBA')
  return image.convert('RGB')


def reduction_factor(size: tuple[int, int], max_pixels: int | None) -> int:
  """The smallest integer f with ceil(W / f) * ceil(H / f) <= ``max_pixels``.

  ``size`` is PIL's (W, H); 1 (no reduction) when ``max_pixels`` is None.
  """
  if not max_pixels:
    return 1
  width, height = size
  factor = max(1, math.isqrt(width * height // max(1, max_pixels)))
  while -(-width // factor) * -(-height // factor) > max_pixels:
    factor += 1
  return factor


def _reducible(image: Image.Image, channels: int) -> Image.Image:
  """``image`` in a mode whose pixels ``Image.reduce`` can average."""
  if image.mode in _REDUCIBLE_MODES:
    return image
  if image.mode in _WIDE_INT_MODES:
    return image.convert('I')  # 16 bits kept; to_8bit rescales after
  return to_8bit(image, channels)


def open_image(path: pathlib.Path,
               what: str,
               max_pixels: int | None = None,
               channels: int = 3) -> Image.Image:
  """Opens and fully decodes an image, raising DataError on any problem.

  The result is upright (EXIF orientation applied). With ``max_pixels`` a
  larger image is reduced while it is decoded, by the smallest integer
  factor that brings it to at most ``max_pixels``: JPEG files decode at
  1/2, 1/4 or 1/8 scale (``Image.draft``), the rest are box-averaged
  (``Image.reduce``) right after decoding (palette, alpha and 1-bit images
  converted to ``channels`` first), so besides the decoded file at most
  one full-size copy is ever in memory.
  """
  try:
    size = path.stat().st_size
  except OSError as e:
    raise DataError(f'{path}: cannot read {what} ({one_line(e)})') from None
  if size == 0:
    raise DataError(f'{path}: {what} file is empty (0 bytes)')
  try:
    with Image.open(path) as image:
      factor = reduction_factor(image.size, max_pixels)
      if factor > 1:
        image.draft(None,
                    (-(-image.width // factor), -(-image.height // factor)))
      # Truncated files often open fine and only fail while decoding pixels,
      # so force the decode here where errors can be attributed to the file.
      image.load()
      ImageOps.exif_transpose(image, in_place=True)
      factor = reduction_factor(image.size, max_pixels)
      if factor > 1:
        return _reducible(image, channels).reduce(factor)
      return image.copy()
  except Exception as e:  # pylint: disable=broad-except
    # PIL raises a zoo of types for corrupt files (OSError, SyntaxError,
    # ValueError, struct.error, EOFError, ...).
    raise DataError(
        f'{path}: cannot decode {what}, the file is truncated or not an image '
        f'({one_line(e)})') from None


def read_image(path: str | pathlib.Path,
               channels: int,
               max_pixels: int | None = None) -> Image.Image:
  """One image file of any supported format as 8-bit 'L' (1) or 'RGB' (3).

  Upright (EXIF orientation applied), of the file's own size, or with
  ``max_pixels`` reduced at decode to at most that many pixels (the
  smallest integer factor; ``open_image``).

  Raises:
    DataError: the file cannot be read, decoded or converted (one line
      naming it).
  """
  path = pathlib.Path(path)
  image = open_image(path, 'image', max_pixels, channels)
  try:
    return to_8bit(image, channels)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f'{path}: cannot convert image of mode {image.mode} '
                    f'({one_line(e)})') from None


def model_input(image: Image.Image, image_size: int,
                channels: int) -> np.ndarray:
  """A ``read_image`` result as the model sees it: (S, S, C) uint8.

  Pillow's bilinear resize to S x S (antialiased when downscaling), the
  one the training images get; a plain (non-antialiased) bilinear filter
  gives other pixels and other scores.
  """
  size = (image_size, image_size)
  if image.size != size:
    image = image.resize(size, Image.BILINEAR)
  return np.asarray(image, np.uint8).reshape(image_size, image_size, channels)
