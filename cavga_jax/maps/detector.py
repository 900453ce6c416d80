"""A trained detector on frozen features: SimpleNet (Liu et al., CVPR 2023).

The network (``Discriminator`` and the adaptor), its loss and train step, and the map
``feature_detector`` (``MAP``, a ``fitted_map.FittedMap``). The training
program (features computed once, the loop, checkpoints, the synthetic
validation) is ``training.detector_training``.

What it computes, for one image:

* features: the encoder stages ``stages`` (those of ``feature_gaussian``:
  ``eval.feature_stages``), resized to one grid of ``image_size //
  grid_divisor`` cells and concatenated (all channels, no random subset),
  then averaged over each cell's ``aggregate`` x ``aggregate``
  neighbourhood (``config.detector.aggregate``, default 3: SimpleNet's
  ``patchsize=3`` aggregation, PatchCore's ``patchify``; 1: none);
* standardised per channel with the mean and standard deviation of the
  normal training images (part of the state); SimpleNet's WideResNet
  features are average-pooled to a fixed scale, Lite0's ReLU6 stages are
  not, and a noise scale means something only on standardised features;
* the feature adaptor: one linear layer (plain parameters, no bias: the
  discriminator's BatchNorm removes any shift), initialised to the identity
  (SimpleNet's ``Projection`` with ``pre_proj=1``; SimpleNet initialises it
  randomly, xavier_normal: with the adaptor's small learning rate a random
  projection stays nearly random for the few hundred steps a CPU affords,
  so it starts from the features themselves);
* the discriminator (``Discriminator``): Linear(D, hidden; no bias, which
  BatchNorm removes) + BatchNorm + LeakyReLU(0.2) +
  Linear(hidden, 1, no bias) (SimpleNet's ``dsc_layers=2, dsc_hidden=
  1024``); the map is ``-D`` per cell, bilinear to image size and blurred
  like the other feature maps; the image score is the map's maximum
  (SimpleNet's).

Training (``train_step``): positives are the adapted features of normal
cells, negatives the same plus Gaussian noise of std ``noise_std`` (in
standardised units), one BatchNorm batch for both, the truncated L1 loss
``relu(margin - D(pos)) + relu(D(neg) + margin)`` with margin 0.5. Adam
(lr 2e-4, L2 1e-5) for the discriminator, AdamW (lr 1e-4) for the adaptor,
as SimpleNet. GLASS (Chen et al., ECCV 2024) adds gradient ascent on the
negatives and image-level synthetic anomalies; the latter failed here
(issue 36: the head learned the pasted defects), so it is not used.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cavga_jax import nonfinite
from cavga_jax import typed_config
from cavga_jax.maps import anomaly_maps
from cavga_jax.maps import feature_gaussian
from cavga_jax.maps import fitted_map

Array = jax.Array
NAME = 'feature_detector'
# A standard deviation below this (a constant channel) divides by it.
_STD_FLOOR = 1e-6

# The training fields' defaults, written once (``config.detector``).
_DEFAULTS = typed_config.DetectorSettings


@dataclasses.dataclass(frozen=True)
class DetectorSettings:
  """What the map reads and the network's shape (hashable; static in jit).

  Attributes:
    stages: encoder stages (1..4) the features come from.
    grid_divisor: the grid is image size / this many cells a side.
    aggregate: side of the neighbourhood each cell's features are averaged
      over (1: none; odd, so that it is centred on the cell).
    hidden: the discriminator's hidden width.
    seed: the initialisation key of an untrained detector.
  """
  stages: tuple[int, ...] = (1, 2)
  grid_divisor: int = feature_gaussian.GRID_DIVISOR
  aggregate: int = _DEFAULTS.aggregate
  hidden: int = _DEFAULTS.hidden
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  """How the detector trains (``config.detector``; ``detector_training``).

  Attributes:
    num_steps: training steps (0: no detector is trained).
    batch_size: feature cells per step, drawn from all training images.
    noise_std: the negatives' Gaussian noise, in standardised units.
    margin: the truncated L1 loss's margin (SimpleNet's ``dsc_margin``).
    learning_rate: the discriminator's Adam learning rate.
    adaptor_learning_rate: the adaptor's AdamW learning rate.
    weight_decay: the discriminator's L2 (torch Adam's ``weight_decay``).
    validate_every: steps between synthetic validations (0: at the end).
    checkpoint_every: steps between checkpoints.
    log_every: steps between log lines.
  """

  num_steps: int = _DEFAULTS.num_steps
  batch_size: int = _DEFAULTS.batch_size
  noise_std: float = _DEFAULTS.noise_std
  margin: float = _DEFAULTS.margin
  learning_rate: float = _DEFAULTS.learning_rate
  adaptor_learning_rate: float = _DEFAULTS.adaptor_learning_rate
  weight_decay: float = _DEFAULTS.weight_decay
  validate_every: int = _DEFAULTS.validate_every
  checkpoint_every: int = _DEFAULTS.checkpoint_every
  log_every: int = _DEFAULTS.log_every


class Discriminator(nn.Module):
  """(..., D) adapted features -> (...,) logits; higher means more normal."""
  hidden: int = 1024

  @nn.compact
  def __call__(self, adapted: Array, train: bool = False) -> Array:
    # No bias: BatchNorm removes it (its gradient is rounding noise, which
    # Adam would turn into steps of lr).
    h = nn.Dense(
        self.hidden,
        use_bias=False,
        kernel_init=nn.initializers.xavier_normal(),
        name='hidden')(
            adapted)
    h = nn.BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=1e-5, name='norm')(
            h)
    h = nn.leaky_relu(h, 0.2)
    return nn.Dense(
        1,
        use_bias=False,
        kernel_init=nn.initializers.xavier_normal(),
        name='tail')(h)[..., 0]


def init_variables(settings: DetectorSettings, dims: int) -> dict[str, Any]:
  """{'params': {'adaptor', 'discriminator'}, 'batch_stats'} of a fresh
  detector on ``dims`` channels (the adaptor the identity)."""
  variables = Discriminator(settings.hidden).init(
      jax.random.key(settings.seed), jnp.zeros((2, dims)), False)
  # No bias: a shift of all cells is removed by the BatchNorm after the
  # first layer, so its gradient would be rounding noise (see there).
  adaptor = {'kernel': jnp.eye(dims, dtype=jnp.float32)}
  return {
      'params': {'adaptor': adaptor, 'discriminator': variables['params']},
      'batch_stats': variables['batch_stats']
  }


def _adapt(params: Any, features: Array) -> Array:
  return features @ params['adaptor']['kernel']


def _discriminate(params: Any, batch_stats: Any, adapted: Array, train: bool):
  """The discriminator on adapted features; with ``train`` also the
  updated BatchNorm statistics."""
  hidden = params['discriminator']['hidden']['kernel'].shape[-1]
  return Discriminator(hidden).apply(
      {'params': params['discriminator'], 'batch_stats': batch_stats},
      adapted,
      train,
      mutable=['batch_stats'] if train else False)


def logits(variables: dict[str, Any], features: Array) -> Array:
  """D of standardised features (..., D) -> (...,), BatchNorm in inference
  mode; higher means more normal."""
  params = variables['params']
  return _discriminate(params, variables['batch_stats'],
                       _adapt(params, features), False)


def standardise(features: Array, mean: Array, std: Array) -> Array:
  return (features - mean) / std


def aggregate(features: Array, size: int) -> Array:
  """(B, g, g, D) -> each cell's mean over its ``size`` x ``size``
  neighbourhood (zero padding counted out, so edges are not darkened)."""
  if size <= 1:
    return features
  window = (1, size, size, 1)
  total = jax.lax.reduce_window(features, 0.0, jax.lax.add, window,
                                (1, 1, 1, 1), 'SAME')
  count = jax.lax.reduce_window(
      jnp.ones_like(features[..., :1]), 0.0, jax.lax.add, window, (1, 1, 1, 1),
      'SAME')
  return total / count


# ---- training -------------------------------------------------------------


def make_optimizer(train: TrainSettings) -> optax.GradientTransformation:
  """SimpleNet's: AdamW for the adaptor, Adam with L2 for the rest."""
  discriminator = optax.chain(
      optax.add_decayed_weights(train.weight_decay),
      optax.adam(train.learning_rate))
  adaptor = optax.adamw(train.adaptor_learning_rate, weight_decay=1e-2)
  return optax.multi_transform(
      {'adaptor': adaptor, 'discriminator': discriminator}, lambda params: {
          k:
              jax.tree.map(
                  lambda _, k=k: 'adaptor'
                  if k == 'adaptor' else 'discriminator',
                  v) for k, v in params.items()
      })


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DetectorState:
  """The detector's train state: a pytree Orbax checkpoints as it is.

  ``mean``/``std`` (D,) standardise the features (fixed: the normal
  training images'); ``step`` counts the updates done.
  """
  step: Array
  params: Any
  batch_stats: Any
  opt_state: Any
  mean: Array
  std: Array

  def map_state(self) -> dict[str, Any]:
    """The ``feature_detector`` map's state (what the fit saves)."""
    return {
        'params': self.params, 'batch_stats': self.batch_stats,
        'mean': self.mean, 'std': self.std
    }


