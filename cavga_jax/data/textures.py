"""The images of the generated dataset: woven textures and painted defects.

Normal images are one family of woven textures: a base colour plus a few
sinusoidal gratings (two near-orthogonal "threads" and a diagonal twill) with
small per-image jitter of colour, frequency, phase and orientation, plus mild
Gaussian noise. Anomalous images are normal images of the same family with one
of three defects painted on top:

* ``scratch``: a polyline of 2-4 segments, 1-3 px wide (at up to 64 px; widths
  scale with larger image sizes), of a random colour far from the base colour;
* ``blob``: a filled, rotated ellipse holding a different texture and colour;
* ``spot``: 1-4 small discs of a saturated colour.

Masks are exact: a pixel is in the mask if and only if the defect changed it
(`anomalous_image` guarantees every masked pixel differs from the clean
image). Defects cover 1-8 % of the image area.

Everything is numpy and deterministic: image ``i`` of a stream ('train',
'good' or a defect name) is drawn from ``default_rng([seed, stream, i])`` so it
does not depend on how many images are generated.
"""

from __future__ import annotations

import numpy as np

from cavga_jax.errors import DataError

DEFECT_TYPES = ('scratch', 'blob', 'spot')

_STREAMS = ('train', 'good') + DEFECT_TYPES
_FAMILY_STREAM = 1000
_MIN_AREA, _MAX_AREA = 0.01, 0.08
_MAX_DEFECT_TRIES = 20


def _rng(seed: int, stream: str, index: int) -> np.random.Generator:
  if stream not in _STREAMS:
    raise DataError(f'unknown generated stream {stream!r} (known: '
                    f'{", ".join(_STREAMS)})')
  return np.random.default_rng([seed, _STREAMS.index(stream), index])


def _family(seed: int) -> dict[str, np.ndarray]:
  """The texture family shared by all images of a seed."""
  rng = np.random.default_rng([seed, _FAMILY_STREAM])
  return {
      # A muted fabric-like colour, far from the saturated defect colours.
      'colour':
          rng.uniform(0.3, 0.65, size=3),
      # Cycles per image width for warp, weft and twill, so the pattern
      # looks the same at every resolution.
      'freq':
          np.array([rng.uniform(6, 9),
                    rng.uniform(6, 9),
                    rng.uniform(3, 5)]),
      'angle':
          rng.uniform(0, np.pi) + np.array([0, np.pi / 2, np.pi / 4]),
      'amp':
          np.array([0.09, 0.09, 0.05]),
      # How strongly each grating tints each channel.
      'tint':
          rng.uniform(0.6, 1.0, size=(3, 3)),
  }


def _gratings(rng: np.random.Generator, size: int, freq: np.ndarray,
              angle: np.ndarray, amp: np.ndarray,
              tint: np.ndarray) -> np.ndarray:
  """Sum of sinusoidal gratings, (size, size, 3) float64 around zero."""
  coords = (np.arange(size) + 0.5) / size
  y, x = coords[:, None], coords[None, :]
  out = np.zeros((size, size, 3))
  for k in range(len(freq)):
    phase = rng.uniform(0, 2 * np.pi)
    wave = np.sin(2 * np.pi * freq[k]
                  * (x * np.cos(angle[k]) + y * np.sin(angle[k])) + phase)
    out += amp[k] * wave[..., None] * tint[k]
  return out


def to_uint8(image: np.ndarray) -> np.ndarray:
  """Float image in [0, 1] (clipped) -> uint8, same shape."""
  return np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)


def normal_image(seed: int, stream: str, index: int,
                 image_size: int) -> np.ndarray:
  """Renders one defect-free texture image.

  Args:
    seed: dataset seed.
    stream: 'train', 'good' or a defect type; anomalous image `index` of a
      defect type is painted on `normal_image(seed, defect, index, ...)`.
    index: image index within the stream.
    image_size: height and width in pixels.

  Returns:
    (image_size, image_size, 3) uint8 RGB image.
  """
  return _render_normal(_rng(seed, stream, index), _family(seed), image_size)


