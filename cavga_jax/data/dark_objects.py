"""The images of the 'dark_objects' generated category: an object on black.

A bright, finely textured object (a rounded rectangle, a superellipse of one
shape per seed) lies at a random position and rotation in every image and
covers about 15-30 % of it; the rest is a uniform dark background (grey
level about 5-15 of 255). Every pixel, object and background, carries
independent Gaussian sensor noise of a few grey levels, drawn the same way
for training and test images. The object is unaligned (no pixel is object in
every image), and the background is flat but for the noise: the setting
where per-cell statistics of flat regions see only the noise (issue 36).

Anomalous images are normal images with one defect on the object:

* ``scratch``: a dark or contrasting polyline, 1-2 px wide at 64 px;
* ``spot``: 1-3 discs of a saturated colour;
* ``missing``: a chunk bitten out of the object's edge (background there).

Masks are exact, as in `textures`: the image equals `normal_image(seed,
defect, index, size)` (same sensor noise) where the mask is False and
differs from it in at least one channel where it is True; defects cover
0.5-6 % of the image and lie on the object.

Everything is numpy and deterministic: image ``i`` of a stream ('train',
'good' or a defect name) is drawn from its own generator, independent of how
many images are generated.
"""

from __future__ import annotations

import numpy as np

from cavga_jax.data import textures
from cavga_jax.errors import DataError

DEFECT_TYPES = ('scratch', 'spot', 'missing')
# Bump when the rendering changes, so that existing folders are regenerated
# (it is part of the generated dataset's marker).
VERSION = 1

_STREAMS = ('train', 'good') + DEFECT_TYPES
# Keeps these generators apart from `textures`' for the same seed.
_SCENE_STREAM = 2000
_MIN_AREA, _MAX_AREA = 0.005, 0.06
_MAX_DEFECT_TRIES = 20
# Pixels at least this much object count as on the object for defects.
_SOLID = 0.99


def _rng(seed: int, stream: str, index: int) -> np.random.Generator:
  if stream not in _STREAMS:
    raise DataError(f'unknown dark_objects stream {stream!r} (known: '
                    f'{", ".join(_STREAMS)})')
  return np.random.default_rng(
      [seed, _SCENE_STREAM, _STREAMS.index(stream), index])


def _family(seed: int) -> dict[str, np.ndarray | float]:
  """What every image of a seed shares: the object, background and noise."""
  rng = np.random.default_rng([seed, _SCENE_STREAM, 1000])
  return {
      # A light metallic tint, far from the black background.
      'colour': rng.uniform(0.6, 0.8, size=3),
      # Share of the image the object covers, and its axis ratio.
      'area': float(rng.uniform(0.17, 0.26)),
      'aspect': float(rng.uniform(0.6, 0.8)),
      # Superellipse exponent: 2 an ellipse, 4 a rounded rectangle.
      'power': float(rng.uniform(2.5, 4.0)),
      # Two fine gratings in the object's frame (periods in object widths).
      'cycles': rng.uniform(5.0, 8.0, size=2),
      'background': float(rng.uniform(5, 15) / 255),
      'noise': float(rng.uniform(2, 4) / 255),
  }


def _render(rng: np.random.Generator, family: dict, size: int):
  """One clean scene and its sensor noise.

  Returns:
    scene: (size, size, 3) float64 without noise, in about [0, 1].
    noise: (size, size, 3) float64, the sensor noise to add.
    alpha: (size, size) float64 object coverage in [0, 1].
    background: (3,) float64 background value.
  """
  area = family['area'] * size * size * rng.uniform(0.9, 1.1)
  a = np.sqrt(area / (np.pi * family['aspect']))
  b = a * family['aspect']
  theta = rng.uniform(0, 2 * np.pi)
  p = family['power']
  # The object's bounding disc (its farthest boundary point, a rounded
  # corner) plus a pixel stays inside the image, at any rotation.
  t = np.linspace(0, np.pi / 2, 91)
  radius = np.hypot(a * np.cos(t)**(2 / p), b * np.sin(t)**(2 / p)).max()
  margin = min(radius + 1, size / 2)
  cx, cy = rng.uniform(margin, size - margin, size=2)
  y, x = textures.pixel_grid(size)
  u = (x - cx) * np.cos(theta) + (y - cy) * np.sin(theta)
  v = -(x - cx) * np.sin(theta) + (y - cy) * np.cos(theta)
  level = (np.abs(u / a)**p + np.abs(v / b)**p)**(1 / p)
  # About one pixel of antialiased edge: (level - 1) * b is close to the
  # distance outside the edge along the short axis.
  alpha = np.clip(0.5 - (level - 1) * b, 0.0, 1.0)
  colour = family['colour'] * rng.uniform(0.95, 1.05)
  texture = np.zeros((size, size))
  for k, axis in enumerate((u, v)):
    texture += 0.06 * np.sin(2 * np.pi * family['cycles'][k] * axis / (2 * a)
                             + rng.uniform(0, 2 * np.pi))
  obj = colour * (1 + texture[..., None])
  background = np.full(3, family['background'])
  scene = alpha[..., None] * obj + (1 - alpha[..., None]) * background
  noise = rng.normal(0, family['noise'], size=(size, size, 3))
  return scene, noise, alpha, background


def normal_image(seed: int, stream: str, index: int,
                 image_size: int) -> np.ndarray:
  """Renders one defect-free image.

  Args:
    seed: dataset seed.
    stream: 'train', 'good' or a defect type; anomalous image `index` of a
      defect type is painted on `normal_image(seed, defect, index, ...)`.
    index: image index within the stream.
    image_size: height and width in pixels.

  Returns:
    (image_size, image_size, 3) uint8 RGB image.
  """
  scene, noise, _, _ = _render(
      _rng(seed, stream, index), _family(seed), image_size)
  return textures.to_uint8(scene + noise)