def create_state(settings: DetectorSettings, train: TrainSettings,
                 mean: np.ndarray, std: np.ndarray) -> DetectorState:
  variables = init_variables(settings, len(mean))
  params = variables['params']
  return DetectorState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=variables['batch_stats'],
      opt_state=make_optimizer(train).init(params),
      mean=jnp.asarray(mean, jnp.float32),
      std=jnp.asarray(std, jnp.float32))


def loss_fn(params: Any, batch_stats: Any, features: Array, noise: Array,
            margin: float) -> tuple[Array, tuple[Any, dict[str, Array]]]:
  """SimpleNet's truncated L1 loss on (N, D) standardised features."""
  adapted = _adapt(params, features)
  both = jnp.concatenate([adapted, adapted + noise])
  scores, updates = _discriminate(params, batch_stats, both, True)
  true, fake = jnp.split(scores, 2)
  loss = (
      jnp.mean(jax.nn.relu(margin - true))
      + jnp.mean(jax.nn.relu(fake + margin)))
  metrics = dict(
      loss=loss,
      p_true=jnp.mean((true >= margin).astype(jnp.float32)),
      p_fake=jnp.mean((fake < -margin).astype(jnp.float32)))
  return loss, (updates['batch_stats'], metrics)


def make_train_step(train: TrainSettings):
  """``step(state, features (N, D) raw, rng) -> (state, metrics)``, pure.

  The noise key is ``fold_in(rng, state.step)``: a resumed run draws the
  same noise as an uninterrupted one.
  """
  tx = make_optimizer(train)

  def step(state: DetectorState, features: Array, rng: Array):
    x = standardise(features.astype(jnp.float32), state.mean, state.std)
    key = jax.random.fold_in(rng, state.step)
    noise = train.noise_std * jax.random.normal(key, x.shape, x.dtype)
    grads, (batch_stats, metrics) = jax.grad(
        loss_fn, has_aux=True)(state.params, state.batch_stats, x, noise,
                               train.margin)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = nonfinite.tree_all_finite(grads)
    metrics['nonfinite'] = 1.0 - finite.astype(jnp.float32)
    return dataclasses.replace(
        state,
        step=state.step + 1,
        params=params,
        batch_stats=batch_stats,
        opt_state=opt_state), metrics

  return step


