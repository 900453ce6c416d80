"""Synthetic anomalies: labelled defects with exact masks made from normal images.

CAVGA_w needs labelled anomalous images; a user has a handful or none. As in
DRAEM (Zavrtanik et al., ICCV 2021) and CutPaste (Li et al., CVPR 2021), a
region that does not belong is pasted onto a normal image, so the classifier
and its class maps learn what "does not belong" looks like from normal
images alone. One synthetic image is

    out = x + opacity * mask * (fill - x),    opacity ~ U(min, max) > 0,

so ``out`` equals ``x`` exactly outside ``mask`` and the mask is the exact
extent of the change. Each image draws one mask kind and one fill kind
uniformly from the configured ones:

masks (``typed_config.MASK_KINDS``), covering a log-uniform fraction of the
image in ``[min_area, max_area]``:
  'perlin'   the highest-valued pixels of 2-D Perlin noise on a random
             lattice (2..16 cells a side): irregular blobs, DRAEM's masks;
  'polygon'  a random star-shaped polygon (stains, dents, missing pieces);
  'scratch'  a thick three-segment polyline (cracks, scratches).
fills (``typed_config.FILL_KINDS``):
  'other_image'  another image of the batch, translated;
  'cutpaste'     the same image translated (CutPaste: texture from elsewhere
                 on the same part);
  'texture'      a procedural Perlin texture of a random colour;
  'shift'        the image itself with a colour / brightness offset.
Gray images (all channels equal) get gray fills, so a grayscale dataset
never sees colour it will not meet at test time.

Everything runs inside the jitted train step from a key the step derives from
``(seed, step)``: the synthesis is deterministic, needs no host work, and a
resumed run is bit-identical.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from cavga_jax import typed_config

Array = jax.Array

# Perlin lattice sizes (cells per side) a 'perlin' mask draws from.
PERLIN_RESOLUTIONS = (2, 4, 8, 16)
_TEXTURE_RESOLUTION = 16
_POLYGON_VERTICES = 7
_SCRATCH_SEGMENTS = 3


def _pixel_centres(size: int) -> Array:
  return jnp.arange(size, dtype=jnp.float32) + 0.5


def perlin_noise(key: Array, size: int, resolution: int) -> Array:
  """2-D Perlin noise (size, size) on a resolution x resolution lattice.

  Random unit gradients at the lattice corners, quintic fade (Perlin 2002).
  Values lie in about [-1, 1].
  """
  angles = jax.random.uniform(
      key, (resolution + 1, resolution + 1), maxval=2 * jnp.pi)
  gx, gy = jnp.cos(angles), jnp.sin(angles)
  t = _pixel_centres(size) * resolution / size
  cell = jnp.floor(t).astype(jnp.int32)
  frac = t - cell
  fade = frac**3 * (frac * (frac * 6 - 15) + 10)

  def corner(dy, dx):
    iy, ix = cell[:, None] + dy, cell[None, :] + dx
    return (gx[iy, ix] * (frac[None, :] - dx) + gy[iy, ix] *
            (frac[:, None] - dy))

  u, v = fade[None, :], fade[:, None]
  top = corner(0, 0) + u * (corner(0, 1) - corner(0, 0))
  bottom = corner(1, 0) + u * (corner(1, 1) - corner(1, 0))
  return math.sqrt(2.0) * (top + v * (bottom - top))


def perlin_mask(key: Array, size: int, area: Array) -> Array:
  """The top ``area`` share of Perlin noise at a random lattice: (S, S) bool."""
  select_key, *noise_keys = jax.random.split(key, len(PERLIN_RESOLUTIONS) + 1)
  noises = jnp.stack([
      perlin_noise(k, size, r) for k, r in zip(noise_keys, PERLIN_RESOLUTIONS)
  ])
  noise = noises[jax.random.randint(select_key, (), 0, len(noises))]
  return noise > jnp.quantile(noise, 1.0 - area)


def _cross(ax, ay, bx, by):
  return ax * by - ay * bx


def polygon_mask(key: Array, size: int, area: Array) -> Array:
  """A random star-shaped polygon of about ``area * size**2`` px: (S, S) bool.

  Vertices at jittered, increasing angles around a centre (every wedge is
  narrower than pi), radii 0.6-1.4 times the mean; a pixel is inside when it
  lies in one of the triangles (centre, v_k, v_k+1).
  """
  k_centre, k_jitter, k_phase, k_radii = jax.random.split(key, 4)
  n = _POLYGON_VERTICES
  radius = jnp.sqrt(area * size * size / jnp.pi)
  margin = jnp.minimum(radius, size / 2)
  cx, cy = jax.random.uniform(
      k_centre, (2,), minval=margin, maxval=size - margin)
  jitter = jax.random.uniform(k_jitter, (n,), maxval=0.8)
  angles = (2 * jnp.pi * (jnp.arange(n) + jitter) / n
            + jax.random.uniform(k_phase, (), maxval=2 * jnp.pi))
  radii = radius * jax.random.uniform(k_radii, (n,), minval=0.6, maxval=1.4)
  ax, ay = radii * jnp.cos(angles), radii * jnp.sin(angles)  # v_k - c
  bx, by = jnp.roll(ax, -1), jnp.roll(ay, -1)  # v_k+1 - c
  centres = _pixel_centres(size)
  px = (centres[None, :] - cx)[..., None]  # (1, S, 1)
  py = (centres[:, None] - cy)[..., None]  # (S, 1, 1)
  inside = ((_cross(ax, ay, px, py) >= 0) & (_cross(px, py, bx, by) >= 0)
            & (_cross(bx - ax, by - ay, px - ax, py - ay) >= 0))
  return jnp.any(inside, axis=-1)


def scratch_mask(key: Array, size: int, area: Array) -> Array:
  """A thick polyline of three segments covering about ``area``: (S, S) bool.

  Width 1-4 px per 128 px of image; the length follows from the area (at
  most 1.5 image sides); each segment turns by up to 1 rad.
  """
  k_width, k_start, k_heading, k_turns = jax.random.split(key, 4)
  width = jax.random.uniform(
      k_width, (), minval=1.0, maxval=4.0) * max(size / 128, 0.5)
  length = jnp.minimum(area * size * size / width, 1.5 * size)
  step = length / _SCRATCH_SEGMENTS
  start = jax.random.uniform(
      k_start, (2,), minval=0.1 * size, maxval=0.9 * size)
  headings = (
      jax.random.uniform(k_heading, (), maxval=2 * jnp.pi) + jnp.cumsum(
          jax.random.uniform(
              k_turns, (_SCRATCH_SEGMENTS,), minval=-1.0, maxval=1.0)))
  steps = step * jnp.stack([jnp.cos(headings), jnp.sin(headings)], axis=-1)
  points = jnp.clip(
      start + jnp.concatenate([jnp.zeros(
          (1, 2)), jnp.cumsum(steps, axis=0)]), 0.0, size)
  p0, p1 = points[:-1], points[1:]  # (n, 2) segment ends, (x, y)
  centres = _pixel_centres(size)
  x = centres[None, :, None]
  y = centres[:, None, None]
  d = p1 - p0
  length2 = jnp.maximum(jnp.sum(d * d, axis=-1), 1e-12)
  t = jnp.clip(((x - p0[:, 0]) * d[:, 0] + (y - p0[:, 1]) * d[:, 1]) / length2,
               0.0, 1.0)
  dx = x - (p0[:, 0] + t * d[:, 0])
  dy = y - (p0[:, 1] + t * d[:, 1])
  return jnp.any(dx * dx + dy * dy <= jnp.maximum(width / 2, 0.5)**2, axis=-1)


_MASKS = {
    'perlin': perlin_mask, 'polygon': polygon_mask, 'scratch': scratch_mask
}


def _translate(key: Array, image: Array) -> Array:
  """The image shifted cyclically by 1/8..7/8 of its size on each axis."""
  size = image.shape[0]
  shift = jax.random.randint(key, (2,), size // 8, size - size // 8 + 1)
  return jnp.roll(image, (shift[0], shift[1]), axis=(0, 1))


def _texture(key: Array, image: Array) -> Array:
  k_colour, k_noise, k_amplitude = jax.random.split(key, 3)
  channels = image.shape[-1]
  colour = jax.random.uniform(k_colour, (channels,), minval=-1.0, maxval=1.0)
  amplitude = jax.random.uniform(
      k_amplitude, (channels,), minval=0.2, maxval=0.6)
  noise = perlin_noise(k_noise, image.shape[0], _TEXTURE_RESOLUTION)
  return jnp.clip(colour + amplitude * noise[..., None], -1.0, 1.0)


def _shift(key: Array, image: Array) -> Array:
  k_sign, k_size = jax.random.split(key)
  channels = image.shape[-1]
  sign = jnp.where(jax.random.bernoulli(k_sign, 0.5, (channels,)), 1.0, -1.0)
  offset = sign * jax.random.uniform(
      k_size, (channels,), minval=0.2, maxval=0.6)
  return jnp.clip(image + offset, -1.0, 1.0)


def _fill(kind: str, key: Array, image: Array, other: Array) -> Array:
  if kind == 'other_image':
    return _translate(key, other)
  if kind == 'cutpaste':
    return _translate(key, image)
  if kind == 'texture':
    return _texture(key, image)
  return _shift(key, image)


def _synthesize_one(
    key: Array, image: Array, other: Array,
    settings: typed_config.SynthesisSettings) -> tuple[Array, Array]:
  """One synthetic image (S, S, C) and its mask (S, S) float32 in {0, 1}."""
  (k_area, k_mask_kind, k_fill_kind, k_opacity, k_mask,
   k_fill) = jax.random.split(key, 6)
  size = image.shape[0]
  log_area = jax.random.uniform(
      k_area, (),
      minval=math.log(settings.min_area),
      maxval=math.log(settings.max_area))
  area = jnp.exp(log_area)
  masks = jnp.stack(
      [_MASKS[kind](k_mask, size, area) for kind in settings.masks])
  mask = masks[jax.random.randint(k_mask_kind, (), 0, len(masks))]
  fills = jnp.stack(
      [_fill(kind, k_fill, image, other) for kind in settings.fills])
  fill = fills[jax.random.randint(k_fill_kind, (), 0, len(fills))]
  gray = jnp.all(jnp.abs(image - jnp.mean(image, -1, keepdims=True)) < 1e-6)
  fill = jnp.where(
      gray, jnp.broadcast_to(jnp.mean(fill, -1, keepdims=True), fill.shape),
      fill)
  opacity = jax.random.uniform(
      k_opacity, (), minval=settings.min_opacity, maxval=settings.max_opacity)
  mask = mask.astype(image.dtype)
  return image + opacity * mask[..., None] * (fill - image), mask


def synthesize(
    key: Array, images: Array,
    settings: typed_config.SynthesisSettings) -> tuple[Array, Array, Array]:
  """Makes the first ``settings.num_synthetic(B)`` images of a batch anomalous.

  Args:
    key: PRNG key (the train step derives it from ``(seed, step)``).
    images: (B, S, S, C) float in [-1, 1].
    settings: what to synthesise.

  Returns:
    (synthetic_images, masks, is_synthetic): (B, S, S, C) with the first
    images altered and the rest unchanged; (B, S, S) float32 masks, 1 where
    a pixel was altered, all 0 for unaltered images; (B,) bool.
  """
  batch = images.shape[0]
  num = settings.num_synthetic(batch)
  # 'other_image' pastes from the next image of the batch (a normal one when
  # the batch has more than one image).
  others = jnp.roll(images, -1, axis=0)[:num]
  altered, masks = jax.vmap(lambda k, x, o: _synthesize_one(k, x, o, settings))(
      jax.random.split(key, num), images[:num], others)
  out = jnp.concatenate([altered, images[num:]])
  masks = jnp.concatenate(
      [masks, jnp.zeros((batch - num,) + masks.shape[1:], masks.dtype)])
  return out, masks.astype(jnp.float32), jnp.arange(batch) < num
