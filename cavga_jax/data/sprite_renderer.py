"""Draws dSprites-like images with numpy: no download, no storage.

`render_sprites` draws 64x64 binary images of one white shape (square,
ellipse or heart) on black from the physical values of dSprites's five
factors (Matthey et al. 2017; the factor table is in `sprites`), and
`factor_values` gives those values for each index of the factor grid.
`sprites.RenderedSprites` is the dataset of the whole grid. The shapes imitate
dSprites, they are not its pixels.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

IMAGE_SIZE = 64
DSPRITES_FACTOR_SIZES = (3, 6, 40, 32, 32)
SHAPE_NAMES = ('square', 'ellipse', 'heart')

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


def factor_values(
    sizes: Sequence[int] = DSPRITES_FACTOR_SIZES) -> tuple[np.ndarray, ...]:
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
    return (u / a)**2 + (v / b)**2 <= 1.0
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
  params = [
      np.asarray(p, np.float32) for p in (scale, orientation, pos_x, pos_y)
  ]
  for start in range(0, n, _RENDER_CHUNK):
    stop = min(start + _RENDER_CHUNK, n)
    s, theta, x, y = (p[start:stop] for p in params)
    cx = _MARGIN + x * span
    cy = _MARGIN + y * span
    ox = np.clip(
        np.floor(cx).astype(np.int64) - _PATCH // 2, 0, IMAGE_SIZE - _PATCH)
    oy = np.clip(
        np.floor(cy).astype(np.int64) - _PATCH // 2, 0, IMAGE_SIZE - _PATCH)
    # Pixel centre minus shape centre, in px.
    dx = ((ox[:, None] + offsets + 0.5) - cx[:, None])[:, None, :]  # (m,1,P)
    dy = ((oy[:, None] + offsets + 0.5) - cy[:, None])[:, :, None]  # (m,P,1)
    cos = np.cos(theta)[:, None, None]
    sin = np.sin(theta)[:, None, None]
    size = (_UNIT * s)[:, None, None]
    # Rotating the shape by +theta counter-clockwise on screen (y down) is
    # rotating the pixel offsets by -theta into the shape frame.
    u = ((cos * dx - sin * dy) / size).astype(np.float32)  # (m, P, P)
    v = ((sin * dx + cos * dy) / size).astype(np.float32)
    patch = np.empty(u.shape, np.uint8)
    for k in np.unique(shape[start:stop]):
      rows = np.flatnonzero(shape[start:stop] == k)
      patch[rows] = _inside(int(k), u[rows], v[rows]) * np.uint8(255)
    m = np.arange(start, stop)[:, None, None]
    out[m, (oy[:, None] + offsets)[:, :, None],
        (ox[:, None] + offsets)[:, None, :], 0] = patch
  return out
