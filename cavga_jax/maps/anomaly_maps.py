"""Anomaly maps: pure functions of one evaluation batch, scored side by side.

Every map is a function ``(outputs, settings) -> (B, S, S)`` of the
evaluation outputs of one batch (the images, the reconstruction from ``mu``
and the Grad-CAM maps of ``attention.forward_with_attention`` with
``unit_maps=True``), so all of them come from one forward pass inside one
jitted evaluation step. Adding a map takes its function here and its one
entry in ``evaluation.registry``, which carries the function, what of the
forward pass it reads and whether it is bounded.

The maps (higher = more anomalous):

* ``attention``: the paper's ``1 - A`` (docs/protocol.md section 2), ``A``
  formed as the generator's ``attention_*`` settings say; bilinear to image
  size.
* ``attention_liu``: ``1 -`` Liu et al.'s mean of the per-unit maps.
* ``residual``: the squared reconstruction error, mean over channels,
  Gaussian-smoothed with ``residual_sigma`` pixels (reflect padding).
* ``residual_ssim``: ``1 -`` the local SSIM between image and reconstruction
  (Gaussian window of ``ssim_window`` px, sigma 1.5; images in [0, 1]),
  mean over channels; in [0, 2].
* ``residual_ssim_smooth``: ``residual_ssim`` smoothed like ``residual``
  (the GAN decoder's speckle makes the raw SSIM map noisy everywhere).
* ``residual_x_ssim``: ``residual * residual_ssim_smooth``, high where both
  the intensity and the structure of the reconstruction are wrong.
* ``attention_x_residual``: ``attention * residual``, the residual weighted
  by where the attention says the model did not look.
* CAVGA_w only, ``weak_<name>`` for every ``attention.WEAK_MAPS`` entry
  (``weak_anomalous`` = ``A^ca``, ...).

``prior`` (the test-set mean of the headline map, the same map for every
image) and ``prior_normal`` (its mean over the normal test images only, which
cannot know where the defects lie) need the whole test set, so
``evaluation.scoring`` adds them; the maps measured against the normal
training images (``calibration``, ``feature_gaussian``, ``feature_knn``:
``fitted_map``; ``combined_maps``) are applied by ``evaluation.fitting``.

Image scores: every map also gives a per-image score, the mean of its top
``TOP_FRACTION`` (1 %) pixels, a robust maximum: the image mean would drown
small defects in the normal area, the single maximum is one noisy pixel.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from cavga_jax import typed_config
from cavga_jax.models import attention

Array = jax.Array
TOP_FRACTION = 0.01
# The default blur of the residual and feature maps, as a share of the image
# side: 4 px at 256 px (anomalib's sigma for PaDiM / PatchCore maps), 2 px at
# 128 px. A width fixed in pixels would blur a 64 px image as much as a
# 256 px one blurred at 16 px (docs/results.md, "The blur width").
RELATIVE_SIGMA = 4.0 / 256.0


@dataclasses.dataclass(frozen=True)
class MapSettings:
  """Settings of the maps (``config.eval``), static under ``jax.jit``.

  Attributes:
    residual_sigma: Gaussian sigma in pixels at image size (0 = no blur;
      ``config.eval.residual_sigma=None`` means ``RELATIVE_SIGMA`` times the
      image size).
    ssim_window: SSIM window size in pixels (odd).
    ssim_scale: the SSIM maps compare the images resized by this factor
      (bilinear; 2: at half the window's scale, finer local contrast) and
      are resized back to the image size (``residual_ssim_map``).
  """
  residual_sigma: float = 4.0
  ssim_window: int = typed_config.default('eval.ssim_window')
  ssim_scale: float = typed_config.default('eval.ssim_scale')


MapFn = Callable[[dict[str, Array], MapSettings], Array]


def _image_size(outputs: dict[str, Array]) -> int:
  return outputs['images'].shape[1]


def _gaussian_taps(sigma: float, size: int) -> np.ndarray:
  """(size,) normalised 1-D Gaussian of ``sigma`` px centred in ``size`` taps."""
  offsets = np.arange(size, dtype=np.float64) - size // 2
  taps = np.exp(-offsets**2 / (2.0 * sigma**2))
  return (taps / taps.sum()).astype(np.float32)


def _filter_valid(z: Array, taps: np.ndarray, axis: int) -> Array:
  """'Valid' correlation of ``z`` with 1-D ``taps`` along ``axis``.

  A weighted sum of shifted slices, which XLA fuses into one loop. The
  depthwise and vmapped 1-D convolutions that dm-pix uses for the same
  filters are 3-60x slower on XLA:CPU (docs/benchmarks.md), and these
  filters ran in every evaluation step.
  """
  size = z.shape[axis] - len(taps) + 1
  return sum(
      float(w) * jax.lax.slice_in_dim(z, k, k + size, axis=axis)
      for k, w in enumerate(taps))


def _blur_valid(z: Array, taps: np.ndarray, row_axis: int = 1) -> Array:
  """Separable 'valid' blur of axes ``row_axis`` and ``row_axis + 1``."""
  return _filter_valid(_filter_valid(z, taps, row_axis + 1), taps, row_axis)


def gaussian_blur(maps: Array, sigma: float) -> Array:
  """Gaussian blur of (B, S, S) maps, kernel +-3 sigma, reflect padding."""
  if sigma <= 0:
    return maps
  radius = max(1, math.ceil(3 * sigma))
  padded = jnp.pad(
      maps, ((0, 0), (radius, radius), (radius, radius)), mode='reflect')
  return _blur_valid(padded, _gaussian_taps(sigma, 2 * radius + 1))


SSIM_SIGMA = 1.5  # Wang et al.'s Gaussian window (and dm-pix's default)


def upsample_and_blur(cells: Array, size: int, sigma: float) -> Array:
  """(N, g, g) per-cell values -> (N, size, size): bilinear, then blurred."""
  cells = jnp.asarray(cells)
  return gaussian_blur(
      jax.image.resize(cells, (cells.shape[0], size, size), 'bilinear'), sigma)


def ssim_map(images: Array, reconstructions: Array, window: int = 11) -> Array:
  """Local SSIM of (B, S, S, C) images in [-1, 1], mean over C: (B, S, S).

  Wang et al.'s SSIM with a Gaussian window (``window`` px, sigma 1.5) on
  images in [0, 1] (K1 0.01, K2 0.03), variances clipped as dm-pix's
  ``ssim`` does; equal to ``dm_pix.ssim(..., return_map=True)`` to float
  rounding (tests/test_anomaly_maps.py). The images are reflect-padded by
  half a window so the map has the image size. The five local moments are
  blurred as one stacked array: one fused filter instead of five.
  """
  half = window // 2
  pad = ((0, 0), (half, half), (half, half), (0, 0))
  a, b = ((jnp.pad(x, pad, mode='reflect') + 1.0) / 2.0
          for x in (images, reconstructions))
  moments = jnp.stack([a, b, a * a, b * b, a * b], axis=1)  # (B, 5, ...)
  taps = _gaussian_taps(SSIM_SIGMA, window)
  mu_a, mu_b, aa, bb, ab = jnp.moveaxis(
      _blur_valid(moments, taps, row_axis=2), 1, 0)
  epsilon = jnp.finfo(jnp.float32).eps**2
  var_a = jnp.maximum(epsilon, aa - mu_a * mu_a)
  var_b = jnp.maximum(epsilon, bb - mu_b * mu_b)
  cov = ab - mu_a * mu_b
  cov = jnp.sign(cov) * jnp.minimum(jnp.sqrt(var_a * var_b), jnp.abs(cov))
  c1, c2 = 0.01**2, 0.03**2
  local = ((2 * mu_a * mu_b + c1) * (2 * cov + c2) /
           ((mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2)))
  return jnp.mean(local, axis=-1)


def attention_map(outputs: dict[str, Array], settings: MapSettings) -> Array:
  del settings
  return attention.localization_map(outputs['attention'], _image_size(outputs))


def attention_liu_map(outputs: dict[str, Array],
                      settings: MapSettings) -> Array:
  del settings
  return attention.localization_map(outputs['attention_unit_mean'],
                                    _image_size(outputs))


def residual_map(outputs: dict[str, Array], settings: MapSettings) -> Array:
  error = jnp.mean(
      jnp.square(outputs['images'] - outputs['reconstruction']), axis=-1)
  return gaussian_blur(error, settings.residual_sigma)


def residual_ssim_map(outputs: dict[str, Array],
                      settings: MapSettings) -> Array:
  """1 - SSIM of the images and reconstructions, (B, S, S); with
  ``settings.ssim_scale`` != 1 of both resized by that factor, the map
  resized back to S x S (bilinear both ways)."""
  images, reconstructions = outputs['images'], outputs['reconstruction']
  if settings.ssim_scale == 1.0:
    return 1.0 - ssim_map(images, reconstructions, settings.ssim_window)
  batch, size, _, channels = images.shape
  side = int(round(size * settings.ssim_scale))
  resized = [
      jax.image.resize(x, (batch, side, side, channels), 'linear')
      for x in (images, reconstructions)
  ]
  residual = 1.0 - ssim_map(*resized, settings.ssim_window)
  return jax.image.resize(residual, (batch, size, size), 'linear')


def residual_ssim_smooth_map(outputs: dict[str, Array],
                             settings: MapSettings) -> Array:
  return gaussian_blur(
      residual_ssim_map(outputs, settings), settings.residual_sigma)


def residual_x_ssim_map(outputs: dict[str, Array],
                        settings: MapSettings) -> Array:
  return (residual_map(outputs, settings)
          * residual_ssim_smooth_map(outputs, settings))


def attention_x_residual_map(outputs: dict[str, Array],
                             settings: MapSettings) -> Array:
  return attention_map(outputs, settings) * residual_map(outputs, settings)


def weak_map(name: str) -> MapFn:
  """CAVGA_w's class map ``name`` of ``attention.WEAK_MAPS``."""

  def weak(outputs, settings):
    del settings
    return attention.weak_localization_map(outputs, _image_size(outputs), name)

  return weak


PRIOR = 'prior'
PRIOR_NORMAL = 'prior_normal'
PRIORS = (PRIOR, PRIOR_NORMAL)


def image_score(anomaly_maps: Array) -> Array:
  """(B, S, S) -> (B,): the mean of each map's top ``TOP_FRACTION`` pixels."""
  flat = anomaly_maps.reshape(anomaly_maps.shape[0], -1)
  k = max(1, math.ceil(TOP_FRACTION * flat.shape[1]))
  return jnp.mean(jax.lax.top_k(flat, k)[0], axis=1)


def max_score(anomaly_maps: Array) -> Array:
  """(B, S, S) -> (B,): each map's maximum (PatchCore's and SimpleNet's
  image score)."""
  return jnp.max(anomaly_maps, axis=(1, 2))


def compute_maps(outputs: dict[str, Array], functions: dict[str, MapFn],
                 settings: MapSettings) -> dict[str, Array]:
  """Every map of ``functions``: name -> (B, S, S) float32."""
  return {
      name: fn(outputs, settings).astype(jnp.float32)
      for name, fn in functions.items()
  }
