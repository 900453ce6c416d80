"""Batching of in-memory datasets for training and evaluation.

Training batches are a pure function of (seed, step): see
`epoch_permutation_indices`. A resumed run therefore draws exactly the batches
that an uninterrupted run would have drawn, without saving any iterator state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import queue
import threading
from typing import Any

import numpy as np

from cavga_jax.data.folder import AnomalyDataset
from cavga_jax.errors import DataError


def _check_int(name: str, value: int, low: int) -> int:
  if isinstance(
      value, bool) or not isinstance(value, (int, np.integer)) or (value < low):
    raise DataError(f'{name} must be an integer >= {low}, got {value!r}')
  return int(value)


def _epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def _indices(num_examples: int, batch_size: int, step: int,
             permutation: Callable[[int], np.ndarray]) -> np.ndarray:
  positions = step * batch_size + np.arange(batch_size, dtype=np.int64)
  epochs = positions // num_examples
  offsets = positions % num_examples
  out = np.empty(batch_size, np.int64)
  # A batch spans at most a few epochs (more only if batch_size exceeds
  # num_examples), so this loop is short.
  for epoch in np.unique(epochs):
    sel = epochs == epoch
    out[sel] = permutation(int(epoch))[offsets[sel]]
  return out


def epoch_permutation_indices(num_examples: int, batch_size: int, step: int,
                              seed: int) -> np.ndarray:
  """Example indices of training step `step`.

  Sample position p = step * batch_size + i lies in epoch
  e = p // num_examples and takes example
  `default_rng([seed, e]).permutation(num_examples)[p % num_examples]`.
  Every epoch visits each example once; batches may straddle epochs
  (and span several when batch_size > num_examples).

  Args:
    num_examples: dataset size N >= 1.
    batch_size: batch size B >= 1.
    step: training step >= 0.
    seed: non-negative seed.

  Returns:
    (batch_size,) int64 indices in [0, num_examples).
  """
  num_examples = _check_int('num_examples', num_examples, 1)
  batch_size = _check_int('batch_size', batch_size, 1)
  step = _check_int('step', step, 0)
  seed = _check_int('seed', seed, 0)
  return _indices(num_examples, batch_size, step,
                  lambda e: _epoch_permutation(num_examples, seed, e))


# Tags of quota_batch_indices' generators: the normal and anomalous streams
# and the in-batch order are independent of each other and of the uniform
# sampler's default_rng([seed, epoch]).
_NORMAL_STREAM, _ANOMALOUS_STREAM, _ORDER_STREAM = 1, 2, 3


def quota_batch_indices(labels: np.ndarray, batch_size: int, quota: int,
                        step: int, seed: int) -> np.ndarray:
  """Example indices of training step `step` with `quota` labelled anomalies.

  CAVGA_w's few labelled anomalies (a handful among hundreds of normal
  images) would almost never be drawn by `epoch_permutation_indices`, so its
  classifier would only see normal images. Here every batch holds exactly
  `quota` anomalies and `batch_size - quota` normal images:

  * the normal images follow `epoch_permutation_indices`' scheme over the
    normal set with batch size `batch_size - quota` (epoch permutations from
    `default_rng([seed, epoch, 1])`), so every normal image is visited once
    per pass of `num_normal / (batch_size - quota)` steps;
  * the anomalies likewise cycle through the anomalous set in epochs of
    random order (`default_rng([seed, epoch, 2])`); with fewer anomalies
    than `quota` a batch spans several epochs, so images repeat within the
    batch but every anomaly is drawn equally often;
  * the batch is shuffled with `default_rng([seed, step, 3])`, so the
    anomalies do not always sit in the first rows (or on the first host).

  A pure function of its arguments, so a resumed run draws the same batches
  and every host draws the same global indices. `quota = 0` is exactly
  `epoch_permutation_indices(len(labels), batch_size, step, seed)`.

  Args:
    labels: (N,) int training labels, 0 normal, 1 anomalous.
    batch_size: batch size B >= 1.
    quota: anomalies per batch, 0 <= quota < B.
    step: training step >= 0.
    seed: non-negative seed.

  Returns:
    (batch_size,) int64 indices into `labels`, `quota` of them anomalous.

  Raises:
    DataError: bad arguments, no normal images, or `quota > 0` without
      anomalies.
  """
  labels = np.asarray(labels)
  batch_size = _check_int('batch_size', batch_size, 1)
  quota = _check_int('quota', quota, 0)
  step = _check_int('step', step, 0)
  seed = _check_int('seed', seed, 0)
  if quota == 0:
    return epoch_permutation_indices(labels.shape[0], batch_size, step, seed)
  if quota >= batch_size:
    raise DataError(f'quota={quota} anomalies per batch must be < '
                    f'batch_size={batch_size}')
  normal, anomalous = np.flatnonzero(labels == 0), np.flatnonzero(labels != 0)
  if normal.size == 0 or anomalous.size == 0:
    raise DataError(
        f'{quota} labelled anomalies per batch need normal and anomalous '
        f'training images; the training set has {normal.size} normal and '
        f'{anomalous.size} anomalous (config.data.weak_anomalies_per_batch; '
        '0 draws batches uniformly)')

  def stream(indices: np.ndarray, size: int, tag: int) -> np.ndarray:
    n = indices.size
    return indices[_indices(
        n, size, step,
        lambda e: np.random.default_rng([seed, e, tag]).permutation(n))]

  batch = np.concatenate([
      stream(anomalous, quota, _ANOMALOUS_STREAM),
      stream(normal, batch_size - quota, _NORMAL_STREAM)
  ])
  order = np.random.default_rng([seed, step,
                                 _ORDER_STREAM]).permutation(batch_size)
  return batch[order].astype(np.int64)


# Queue items from the producer thread.
_BATCH, _ERROR = 'batch', 'error'


def _produce(images: np.ndarray, batch_size: int, seed: int, start_step: int,
             put_fn: Callable[[np.ndarray], Any] | None,
             index_fn: Callable[[int], np.ndarray] | None, out: queue.Queue,
             stop: threading.Event) -> None:
  """Producer thread body; holds no reference to the TrainBatches object."""
  num_examples = images.shape[0]
  cache: dict[int, np.ndarray] = {}

  def permutation(epoch: int) -> np.ndarray:
    if epoch not in cache:
      # Batches move forward through epochs, so older ones are never needed.
      for old in [e for e in cache if e < epoch - 1]:
        del cache[old]
      cache[epoch] = _epoch_permutation(num_examples, seed, epoch)
    return cache[epoch]

  def put(item) -> bool:
    while not stop.is_set():
      try:
        out.put(item, timeout=0.05)
        return True
      except queue.Full:
        pass
    return False

  step = start_step
  try:
    while not stop.is_set():
      if index_fn is None:
        idx = _indices(num_examples, batch_size, step, permutation)
      else:
        idx = np.asarray(index_fn(step))
        if idx.shape != (batch_size,):
          raise DataError(f'TrainBatches: index_fn({step}) returned shape '
                          f'{idx.shape}, expected ({batch_size},)')
      batch = np.take(images, idx, axis=0)
      if put_fn is not None:
        batch = put_fn(batch)
      if not put((_BATCH, batch)):
        return
      step += 1
  except BaseException as e:  # pylint: disable=broad-except
    # Handed to the consumer, which re-raises it in the training loop.
    put((_ERROR, e))


class TrainBatches:
  """Infinite iterator over training batches, prefetched in a thread.

  Batch k (k = 0, 1, ...) is `put_fn(images[epoch_permutation_indices(N,
  batch_size, start_step + k, seed)])`, or `put_fn(images[index_fn(
  start_step + k)])` when `index_fn` is given. A background thread gathers the
  images and calls `put_fn` (e.g. `jax.device_put` with a sharding) ahead of
  time, so the host work and the host-to-device copy overlap with the
  computation; at most `prefetch` finished batches wait in the queue (plus
  one the thread holds while the queue is full).

  Use as a context manager, or call `close()`, to stop the thread. An
  exception raised in the thread (e.g. by `put_fn`) is re-raised by `next()`.
  """

  def __init__(self,
               images: np.ndarray,
               batch_size: int,
               seed: int,
               start_step: int = 0,
               prefetch: int = 2,
               put_fn: Callable[[np.ndarray], Any] | None = None,
               index_fn: Callable[[int], np.ndarray] | None = None):
    """Starts the producer thread.

    Args:
      images: (N, H, W, C) uint8 training images, already decoded.
      batch_size: images per batch.
      seed: non-negative shuffling seed.
      start_step: step of the first batch (the restored step when resuming).
      prefetch: queue size, >= 1.
      put_fn: applied to each (batch_size, H, W, C) uint8 batch in the
        thread; None yields the numpy batches.
      index_fn: step -> (batch_size,) int indices into `images`, called in
        the thread; it must be a pure function of the step (e.g.
        `quota_batch_indices`) for resumed runs to be exact. None: the
        `epoch_permutation_indices` of `seed`.
    """
    images = np.asarray(images)
    if images.ndim < 1 or images.shape[0] < 1:
      raise DataError(f'TrainBatches: images must be a non-empty (N, ...) '
                      f'array, got shape {images.shape}')
    batch_size = _check_int('batch_size', batch_size, 1)
    seed = _check_int('seed', seed, 0)
    start_step = _check_int('start_step', start_step, 0)
    prefetch = _check_int('prefetch', prefetch, 1)
    self._step = start_step
    self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
    self._stop = threading.Event()
    self._error: BaseException | None = None
    self._closed = False
    self._thread = threading.Thread(
        target=_produce,
        args=(images, batch_size, seed, start_step, put_fn, index_fn,
              self._queue, self._stop),
        name='TrainBatches',
        daemon=True)
    self._thread.start()

  @property
  def step(self) -> int:
    """The training step of the batch that the next `next()` returns."""
    return self._step

  def next(self) -> Any:
    """Returns the next batch: `put_fn(batch)` or a (B, H, W, C) uint8 array.

    Raises:
      RuntimeError: the iterator was closed.
      Exception: whatever the producer thread raised.
    """
    if self._error is not None:
      raise self._error
    if self._closed:
      raise RuntimeError('TrainBatches is closed')
    while True:
      try:
        kind, value = self._queue.get(timeout=0.1)
        break
      except queue.Empty:
        if not self._thread.is_alive() and self._queue.empty():
          raise RuntimeError('TrainBatches producer thread stopped') from None
    if kind == _ERROR:
      self._error = value
      self.close()
      raise value
    self._step += 1
    return value

  def __next__(self) -> Any:
    return self.next()

  def __iter__(self) -> TrainBatches:
    return self

  def close(self) -> None:
    """Stops the producer thread and drops prefetched batches."""
    self._closed = True
    self._stop.set()
    # Emptying the queue unblocks a producer waiting in put(); it then sees
    # the stop flag.
    while True:
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    if self._thread is not threading.current_thread():
      self._thread.join()

  def __enter__(self) -> TrainBatches:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def __del__(self):
    # Without this an abandoned iterator would keep its thread (and the
    # device buffers it prefetched) alive until the process ends.
    stop = getattr(self, '_stop', None)
    if stop is not None:
      stop.set()


def eval_batches(dataset: AnomalyDataset | np.ndarray,
                 batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
  """Yields the dataset's images in order, in equally shaped batches.

  The last batch is padded by repeating the last image, so a jitted
  evaluation step compiles once; callers drop the padded rows.

  Args:
    dataset: an AnomalyDataset, or an (N, H, W, C) array of images.
    batch_size: images per batch, >= 1.

  Yields:
    (images, num_valid): (batch_size, H, W, C) images (uint8 for an
    AnomalyDataset) of which the first num_valid are real.
  """
  batch_size = _check_int('batch_size', batch_size, 1)
  images = dataset.images if isinstance(
      dataset, AnomalyDataset) else (np.asarray(dataset))
  n = images.shape[0]
  for start in range(0, n, batch_size):
    batch = images[start:start + batch_size]
    num_valid = batch.shape[0]
    if num_valid < batch_size:
      pad = np.repeat(batch[-1:], batch_size - num_valid, axis=0)
      batch = np.concatenate([batch, pad], axis=0)
    yield batch, num_valid
