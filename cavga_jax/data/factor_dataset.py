"""The interface of datasets with discrete ground-truth factors of variation.

Disentanglement metrics (`cavga_jax.vae.disentanglement`) read images and their
factors through `FactorDataset` and sample examples that share one factor
value; `sprites` provides the dSprites sources.
"""

from __future__ import annotations

import abc

import numpy as np


class FactorDataset(abc.ABC):
  """A dataset of images with discrete ground-truth factors of variation.

  Subclasses provide `factor_names`, `factor_sizes`, `factors` and
  `images`; the sampling methods work from the rows of `factors` present,
  so they are right for the full grid and for any subset of it (a partial
  dataset, TFDS mock data).

  Attributes:
    factor_names: (F,) names of the factors.
    factor_sizes: (F,) number of possible values of each factor; factor k
      takes integer values in [0, factor_sizes[k]).
  """

  factor_names: tuple[str, ...]
  factor_sizes: tuple[int, ...]

  @property
  @abc.abstractmethod
  def factors(self) -> np.ndarray:
    """(N, F) int64: the factor values of every example, row i = example i."""

  @abc.abstractmethod
  def images(self, indices: np.ndarray) -> np.ndarray:
    """(n, H, W, C) uint8 images of the examples `indices` ((n,) ints)."""

  @property
  def num_examples(self) -> int:
    return int(self.factors.shape[0])

  def factors_of(self, indices: np.ndarray) -> np.ndarray:
    """(n, F) int64 factors of the examples `indices` ((n,) ints)."""
    return self.factors[check_indices(indices, self.num_examples)]

  @property
  def num_factors(self) -> int:
    return len(self.factor_names)

  def sample_indices(self, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n,) int64 example indices drawn uniformly, with replacement."""
    check_count(n)
    return rng.integers(0, self.num_examples, size=n, dtype=np.int64)

  def sample_indices_with_fixed_factor(
      self, factor: int, n: int,
      rng: np.random.Generator) -> tuple[int, np.ndarray]:
    """n examples that share one value of `factor`.

    The value is drawn uniformly among the values of `factor` present in the
    dataset, then n examples having it are drawn uniformly with replacement
    (on the full grid: the other factors are uniform and independent).

    Args:
      factor: the factor index in [0, F).
      n: number of examples.
      rng: the random generator.

    Returns:
      (value, indices): the fixed value and (n,) int64 example indices.
    """
    check_count(n)
    values, order, starts, counts = self._groups(self._check_factor(factor))
    j = rng.integers(len(values))
    picks = starts[j] + rng.integers(0, counts[j], size=n)
    return int(values[j]), order[picks]

  def _check_factor(self, factor: int) -> int:
    if not 0 <= factor < self.num_factors:
      raise ValueError(f'factor must be in [0, {self.num_factors}), got '
                       f'{factor!r}')
    return int(factor)

  def _groups(self, factor: int) -> tuple[np.ndarray, ...]:
    """(values present, example order sorted by value, group starts, counts)."""
    cache = self.__dict__.setdefault('_group_cache', {})
    if factor not in cache:
      column = self.factors[:, factor]
      order = np.argsort(column, kind='stable')
      values, starts, counts = np.unique(
          column[order], return_index=True, return_counts=True)
      cache[factor] = (values, order.astype(np.int64), starts, counts)
    return cache[factor]


def check_count(n: int) -> None:
  if n < 0:
    raise ValueError(f'the number of examples must be >= 0, got {n}')


def check_indices(indices: np.ndarray, num_examples: int) -> np.ndarray:
  indices = np.asarray(indices)
  if indices.ndim != 1 or not (indices.size == 0
                               or np.issubdtype(indices.dtype, np.integer)):
    raise ValueError(f'indices must be a 1-D integer array, got shape '
                     f'{indices.shape} and dtype {indices.dtype}')
  if indices.size and (indices.min() < 0 or indices.max() >= num_examples):
    raise IndexError(f'example indices must be in [0, {num_examples}), got '
                     f'[{indices.min()}, {indices.max()}]')
  return indices.astype(np.int64)