def _render_normal(rng: np.random.Generator, family: dict[str, np.ndarray],
                   size: int) -> np.ndarray:
  colour = family['colour'] + rng.normal(0, 0.02, size=3)
  freq = family['freq'] * rng.uniform(0.95, 1.05, size=3)
  angle = family['angle'] + rng.normal(0, np.deg2rad(3), size=3)
  texture = colour + _gratings(rng, size, freq, angle, family['amp'],
                               family['tint'])
  texture += rng.normal(0, 0.02, size=(size, size, 3))
  return to_uint8(texture)


def pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
  """Pixel-centre coordinates: y (size, 1) and x (1, size), in pixels."""
  centres = np.arange(size) + 0.5
  return centres[:, None], centres[None, :]


def segment_mask(size: int, p0: np.ndarray, p1: np.ndarray,
                 width: float) -> np.ndarray:
  """Pixels whose centre is within width/2 of the segment p0-p1 (x, y)."""
  y, x = pixel_grid(size)
  d = p1 - p0
  length2 = max(float(d @ d), 1e-12)
  t = np.clip(((x - p0[0]) * d[0] + (y - p0[1]) * d[1]) / length2, 0, 1)
  dx = x - (p0[0] + t * d[0])
  dy = y - (p0[1] + t * d[1])
  # The 0.5 floor keeps 1 px lines connected at every angle.
  return dx * dx + dy * dy <= max(width / 2, 0.5)**2


def _centre(rng: np.random.Generator, radius: float,
            size: int) -> tuple[float, float]:
  """A random (x, y) centre keeping a disc of `radius` inside the image."""
  if radius >= size / 2:
    return size / 2, size / 2
  x, y = rng.uniform(radius, size - radius, size=2)
  return float(x), float(y)


def saturated_colour(rng: np.random.Generator) -> np.ndarray:
  """A random fully saturated RGB colour, (3,) float64 in [0, 1]."""
  hue = rng.uniform(0, 6)
  sector = int(hue) % 6
  f = hue - int(hue)
  rgb = [(1, f, 0), (1 - f, 1, 0), (0, 1, f), (0, 1 - f, 1), (f, 0, 1),
         (1, 0, 1 - f)][sector]
  return np.array(rgb, dtype=np.float64)


def _contrasting_colour(rng: np.random.Generator,
                        base: np.ndarray) -> np.ndarray:
  for _ in range(100):
    colour = rng.uniform(0, 1, size=3)
    if np.linalg.norm(colour - base) > 0.45:
      return colour
  return 1.0 - base


