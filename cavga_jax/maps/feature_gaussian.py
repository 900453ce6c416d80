"""The feature-Gaussian map: each position's encoder features against normal ones.

PaDiM (Defard et al., 2020) applied to CAVGA's own encoder. The evaluation
takes the outputs of the generator's encoder stages ``stages`` (ResNet
``layer<s>``, DCGAN ``conv<s-1>``) for every image, resizes them to one grid
of ``image_size // GRID_DIVISOR`` cells, concatenates them and keeps ``dims``
channels chosen at random once (``select_channels``: a fixed subset, as
PaDiM keeps 100 of ResNet-18's 448). Over the normal training images it fits
one Gaussian per grid cell (mean ``m`` and covariance ``C + REGULARIZATION *
I``); a test image's map is the Mahalanobis distance of its features at each
cell, ``sqrt((f - m)^T C^-1 (f - m))``, bilinear to image size and
Gaussian-smoothed like the residual (``eval.residual_sigma``). Higher means
more anomalous.

Why: the reconstruction residual is only as good as the reconstruction, and
a VAE-GAN trained for an hour on a CPU does not reproduce fine texture
(KolektorSDD's surface), so the residual is high everywhere; the encoder's
features describe the texture without having to redraw it. The measurement
behind it is in docs/results.md, including that the map is nearly as good
from a randomly initialised encoder (random convolutional features are known
to work for PaDiM-style statistics), so ``evaluate.py --untrained`` reports
that control beside every trained number.

``MAP`` is the map as a ``fitted_map.FittedMap``: its inputs the stacked
features, its state {'mean' (g, g, d), 'precision' (g, g, d, d)}.
``SHRUNK_MAP`` (``feature_gaussian_shrunk``) is the same map with each
covariance also shrunk towards the *global* feature scale,
``C + REGULARIZATION * I + shrinkage * v * I`` with ``v`` the mean per-cell
variance over all cells and channels (``eval.feature_shrinkage``): a cell
that is nearly constant on normal images (a black background) can then no
longer turn noise into large distances. It helped the Gaussian on all three
of the developers' categories (docs/results.md, issue 36); it is a map of
its own so that ``feature_gaussian``'s numbers stay those measured before.

Memory: the statistics hold, per cell, a ``dims x dims`` matrix (one
float64 accumulator of 82 MB at 128 px, grid 32 x 32, 100 dims; 328 MB at
256 px); measured whole-evaluation peaks are in docs/memory.md.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import threadpoolctl

from cavga_jax import typed_config
from cavga_jax.maps import anomaly_maps
from cavga_jax.maps import fitted_map

Array = jax.Array
NAME = 'feature_gaussian'
SHRUNK_NAME = 'feature_gaussian_shrunk'
# The grid is image_size // 4 cells a side (PaDiM's ResNet layer1 grid):
# fine enough for thin defects, coarse enough that the per-cell covariances
# stay small (at 256 px: 64 x 64 cells).
GRID_DIVISOR = typed_config.default('eval.feature_grid_divisor')
# Added to every covariance's diagonal (PaDiM's 0.01): about 200 normal
# images cannot fix a 100 x 100 covariance alone.
REGULARIZATION = 0.01
# feature_gaussian_shrunk's shrinkage towards the global feature scale, a
# share of the mean per-cell variance (config.eval.feature_shrinkage): the
# value of issue 36's experiment (scripts/fine_defect_variants.py).
SHRINKAGE = typed_config.default('eval.feature_shrinkage')
# The channel subset is drawn once with this seed, so every evaluation of
# every run (and the statistics and the test pass) use the same channels.
CHANNEL_SEED = 0
# config.eval.feature_weights: the feature maps (this one and feature_knn)
# take their features from the evaluated networks, or from the 'initial'
# ones a run started from (its ImageNet encoder, model.pretrained), while
# every other map uses the evaluated networks.
FEATURE_WEIGHTS = ('evaluated', 'initial')


@dataclasses.dataclass(frozen=True)
class FeatureSettings:
  """Which features the map uses (``config.eval.feature_*``).

  Attributes:
    stages: encoder stages (1..4), increasing.
    dims: channels kept after concatenation (all if fewer).
    grid_divisor: the grid is image size / this many cells a side.
    shrinkage: added to each covariance's diagonal times the mean per-cell
      variance (``FeatureMoments.statistics``); 0 for ``feature_gaussian``,
      ``SHRINKAGE`` by default for ``feature_gaussian_shrunk``.
  """
  stages: tuple[int, ...] = typed_config.default('eval.feature_stages')
  dims: int = typed_config.default('eval.feature_dims')
  grid_divisor: int = GRID_DIVISOR
  shrinkage: float = 0.0


def select_channels(stage_widths: Sequence[int], dims: int) -> np.ndarray:
  """Sorted indices of ``dims`` of the ``sum(stage_widths)`` channels."""
  total = int(sum(stage_widths))
  if dims >= total:
    return np.arange(total)
  rng = np.random.default_rng(CHANNEL_SEED)
  return np.sort(rng.choice(total, dims, replace=False))


def grid_size(image_size: int, divisor: int = GRID_DIVISOR) -> int:
  return max(1, image_size // divisor)


def stack_features(stage_outputs: Sequence[Array], channels: np.ndarray,
                   grid: int) -> Array:
  """Stage outputs (B, h_s, w_s, k_s) -> (B, grid, grid, len(channels)).

  Each stage is resized (bilinear, antialiased when shrinking) to the grid
  before concatenation along channels and the fixed channel subset.
  """
  resized = [
      jax.image.resize(
          f.astype(jnp.float32), (f.shape[0], grid, grid, f.shape[-1]),
          'linear') for f in stage_outputs
  ]
  return jnp.concatenate(resized, axis=-1)[..., channels]


class FeatureMoments:
  """Per-cell mean and covariance of (B, g, g, d) features, in batches.

  Sums are float64 (order of batches irrelevant to float32 precision).
  """

  def __init__(self):
    self._count = 0
    self._sum = None
    self._outer = None

  def add(self, features: np.ndarray) -> None:
    f = np.asarray(features, np.float64)
    if self._sum is None:
      self._sum = np.zeros(f.shape[1:])
      self._outer = np.zeros(f.shape[1:] + f.shape[-1:])
    self._sum += f.sum(axis=0)
    # einsum's optimised path (one BLAS call per cell row): 30x faster than
    # numpy's stacked matmul over (h, w) small matrices here. One BLAS
    # thread, as for the inverses below: 2.4x faster on the shared 2-core
    # machine (docs/benchmarks.md), the same sums.
    with threadpoolctl.threadpool_limits(1, user_api='blas'):
      self._outer += np.einsum('nhwi,nhwj->hwij', f, f, optimize=True)
    self._count += len(f)

  def statistics(self, shrinkage: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(mean (g, g, d), precision (g, g, d, d)), float32.

    The covariance is the unbiased one (the ML estimate for one image) plus
    ``REGULARIZATION + shrinkage * v`` on the diagonal, ``v`` the mean of
    the unbiased variances over all cells and channels (0: no shrinkage,
    the same values as before it existed).

    Raises:
      ValueError: no features were added.
    """
    if not self._count:
      raise ValueError('no normal images were added for the feature map')
    n = self._count
    mean = self._sum / n
    # ``(outer - n m m^T) / (n - 1) + REGULARIZATION * I``, in place after
    # the subtraction (328 MB per array at 64 x 64 cells, 100 dims): the
    # same values with two fewer temporaries.
    covariance = self._outer - n * mean[..., :, None] * mean[..., None, :]
    covariance /= max(n - 1, 1)
    diagonal = np.einsum('...ii->...i', covariance)
    if shrinkage:
      # The global scale, before any regularisation is added.
      scale = float(diagonal.mean())
      logging.info(
          'feature Gaussian: mean variance %.4g, shrinkage %g adds '
          '%.4g to the diagonal', scale, shrinkage, shrinkage * scale)
      diagonal[...] += shrinkage * scale
    diagonal[...] += REGULARIZATION
    # One thread per small LAPACK call: OpenBLAS's threads on 4096 100 x 100
    # inverses thrash when another process shares the cores (55 s against
    # 1.5 s single-threaded on the 2-core machine).
    with threadpoolctl.threadpool_limits(1, user_api='blas'):
      precision = np.linalg.inv(covariance)
    return mean.astype(np.float32), precision.astype(np.float32)