# ---- the map --------------------------------------------------------------


class ChannelMoments:
  """Per-channel mean and std of (B, g, g, D) features, in batches (float64).

  The map's accumulator: an untrained detector (no ``train.py`` run) is
  fitted with these statistics and its initial network.
  """

  def __init__(self):
    self._count, self._sum, self._squares = 0, 0.0, 0.0

  def add(self, features: np.ndarray) -> None:
    f = np.asarray(features, np.float64).reshape(-1, features.shape[-1])
    self._count += len(f)
    self._sum = self._sum + f.sum(axis=0)
    self._squares = self._squares + np.square(f).sum(axis=0)

  def statistics(self) -> tuple[np.ndarray, np.ndarray]:
    if not self._count:
      raise ValueError('no normal images were added for the detector')
    mean = self._sum / self._count
    var = np.maximum(self._squares / self._count - np.square(mean), 0.0)
    return (mean.astype(np.float32), np.maximum(np.sqrt(var),
                                                _STD_FLOOR).astype(np.float32))


def _inputs(context: fitted_map.Context, settings: DetectorSettings,
            batch: dict[str, Any]) -> Array:
  """The batch's aggregated features (B, g, g, D), all channels."""
  widths = [context.encoder_widths[s - 1] for s in settings.stages]
  features = feature_gaussian.stack_features(
      [batch['stages'][s] for s in settings.stages], np.arange(sum(widths)),
      feature_gaussian.grid_size(context.image_size, settings.grid_divisor))
  return aggregate(features, settings.aggregate)


def _finalize(moments: ChannelMoments, settings: DetectorSettings, mesh,
              progress) -> dict[str, Any]:
  """An *untrained* detector: the normal statistics and the initial
  network. ``evaluate.py`` replaces it by the trained one when the run
  trained a detector (``detector_training.trained_state``)."""
  del mesh, progress
  mean, std = moments.statistics()
  logging.warning(
      '%s: no trained detector, its map is the initial '
      'network (train it with config.detector.num_steps > 0)', NAME)
  variables = init_variables(settings, len(mean))
  return {
      'params': variables['params'], 'batch_stats': variables['batch_stats'],
      'mean': mean, 'std': std
  }


def cell_scores(state: dict[str, Any], features: Array) -> Array:
  """(B, g, g, D) raw features -> (B, g, g): ``-D``, higher = anomalous."""
  x = standardise(features, jnp.asarray(state['mean']),
                  jnp.asarray(state['std']))
  variables = {'params': state['params'], 'batch_stats': state['batch_stats']}
  return -logits(variables, x)


def _apply(context: fitted_map.Context, settings, state: dict[str, Any],
           features: Array) -> Array:
  del settings
  return anomaly_maps.upsample_and_blur(
      cell_scores(state, features), context.image_size,
      context.map_settings.residual_sigma)


MAP = fitted_map.FittedMap(
    name=NAME,
    inputs=_inputs,
    init=lambda settings: ChannelMoments(),
    finalize=_finalize,
    apply=_apply,
    stages=lambda settings: settings.stages,
    settings=DetectorSettings(),
    image_score=anomaly_maps.max_score,
    trained=True)