def _scratch(rng: np.random.Generator, clean: np.ndarray,
             family: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """A thin polyline of one colour.

  Returns:
    (H, W) bool mask and (H, W, 3) float paint in about [0, 1].
  """
  size = clean.shape[0]
  # 1-3 px at 64 px and below; proportionally wider above, so that the
  # dataset looks the same at every resolution.
  width = rng.integers(1, 4) * max(size / 64, 1.0)
  target = rng.uniform(0.015, 0.06) * size * size
  num_segments = int(rng.integers(2, 5))
  seg_length = target / max(width, 1.0) / num_segments
  margin = 0.08 * size
  point = rng.uniform(margin, size - margin, size=2)
  heading = rng.uniform(0, 2 * np.pi)
  mask = np.zeros((size, size), bool)
  for _ in range(num_segments):
    heading += rng.uniform(-1.0, 1.0)
    step = seg_length * np.array([np.cos(heading), np.sin(heading)])
    end = np.clip(point + step, margin, size - margin)
    mask |= segment_mask(size, point, end, width)
    point = end
  colour = _contrasting_colour(rng, family['colour'])
  shade = 1 + rng.normal(0, 0.05, size=(size, size, 1))
  paint = colour * shade
  return mask, paint


def _blob(rng: np.random.Generator, clean: np.ndarray,
          family: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """A filled ellipse of another texture.

  Returns:
    (H, W) bool mask and (H, W, 3) float paint in about [0, 1].
  """
  size = clean.shape[0]
  area = rng.uniform(0.02, 0.07) * size * size
  aspect = rng.uniform(0.45, 1.0)
  a = np.sqrt(area / (np.pi * aspect))
  b = a * aspect
  theta = rng.uniform(0, np.pi)
  cx, cy = _centre(rng, a, size)
  y, x = pixel_grid(size)
  u = (x - cx) * np.cos(theta) + (y - cy) * np.sin(theta)
  v = -(x - cx) * np.sin(theta) + (y - cy) * np.cos(theta)
  mask = (u / a)**2 + (v / b)**2 <= 1.0
  # A stain: a shifted colour with a finer, differently oriented grating.
  colour = np.clip(
      family['colour']
      + rng.choice([-1, 1], size=3) * rng.uniform(0.15, 0.3, size=3), 0, 1)
  paint = colour + _gratings(rng, size, rng.uniform(14, 22, size=2),
                             rng.uniform(0, np.pi, size=2),
                             np.array([0.08, 0.06]), np.ones((2, 3)))
  return mask, paint


def _spot(rng: np.random.Generator, clean: np.ndarray,
          family: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """A few discs of one saturated colour.

  Returns:
    (H, W) bool mask and (H, W, 3) float paint in [0, 1].
  """
  del family
  size = clean.shape[0]
  num_spots = int(rng.integers(1, 5))
  total = rng.uniform(0.015, 0.05) * size * size
  radii = np.sqrt(total * rng.dirichlet(np.ones(num_spots)) / np.pi)
  radii = np.maximum(radii, 0.75)
  y, x = pixel_grid(size)
  mask = np.zeros((size, size), bool)
  for r in radii:
    cx, cy = _centre(rng, r, size)
    mask |= (x - cx)**2 + (y - cy)**2 <= r * r
  paint = np.broadcast_to(saturated_colour(rng), (size, size, 3))
  return mask, paint


_DEFECT_RENDERERS = {'scratch': _scratch, 'blob': _blob, 'spot': _spot}


def anomalous_image(seed: int, defect: str, index: int,
                    image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Renders one anomalous image and its exact mask.

  The image equals `normal_image(seed, defect, index, image_size)` exactly
  where the mask is False and differs from it (in at least one channel)
  everywhere the mask is True.

  Args:
    seed: dataset seed.
    defect: one of DEFECT_TYPES.
    index: image index within the defect type.
    image_size: height and width in pixels.

  Returns:
    image: (image_size, image_size, 3) uint8 RGB.
    mask: (image_size, image_size) bool, covering 1-8 % of the pixels.
  """
  if defect not in _DEFECT_RENDERERS:
    raise DataError(f'unknown defect type {defect!r} (known: '
                    f'{", ".join(DEFECT_TYPES)})')
  rng = _rng(seed, defect, index)
  family = _family(seed)
  clean = _render_normal(rng, family, image_size)
  render = _DEFECT_RENDERERS[defect]
  # Redraw until the area is in range; the rng stream makes this
  # deterministic. Sizes are drawn inside the range, so this rarely loops
  # except at tiny image sizes where a single pixel is a large fraction.
  for _ in range(_MAX_DEFECT_TRIES):
    mask, paint = render(rng, clean, family)
    fraction = mask.mean()
    if _MIN_AREA <= fraction <= _MAX_AREA:
      break
  image = clean.copy()
  image[mask] = to_uint8(np.broadcast_to(paint, clean.shape)[mask])
  # Painting can land on the clean value by chance; nudge those pixels so the
  # mask is exactly the set of changed pixels.
  same = mask & np.all(image == clean, axis=-1)
  image[same, 0] ^= 0x80
  return image, mask