def _solid(alpha: np.ndarray) -> np.ndarray:
  """(H, W) bool: the object's pixels (any covered pixel at tiny sizes)."""
  solid = alpha >= _SOLID
  return solid if solid.any() else alpha > 0


def _object_point(rng: np.random.Generator, solid: np.ndarray) -> np.ndarray:
  """(x, y) of a random pixel centre of ``solid`` (non-empty)."""
  ys, xs = np.nonzero(solid)
  i = rng.integers(len(xs))
  return np.array([xs[i] + 0.5, ys[i] + 0.5])


def _scratch(rng, scene, alpha, background, family):
  """A thin polyline of one colour, clipped to the object.

  Returns:
    (H, W) bool mask and the (H, W, 3) float scene with the defect.
  """
  del background
  size = scene.shape[0]
  solid = _solid(alpha)
  width = rng.integers(1, 3) * max(size / 64, 1.0)
  num_segments = int(rng.integers(2, 5))
  seg_length = rng.uniform(0.08, 0.16) * size
  point = _object_point(rng, solid)
  heading = rng.uniform(0, 2 * np.pi)
  mask = np.zeros((size, size), bool)
  for _ in range(num_segments):
    heading += rng.uniform(-1.0, 1.0)
    end = point + seg_length * np.array([np.cos(heading), np.sin(heading)])
    mask |= textures.segment_mask(size, point, end, width)
    point = end
  mask &= solid
  # Mostly a dark groove, sometimes a contrasting deposit.
  if rng.uniform() < 0.6:
    colour = family['colour'] * rng.uniform(0.1, 0.4)
  else:
    colour = rng.uniform(0, 1, size=3)
    if np.linalg.norm(colour - family['colour']) < 0.45:
      colour = 1.0 - family['colour']
  out = scene.copy()
  out[mask] = colour
  return mask, out


def _spot(rng, scene, alpha, background, family):
  """A few discs of one saturated colour on the object."""
  del background, family
  size = scene.shape[0]
  solid = _solid(alpha)
  num_spots = int(rng.integers(1, 4))
  total = rng.uniform(0.006, 0.03) * size * size
  radii = np.maximum(
      np.sqrt(total * rng.dirichlet(np.ones(num_spots)) / np.pi), 0.75)
  y, x = textures.pixel_grid(size)
  mask = np.zeros((size, size), bool)
  for r in radii:
    cx, cy = _object_point(rng, solid)
    mask |= (x - cx)**2 + (y - cy)**2 <= r * r
  mask &= solid
  out = scene.copy()
  out[mask] = textures.saturated_colour(rng)
  return mask, out


def _missing(rng, scene, alpha, background, family):
  """A disc bitten out of the object's edge: background shows there."""
  del family
  size = scene.shape[0]
  edge = (alpha > 0) & (alpha < 1)
  cx, cy = _object_point(rng, edge if edge.any() else _solid(alpha))
  r = rng.uniform(0.06, 0.13) * size
  y, x = textures.pixel_grid(size)
  bite = (x - cx)**2 + (y - cy)**2 <= r * r
  # The faint rim of the antialiased edge (under a quarter object) stays:
  # removing it would change some pixels by less than a grey level.
  mask = bite & (alpha >= 0.25)
  out = scene.copy()
  out[mask] = background
  return mask, out


_DEFECT_RENDERERS = {'scratch': _scratch, 'spot': _spot, 'missing': _missing}


def anomalous_image(seed: int, defect: str, index: int,
                    image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Renders one anomalous image and its exact mask.

  The image equals `normal_image(seed, defect, index, image_size)` exactly
  where the mask is False and differs from it (in at least one channel)
  everywhere the mask is True; the mask lies on the object.

  Args:
    seed: dataset seed.
    defect: one of DEFECT_TYPES.
    index: image index within the defect type.
    image_size: height and width in pixels.

  Returns:
    image: (image_size, image_size, 3) uint8 RGB.
    mask: (image_size, image_size) bool, covering 0.5-6 % of the pixels
      (fewer at tiny image sizes, where one pixel is a large share).
  """
  if defect not in _DEFECT_RENDERERS:
    raise DataError(f'unknown defect type {defect!r} (known: '
                    f'{", ".join(DEFECT_TYPES)})')
  rng = _rng(seed, defect, index)
  family = _family(seed)
  scene, noise, alpha, background = _render(rng, family, image_size)
  clean = textures.to_uint8(scene + noise)
  render = _DEFECT_RENDERERS[defect]
  # Redraw until the area is in range (the rng stream makes this
  # deterministic); at tiny sizes, where clipping to the object can leave
  # nothing, keep the largest defect drawn, so that no anomalous image has
  # an empty mask.
  best = None
  for _ in range(_MAX_DEFECT_TRIES):
    mask, painted = render(rng, scene, alpha, background, family)
    area = mask.mean()
    if _MIN_AREA <= area <= _MAX_AREA:
      best = mask, painted
      break
    if area <= _MAX_AREA and (best is None or area > best[0].mean()):
      best = mask, painted
  mask, painted = best or (mask, painted)
  # The same sensor noise: outside the mask the image is the normal one.
  image = np.where(mask[..., None], textures.to_uint8(painted + noise), clean)
  # Every defect changes its pixels by tens of grey levels; should one land
  # on the clean value all the same, nudge it so the mask is exactly the set
  # of changed pixels.
  same = mask & np.all(image == clean, axis=-1)
  image[same, 0] ^= 0x80
  return image, mask
