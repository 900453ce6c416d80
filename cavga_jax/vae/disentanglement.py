"""Disentanglement metrics on ground-truth factors: FactorVAE score and MIG.

Both follow disentanglement_lib (Locatello et al., ICML 2019,
`disentanglement_lib/evaluation/metrics/{factor_vae,mig}.py`); the
differences are written down at each function. They score a
representation, a function from images to codes

    representation_fn(images: (n, 64, 64, 1) uint8) -> codes (n, d)

(e.g. the encoder mean of a VAE, jitted by the caller), on a
`cavga_jax.data.factor_dataset.FactorDataset`. The images are passed in chunks of
`chunk_size` (the last chunk is padded by repeating its last image, so a
jitted encoder sees one batch shape and compiles once); the codes are
gathered as float64 numpy arrays.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from cavga_jax.data.factor_dataset import FactorDataset

RepresentationFn = Callable[[np.ndarray], np.ndarray]

_log = logging.getLogger(__name__)


def representations(representation_fn: RepresentationFn,
                    dataset: FactorDataset,
                    indices: np.ndarray,
                    chunk_size: int = 256) -> np.ndarray:
  """The codes of the examples `indices`, computed `chunk_size` at a time.

  Args:
    representation_fn: images (c, H, W, C) uint8 -> codes (c, d); called
      with exactly `chunk_size` images each time (the last chunk padded).
    dataset: the dataset the indices refer to.
    indices: (n,) example indices.
    chunk_size: images per call.

  Returns:
    (n, d) float64 codes.

  Raises:
    ValueError: the codes are not (chunk, d) or not finite.
  """
  if chunk_size < 1:
    raise ValueError(f'chunk_size must be >= 1, got {chunk_size}')
  indices = np.asarray(indices, np.int64)
  out = None
  for start in range(0, len(indices), chunk_size):
    chunk = indices[start:start + chunk_size]
    m = len(chunk)
    if m < chunk_size:
      chunk = np.concatenate([chunk, np.full(chunk_size - m, chunk[-1])])
    codes = np.asarray(representation_fn(dataset.images(chunk)), np.float64)
    if codes.ndim != 2 or codes.shape[0] != chunk_size:
      raise ValueError(f'representation_fn must map {chunk_size} images to '
                       f'({chunk_size}, d) codes, got shape {codes.shape}')
    if not np.isfinite(codes).all():
      raise ValueError('representation_fn returned non-finite codes')
    if out is None:
      out = np.empty((len(indices), codes.shape[1]), np.float64)
    out[start:start + m] = codes[:m]
  if out is None:
    raise ValueError('no example to represent')
  return out


def factor_vae_score(representation_fn: RepresentationFn,
                     dataset: FactorDataset,
                     rng: np.random.Generator,
                     batch_size: int = 64,
                     num_train: int = 10000,
                     num_eval: int = 5000,
                     num_variance_estimate: int = 10000,
                     prune_threshold: float = 0.05,
                     chunk_size: int = 256) -> dict[str, float | int]:
  """The FactorVAE disentanglement score (Kim & Mnih, ICML 2018).

  1. Global scale: the variance (ddof=1) of each code dim over
     `num_variance_estimate` random examples.
  2. Pruning: a dim is active when its global standard deviation is
     greater than `prune_threshold` (absolute, default 0.05; a constant dim,
     std 0, is always pruned). Kim & Mnih prune the dims "collapsed to the
     prior" without giving a number; for a VAE mean under an N(0, I) prior
     a collapsed dim has std near 0 and a used one near 1, so 0.05 tells
     them apart. disentanglement_lib's default keeps every dim
     (`std >= 0`), which turns a constant dim into 0/0 below; pass
     `prune_threshold=0` for its behaviour minus that case. The threshold
     is absolute, not relative to the largest std, because a relative one
     would prune informative dims of a representation whose dims have
     different units.
  3. A vote: draw a factor k uniformly, `batch_size` examples that share a
     value of k (`dataset.sample_indices_with_fixed_factor`), divide the
     variance of each active dim over the batch by its global variance; the
     dim d with the smallest ratio votes (d, k).
  4. Majority-vote classifier: each dim predicts the factor it voted for
     most on `num_train` training votes (ties: the lowest factor index);
     accuracy = fraction of votes whose factor is the one predicted for
     their dim, on the training votes and on `num_eval` fresh votes.

  As in disentanglement_lib, a random representation scores about
  1 / num_factors on the eval votes (train accuracy is biased upwards by
  fitting), a perfectly disentangled one 1.

  Args:
    representation_fn: images (n, 64, 64, 1) uint8 -> codes (n, d).
    dataset: ground-truth-factor dataset.
    rng: the random generator (the score is deterministic given its state).
    batch_size: examples per vote (>= 2).
    num_train: votes that fit the classifier.
    num_eval: votes that evaluate it.
    num_variance_estimate: examples for the global variances (>= 2).
    prune_threshold: global standard deviation at or below which a dim is
      pruned (step 2).
    chunk_size: images per `representation_fn` call (see
      `representations`).

  Returns:
    {'train_accuracy', 'eval_accuracy', 'num_active_dims'}. When no dim is
    active (every code constant) both accuracies are 0.0 and
    num_active_dims 0, as in disentanglement_lib.
  """
  if batch_size < 2 or num_variance_estimate < 2:
    raise ValueError(f'batch_size and num_variance_estimate must be >= 2, '
                     f'got {batch_size} and {num_variance_estimate}')
  if num_train < 1 or num_eval < 1:
    raise ValueError(f'num_train and num_eval must be >= 1, got {num_train} '
                     f'and {num_eval}')
  codes = representations(representation_fn, dataset,
                          dataset.sample_indices(num_variance_estimate, rng),
                          chunk_size)
  global_variances = np.var(codes, axis=0, ddof=1)
  std = np.sqrt(global_variances)
  active = (std > 0) & (std > prune_threshold)
  if not active.any():
    _log.warning('factor_vae_score: every code dim is constant; score 0')
    return {'train_accuracy': 0.0, 'eval_accuracy': 0.0, 'num_active_dims': 0}
  train_votes = _votes(representation_fn, dataset, rng, batch_size, num_train,
                       global_variances, active, chunk_size)
  classifier = np.argmax(train_votes, axis=0)  # (d,): dim -> factor
  eval_votes = _votes(representation_fn, dataset, rng, batch_size, num_eval,
                      global_variances, active, chunk_size)
  dims = np.arange(train_votes.shape[1])
  return {
      'train_accuracy':
          float(train_votes[classifier, dims].sum() / train_votes.sum()),
      'eval_accuracy':
          float(eval_votes[classifier, dims].sum() / eval_votes.sum()),
      'num_active_dims':
          int(active.sum()),
  }


def _votes(representation_fn: RepresentationFn, dataset: FactorDataset,
           rng: np.random.Generator, batch_size: int, num_votes: int,
           global_variances: np.ndarray, active: np.ndarray,
           chunk_size: int) -> np.ndarray:
  """(num_factors, d) int64 vote counts: [k, dim] = votes of dim for k."""
  votes = np.zeros((dataset.num_factors, len(global_variances)), np.int64)
  active_dims = np.flatnonzero(active)
  # Votes whose batches are represented together (a few chunks' worth).
  group = max(1, (4 * chunk_size) // batch_size)
  for start in range(0, num_votes, group):
    count = min(group, num_votes - start)
    factors = rng.integers(0, dataset.num_factors, size=count)
    indices = np.concatenate([
        dataset.sample_indices_with_fixed_factor(int(k), batch_size, rng)[1]
        for k in factors
    ])
    codes = representations(representation_fn, dataset, indices, chunk_size)
    codes = codes.reshape(count, batch_size, -1)[:, :, active_dims]
    ratio = np.var(codes, axis=1, ddof=1) / global_variances[active_dims]
    np.add.at(votes, (factors, active_dims[np.argmin(ratio, axis=1)]), 1)
  return votes


def discretize(codes: np.ndarray, num_bins: int = 20) -> np.ndarray:
  """Equal-width histogram bins of each code dim (disentanglement_lib's).

  Args:
    codes: (n, d) codes.
    num_bins: bins per dim, spanning [min, max] of that dim.

  Returns:
    (n, d) int64 bin indices in [0, num_bins); a constant dim falls in
    a single bin.
  """
  codes = np.asarray(codes, np.float64)
  out = np.zeros(codes.shape, np.int64)
  for j in range(codes.shape[1]):
    edges = np.histogram(codes[:, j], num_bins)[1]
    # np.digitize on the left edges, as disentanglement_lib, minus 1.
    out[:, j] = np.digitize(codes[:, j], edges[:-1]) - 1
  return out


def mutual_information(a: np.ndarray, b: np.ndarray) -> float:
  """Mutual information (nats) of two discrete (n,) label arrays.

  From their contingency table, with empirical probabilities; equals
  `sklearn.metrics.mutual_info_score(a, b)`.
  """
  a = np.asarray(a).ravel()
  b = np.asarray(b).ravel()
  if a.shape != b.shape or not a.size:
    raise ValueError(f'need two non-empty label arrays of one length, got '
                     f'{a.shape} and {b.shape}')
  _, ia = np.unique(a, return_inverse=True)
  _, ib = np.unique(b, return_inverse=True)
  na, nb = ia.max() + 1, ib.max() + 1
  joint = np.bincount(ia * nb + ib, minlength=na * nb).reshape(na, nb)
  joint = joint / a.size
  pa = joint.sum(axis=1, keepdims=True)
  pb = joint.sum(axis=0, keepdims=True)
  nz = joint > 0
  mi = np.sum(joint[nz] * np.log(joint[nz] / (pa @ pb)[nz]))
  return float(max(mi, 0.0))


def entropy(a: np.ndarray) -> float:
  """Entropy (nats) of a discrete (n,) label array, empirical frequencies."""
  _, counts = np.unique(np.asarray(a).ravel(), return_counts=True)
  p = counts / counts.sum()
  return float(-np.sum(p * np.log(p)))


def mig_score(representation_fn: RepresentationFn,
              dataset: FactorDataset,
              rng: np.random.Generator,
              num_samples: int = 10000,
              num_bins: int = 20,
              chunk_size: int = 256) -> dict:
  """The Mutual Information Gap (Chen et al., NeurIPS 2018).

  As disentanglement_lib's discrete MIG: the codes of `num_samples` random
  examples are discretised into `num_bins` equal-width bins per dim
  (`discretize`); I[j, k] = mutual information between code dim j and
  factor k, H[k] = entropy of factor k, both from the empirical
  frequencies of the sample (nats); the gap of factor k is
  (largest I[:, k] - second largest I[:, k]) / H[k], and MIG is the mean gap
  over the factors.

  Differences: factors that take a single value in the sample (H = 0, e.g. a
  factor that a partial dataset holds fixed) have no gap and are skipped
  (listed in 'skipped_factors'; disentanglement_lib would divide by 0). With
  a 1-dim code the second largest MI is taken as 0.

  Args:
    representation_fn: images (n, 64, 64, 1) uint8 -> codes (n, d).
    dataset: ground-truth-factor dataset.
    rng: the random generator.
    num_samples: examples drawn uniformly with replacement.
    num_bins: histogram bins per code dim.
    chunk_size: images per `representation_fn` call.

  Returns:
    {'mig': mean gap (NaN, with a warning, if every factor is skipped),
     'mig_per_factor': {factor name: gap} of the factors kept,
     'skipped_factors': [names of the factors skipped],
     'mutual_info': (d, F) float64 I, 'factor_entropy': (F,) float64 H}.
  """
  if num_samples < 2 or num_bins < 1:
    raise ValueError(f'need num_samples >= 2 and num_bins >= 1, got '
                     f'{num_samples} and {num_bins}')
  indices = dataset.sample_indices(num_samples, rng)
  codes = discretize(
      representations(representation_fn, dataset, indices, chunk_size),
      num_bins)
  factors = dataset.factors_of(indices)
  num_dims, num_factors = codes.shape[1], factors.shape[1]
  mi = np.array([[
      mutual_information(codes[:, j], factors[:, k]) for k in range(num_factors)
  ] for j in range(num_dims)])
  h = np.array([entropy(factors[:, k]) for k in range(num_factors)])
  top = -np.sort(-mi, axis=0)
  second = top[1] if num_dims > 1 else np.zeros(num_factors)
  per_factor, skipped = {}, []
  for k, name in enumerate(dataset.factor_names):
    if h[k] > 0:
      per_factor[name] = float((top[0, k] - second[k]) / h[k])
    else:
      skipped.append(name)
  if skipped:
    _log.info('mig_score: factors %s take one value in the sample; skipped',
              ', '.join(skipped))
  if per_factor:
    mig = float(np.mean(list(per_factor.values())))
  else:
    _log.warning('mig_score: every factor takes a single value; MIG is NaN')
    mig = float('nan')
  return {
      'mig': mig, 'mig_per_factor': per_factor, 'skipped_factors': skipped,
      'mutual_info': mi, 'factor_entropy': h
  }
