"""The feature-kNN map: each patch's distance to a memory bank of normal patches.

PatchCore (Roth et al., CVPR 2022) on the generator's encoder: for parts
that are not aligned, a position-free map. Per image, the outputs of
encoder stages ``stages`` are averaged over each position's 3 x 3
neighbourhood (PatchCore's locally aware patch features), resized to one
grid of ``image_size // grid_divisor`` cells and concatenated (all
channels). Over the normal training images every cell's feature goes into
one pool, from which a greedy k-center coreset (Sener & Savarese 2018, as
PatchCore: selection on a random Gaussian projection to
``projection_dims``, start at a random point, then repeatedly the point
farthest from the points chosen so far) keeps exactly ``bank_size`` features:
the memory bank. A test patch's score is its Euclidean distance to the
nearest bank entry; the map is those distances bilinear to image size and
Gaussian-smoothed like the residual; the image score is the map's maximum
(PatchCore's), not the top-1 % mean of the other maps.

``MAP`` is the map as a ``fitted_map.FittedMap``: its inputs the patch
features, its state {'bank' (M, D)}.

Memory: fitting holds the pool, ``N_images * grid^2 * D`` float32 features
and their projection (``N * grid^2 * projection_dims``): at 256 px, grid 32
(divisor 8) and EfficientNet-Lite0 stages 2-3 (D = 152), 209 bottle images
hold 130 MB + 110 MB, 540 BSData images 336 MB + 283 MB. The bank is
``bank_size * D`` float32 (2.5 MB for 4096 x 152). The distances are
computed one image and at most ``chunk`` of its patches at a time
(``chunk * bank_size`` float32: 64 MB for 4096 x 4096), inside the
evaluation's jitted step, so they follow its batch sharding. The coreset's
distance updates are sharded over the devices of the mesh along the
patches.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cavga_jax import sharding
from cavga_jax import typed_config
from cavga_jax.maps import anomaly_maps
from cavga_jax.maps import feature_gaussian
from cavga_jax.maps import fitted_map

Array = jax.Array
NAME = 'feature_knn'


@dataclasses.dataclass(frozen=True)
class KnnSettings:
  """Which features the map uses and how big its bank is (``config.eval.knn_*``).

  Attributes:
    stages: encoder stages (1..4), increasing.
    grid_divisor: the grid is image size / this many cells a side.
    bank_size: coreset size (patches kept); all of them if fewer.
    projection_dims: random-projection width of the coreset selection.
    chunk: test patches per block of the distance computation.
    neighbourhood: side of the local average pooling (1 = none).
  """
  stages: tuple[int, ...] = typed_config.default('eval.knn_stages')
  grid_divisor: int = typed_config.default('eval.knn_grid_divisor')
  bank_size: int = typed_config.default('eval.knn_bank_size')
  projection_dims: int = 128
  chunk: int = typed_config.default('eval.knn_chunk')
  neighbourhood: int = 3


def patch_features(stage_outputs: Sequence[Array],
                   grid: int,
                   neighbourhood: int = 3) -> Array:
  """Stage outputs (B, h_s, w_s, k_s) -> (B, grid, grid, sum k_s) float32.

  Each stage is averaged over ``neighbourhood`` x ``neighbourhood``
  positions (stride 1, zero padding counted, as PyTorch's ``AvgPool2d(3, 1,
  1)`` in PatchCore), then resized bilinearly to the grid.
  """
  pooled = []
  for f in stage_outputs:
    f = f.astype(jnp.float32)
    if neighbourhood > 1:
      pad = neighbourhood // 2
      f = jax.lax.reduce_window(f, 0.0, jax.lax.add,
                                (1, neighbourhood, neighbourhood, 1),
                                (1, 1, 1, 1),
                                ((0, 0), (pad, pad), (pad, pad), (0, 0)))
      f = f / neighbourhood**2
    pooled.append(
        jax.image.resize(f, (f.shape[0], grid, grid, f.shape[-1]), 'linear'))
  return jnp.concatenate(pooled, axis=-1)


# Centres chosen per call of the jitted selection: the progress bar moves
# between calls (16 calls for configs/mvtec.py's 4096).
_CORESET_CHUNK = 256


def _distances_to(projected: Array, squared_norms: Array,
                  index: Array) -> Array:
  """(N,) squared distances of the rows to row ``index``."""
  # ||x - c||^2 as one matrix-vector product (the (N, p) difference is never
  # formed); clipped because rounding can make it slightly negative. The
  # step is memory bound: it streams the (N, p) rows once per centre
  # (docs/benchmarks.md, "Fitting").
  return jnp.maximum(
      squared_norms - 2.0 * projected @ projected[index] + squared_norms[index],
      0.0)


@jax.jit
def _coreset_start(projected: Array, start: Array,
                   selected: Array) -> tuple[Array, Array, Array]:
  """(squared norms (N,), nearest (N,), selected) after the first centre."""
  squared_norms = jnp.sum(projected * projected, axis=-1)
  return (squared_norms, _distances_to(projected, squared_norms,
                                       start), selected.at[0].set(start))


@functools.partial(jax.jit, donate_argnums=(2, 3))
def _coreset_steps(projected: Array, squared_norms: Array, selected: Array,
                   nearest: Array, begin: Array,
                   end: Array) -> tuple[Array, Array]:
  """Greedy k-center steps ``begin`` to ``end`` - 1: (selected, nearest)."""

  def body(i, carry):
    selected, nearest = carry
    index = jnp.argmax(nearest).astype(jnp.int32)
    return (selected.at[i].set(index),
            jnp.minimum(nearest, _distances_to(projected, squared_norms,
                                               index)))

  return jax.lax.fori_loop(begin, end, body, (selected, nearest))


def _greedy_coreset(projected: Array,
                    start: Array,
                    size: int,
                    progress: Callable[[int], Any] | None = None) -> Array:
  """Indices (size,) of the greedy k-center selection on (N, p) features.

  ``progress(n)`` is called after every ``_CORESET_CHUNK`` centres with the
  number just chosen.
  """
  squared_norms, nearest, selected = _coreset_start(
      projected, start, jnp.zeros((size,), jnp.int32))
  if progress:
    progress(1)
  for begin in range(1, size, _CORESET_CHUNK):
    end = min(begin + _CORESET_CHUNK, size)
    selected, nearest = _coreset_steps(projected, squared_norms, selected,
                                       nearest, begin, end)
    if progress:
      jax.block_until_ready(selected)
      progress(end - begin)
  return selected


def greedy_coreset(features: np.ndarray,
                   size: int,
                   key: Array,
                   projection_dims: int = 128,
                   mesh: jax.sharding.Mesh | None = None,
                   progress: Callable[[int], Any] | None = None) -> np.ndarray:
  """Sorted indices of ``min(size, N)`` coreset rows of (N, D) features.

  The selection runs on ``features @ P``, P a (D, ``projection_dims``)
  Gaussian matrix scaled by ``1 / sqrt(projection_dims)`` (distances are
  kept in expectation; none when D <= projection_dims), starting at a
  random row, all drawn from ``key``. With ``mesh`` the rows are sharded over
  this process's devices of it (each step's distance update and argmax run
  in parallel). ``progress(n)``: called as centres are chosen, with
  their number (``size`` in all).
  Every selected index is distinct as long as the remaining rows are not all
  duplicates of selected ones.
  """
  n, dims = features.shape
  if size >= n:
    return np.arange(n)
  projection_key, start_key = jax.random.split(key)
  x = jnp.asarray(features, jnp.float32)
  if dims > projection_dims:
    projection = jax.random.normal(projection_key, (dims, projection_dims),
                                   jnp.float32) / np.sqrt(projection_dims)
    x = _project(x, projection)
  rows = _local_sharding(mesh, n)
  if rows is not None:
    x = jax.device_put(x, rows)
  start = jax.random.randint(start_key, (), 0, n, jnp.int32)
  return np.sort(np.asarray(_greedy_coreset(x, start, size, progress)))


def _local_sharding(mesh: jax.sharding.Mesh | None,
                    rows: int) -> jax.sharding.Sharding | None:
  """Rows over this process's devices of ``mesh``, or None (one device, or
  rows that do not split). Every process holds the same host arrays and
  computes the whole result, so only process-local devices are used."""
  if mesh is None:
    return None
  local = mesh.local_mesh
  if local.size <= 1 or rows % local.size:
    return None
  return sharding.batch_sharding(local)


@jax.jit
def _project(x: Array, projection: Array) -> Array:
  return x @ projection


@functools.partial(jax.jit, static_argnames=('chunk',))
def bank_distances(queries: Array, bank: Array, chunk: int) -> Array:
  """(Q, D) queries, (M, D) bank -> (Q,) Euclidean distance to the nearest."""
  bank_norms = jnp.sum(bank * bank, axis=-1)
  q = queries.shape[0]
  padded = -(-q // chunk) * chunk
  blocks = jnp.pad(queries,
                   ((0, padded - q), (0, 0))).reshape(-1, chunk,
                                                      queries.shape[-1])

  def block_distances(block):
    squared = (
        jnp.sum(block * block, axis=-1, keepdims=True) - 2.0 * block @ bank.T
        + bank_norms)
    return jnp.sqrt(jnp.maximum(jnp.min(squared, axis=-1), 0.0))

  return jax.lax.map(block_distances, blocks).reshape(-1)[:q]


def nearest_distances(features: Array, bank: Array, chunk: int = 4096) -> Array:
  """(B, g, g, D) patch features -> (B, g, g) distance to the nearest bank row.

  One image at a time, ``chunk`` of its patches per block (memory
  ``min(chunk, g * g) * M`` float32), so the batch dimension may be sharded
  or symbolic (``cavga_jax.deploy.export``). Pure jnp: the evaluation applies
  it per
  batch inside its jitted fitted-map step.
  """
  shape = features.shape
  queries = jnp.asarray(features,
                        jnp.float32).reshape(shape[0], shape[1] * shape[2],
                                             shape[3])
  chunk = max(1, min(chunk, shape[1] * shape[2]))
  bank = jnp.asarray(bank, jnp.float32)
  distances = jax.lax.map(lambda q: bank_distances(q, bank, chunk), queries)
  return distances.reshape(shape[:3])


class PatchPool:
  """Collects the normal images' patch features for the coreset, in batches."""

  def __init__(self):
    self._batches: list[np.ndarray] = []

  def add(self, features: np.ndarray) -> None:
    """(B, g, g, D) features of normal images."""
    self._batches.append(
        np.asarray(features, np.float32).reshape(-1, features.shape[-1]))

  def memory_bank(self,
                  settings: KnnSettings,
                  key: Array,
                  mesh: jax.sharding.Mesh | None = None,
                  progress: Callable[[int], Any] | None = None) -> np.ndarray:
    """(min(bank_size, patches), D) float32: the greedy coreset of the pool.

    ``progress``: ``greedy_coreset``'s.

    Raises:
      ValueError: no features were added.
    """
    if not self._batches:
      raise ValueError('no normal images were added for the feature-kNN map')
    pool = np.concatenate(self._batches)
    self._batches = []  # the bank is all that is kept
    indices = greedy_coreset(pool, settings.bank_size, key,
                             settings.projection_dims, mesh, progress)
    return pool[indices]