@jax.jit
def mahalanobis(features: Array, mean: Array, precision: Array) -> Array:
  """(N, g, g, d) features -> (N, g, g) Mahalanobis distances per cell."""
  # (g, g, d, N): the cells as matmul's batch dimensions, the images as
  # columns. XLA:CPU runs this as one batched GEMM, 9x faster than the
  # equivalent einsum 'hwij,nhwj->nhwi' (11 against 97 ms for 8 images of
  # 64 x 64 cells, d = 100), which it lowers to a loop of matrix-vector
  # products.
  centered = jnp.moveaxis(features - mean, 0, -1)
  projected = jnp.matmul(precision, centered)
  distances = jnp.sum(centered * projected, axis=-2)
  return jnp.sqrt(jnp.maximum(jnp.moveaxis(distances, -1, 0), 0.0))


def _inputs(context: fitted_map.Context, settings: FeatureSettings,
            batch: dict[str, Any]) -> Array:
  """The batch's stacked features (B, g, g, d) (``stack_features``)."""
  channels = select_channels(
      [context.encoder_widths[s - 1] for s in settings.stages], settings.dims)
  return stack_features([batch['stages'][s] for s in settings.stages], channels,
                        grid_size(context.image_size, settings.grid_divisor))


def _finalize(moments: FeatureMoments, settings: FeatureSettings, mesh,
              progress) -> dict[str, np.ndarray]:
  del mesh, progress
  mean, precision = moments.statistics(settings.shrinkage)
  return {'mean': mean, 'precision': precision}


def _apply(context: fitted_map.Context, settings, state: dict[str, Any],
           features: Array) -> Array:
  """(B, g, g, d) features -> (B, S, S): distances, upsampled and blurred."""
  del settings
  distances = mahalanobis(features, jnp.asarray(state['mean']),
                          jnp.asarray(state['precision']))
  return anomaly_maps.upsample_and_blur(distances, context.image_size,
                                        context.map_settings.residual_sigma)


def _moments(settings: FeatureSettings) -> FeatureMoments:
  del settings
  return FeatureMoments()


def _gathered(settings: FeatureSettings) -> tuple[Any, ...]:
  """What the moments depend on: not the shrinkage, a ``finalize`` choice."""
  return (settings.stages, settings.dims, settings.grid_divisor)


def _unit(name: str, settings: FeatureSettings) -> fitted_map.FittedMap:
  # Both Gaussians share one ``FeatureMoments`` when their features agree:
  # the per-cell float64 outer products are the fit's largest host cost.
  return fitted_map.FittedMap(
      name=name,
      inputs=_inputs,
      init=_moments,
      finalize=_finalize,
      apply=_apply,
      stages=lambda settings: settings.stages,
      settings=settings,
      shares=_gathered)


MAP = _unit(NAME, FeatureSettings())
SHRUNK_MAP = _unit(SHRUNK_NAME, FeatureSettings(shrinkage=SHRINKAGE))