# The coreset's projection and start are drawn with this seed, so every
# evaluation of a checkpoint builds the same bank.
CORESET_SEED = 0


def coreset_key() -> Array:
  return jax.random.key(CORESET_SEED)


def _inputs(context: fitted_map.Context, settings: KnnSettings,
            batch: dict[str, Any]) -> Array:
  """The batch's patch features (B, g, g, D) (``patch_features``)."""
  return patch_features([batch['stages'][s] for s in settings.stages],
                        feature_gaussian.grid_size(context.image_size,
                                                   settings.grid_divisor),
                        settings.neighbourhood)


def _finalize(pool: PatchPool, settings: KnnSettings,
              mesh: jax.sharding.Mesh | None,
              progress: fitted_map.Progress) -> dict[str, np.ndarray]:
  """{'bank': the coreset}, chosen with a progress bar."""
  tic = time.perf_counter()
  with progress(settings.bank_size, 'feature_knn coreset', 'patch') as bar:
    bank = pool.memory_bank(settings, coreset_key(), mesh, bar.update)
  logging.info('feature_knn: coreset of %d patches in %.1f s', len(bank),
               time.perf_counter() - tic)
  return {'bank': bank}


def _apply(context: fitted_map.Context, settings: KnnSettings,
           state: dict[str, Any], features: Array) -> Array:
  """(B, g, g, D) features -> (B, S, S): distances, upsampled and blurred."""
  distances = nearest_distances(features, state['bank'], settings.chunk)
  return anomaly_maps.upsample_and_blur(distances, context.image_size,
                                        context.map_settings.residual_sigma)


MAP = fitted_map.FittedMap(
    name=NAME,
    inputs=_inputs,
    init=lambda settings: PatchPool(),
    finalize=_finalize,
    apply=_apply,
    stages=lambda settings: settings.stages,
    settings=KnnSettings(),
    image_score=anomaly_maps.max_score)
