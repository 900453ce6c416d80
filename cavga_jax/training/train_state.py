"""The CAVGA train state: parameters, optimizers, initialisation and restore targets.

``TrainState`` holds everything a resumed run needs (generator and
discriminator parameters, BatchNorm statistics and Optax states); ``setup``
builds the models and the jitted initialiser from typed settings, and
``abstract_state`` gives the allocation-free restore target that training,
evaluation and the learning curves share.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from cavga_jax import sharding
from cavga_jax import typed_config
from cavga_jax.models import backbones
from cavga_jax.models import cavga

Array = jax.Array
PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs; ``step`` counts completed updates."""
  step: Array
  gen_params: PyTree
  gen_batch_stats: PyTree
  gen_opt_state: PyTree
  disc_params: PyTree
  disc_batch_stats: PyTree
  disc_opt_state: PyTree
  gen_tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  disc_tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  def generator_variables(self) -> dict[str, PyTree]:
    """The generator's Flax variables: ``generator.apply``'s first argument."""
    return {'params': self.gen_params, 'batch_stats': self.gen_batch_stats}


def make_optimizer(optimizer: typed_config.OptimizerSettings,
                   num_steps: int) -> optax.GradientTransformation:
  """Adam (lr 2e-4, b1 0.5 by default) with optional warmup/cosine decay and clipping."""
  lr = optimizer.learning_rate
  warmup = optimizer.warmup_steps
  if optimizer.schedule == 'cosine':
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup,
                                                  max(num_steps, warmup + 1))
  elif warmup:
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup),
         optax.constant_schedule(lr)], [warmup])
  else:
    schedule = lr
  adam = optax.adam(schedule, b1=optimizer.b1, b2=optimizer.b2)
  clip = optimizer.grad_clip_norm
  return optax.chain(optax.clip_by_global_norm(clip), adam) if clip else adam


def create_train_state(
    generator: cavga.CAVGAGenerator,
    discriminator: backbones.Discriminator,
    rng: Array,
    image_size: int,
    channels: int = 3,
    gen_tx: optax.GradientTransformation | None = None,
    disc_tx: optax.GradientTransformation | None = None) -> TrainState:
  """Initial state: fresh random parameters, from plain arguments.

  Pure, so it runs under ``jax.jit`` and ``jax.eval_shape`` (``setup``,
  ``abstract_state``); a pretrained encoder is loaded afterwards
  (``with_pretrained_encoder``).

  Args:
    generator, discriminator: the modules (``cavga.build_models``).
    rng: initialisation key.
    image_size, channels: the input images' (S, S, C).
    gen_tx, disc_tx: their optimizers; None is the paper's Adam
      (lr 2e-4, b1 0.5, b2 0.999).
  """
  paper_adam = optax.adam(2e-4, b1=0.5, b2=0.999)
  gen_tx = gen_tx or paper_adam
  disc_tx = disc_tx or paper_adam
  dummy = jnp.zeros((1, image_size, image_size, channels), jnp.float32)
  gen_key, sample_key, disc_key = jax.random.split(rng, 3)
  gen_vars = generator.init({'params': gen_key}, dummy, sample_key, train=False)
  disc_vars = discriminator.init(disc_key, dummy, train=False)
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      gen_params=gen_vars['params'],
      gen_batch_stats=gen_vars['batch_stats'],
      gen_opt_state=gen_tx.init(gen_vars['params']),
      disc_params=disc_vars['params'],
      disc_batch_stats=disc_vars['batch_stats'],
      disc_opt_state=disc_tx.init(disc_vars['params']),
      gen_tx=gen_tx,
      disc_tx=disc_tx)


def run_keys(seed: int) -> tuple[Array, Array]:
  """(initialisation key, step key) of a run with ``config.seed = seed``."""
  init_key, step_key = jax.random.split(jax.random.key(seed))
  return init_key, step_key


def initial_state(seed: int, pretrained: str, init_fn: Callable[[Array],
                                                                TrainState],
                  state_sharding: jax.sharding.Sharding) -> TrainState:
  """The state a fresh training run starts from.

  ``init_fn`` (``setup``) with the initialisation key of ``seed``
  (``config.seed``), then the ImageNet encoder of ``pretrained``
  (``config.model.pretrained``) if set: what ``train_lib.train`` trains and
  ``evaluate.py --untrained`` evaluates.
  """
  state = init_fn(run_keys(seed)[0])
  path = pretrained
  if path:
    state = with_pretrained_encoder(state, path, state_sharding)
  return state


def with_pretrained_encoder(
    state: TrainState, path: str,
    state_sharding: jax.sharding.Sharding) -> TrainState:
  """``state`` with the generator's encoder from a converted ImageNet .npz.

  Runs eagerly on an initialised state (it reads a file, so it cannot run
  under jit or eval_shape).

  Args:
    state: a CAVGA-R state from ``setup``'s ``init_fn``.
    path: ``config.model.pretrained``, written by
      ``scripts/convert_torchvision_resnet18.py``.
    state_sharding: the state's sharding (``setup``); the new arrays are
      placed with it.

  Returns:
    The state with ``gen_params['encoder']`` and
    ``gen_batch_stats['encoder']`` from the file and the generator's optimizer
    state initialised from the new parameters; everything else is ``state``'s.

  Raises:
    cavga_jax.errors.DataError: the file is missing or does not fit the
      generator (``pretrained.load_pretrained_encoder``).
  """
  from cavga_jax.weights import pretrained  # pylint: disable=g-import-not-at-top
  gen_vars = pretrained.load_pretrained_encoder(state.generator_variables(),
                                                path)
  # Adam's zeros do not depend on the parameter values, but an optimizer whose
  # state does (or a later change of make_optimizer) must see the new ones.
  gen_opt_state = jax.jit(
      state.gen_tx.init, out_shardings=state_sharding)(
          gen_vars['params'])
  return state.replace(
      gen_params=gen_vars['params'],
      gen_batch_stats=gen_vars['batch_stats'],
      gen_opt_state=gen_opt_state)


def images_to_float(images: Array) -> Array:
  """Images (B, H, W, C) -> float32 in [-1, 1], by dtype (at trace time).

  uint8 images (the data pipeline's) are rescaled from [0, 255]; floating
  images are taken as already in [-1, 1] (the models' input range) and only
  cast. Any other dtype is ambiguous and raises, instead of a silent misread.

  Raises:
    TypeError: images neither uint8 nor floating point.
  """
  dtype = jnp.dtype(images.dtype)
  if dtype == jnp.uint8:
    return images.astype(jnp.float32) / 127.5 - 1.0
  if jnp.issubdtype(dtype, jnp.floating):
    return images.astype(jnp.float32)
  raise TypeError(
      f'images must be uint8 in [0, 255] or floating point in [-1, 1], got '
      f'{dtype}')


def setup(run: typed_config.RunSettings, mesh: jax.sharding.Mesh):
  """Models, the jitted state initialiser, and the replicated state sharding."""
  generator, discriminator = cavga.build_models(run.model, run.data.image_size,
                                                run.data.channels)
  num_steps = run.train.num_steps
  init_fn = functools.partial(
      create_train_state,
      generator,
      discriminator,
      image_size=run.data.image_size,
      channels=run.data.channels,
      gen_tx=make_optimizer(run.optimizer, num_steps),
      disc_tx=make_optimizer(run.optimizer, num_steps))
  state_sharding = sharding.replicated(mesh)
  init_fn = jax.jit(init_fn, out_shardings=state_sharding)
  return generator, discriminator, init_fn, state_sharding


def abstract_state(init_fn: Callable[[Array], TrainState],
                   mesh: jax.sharding.Mesh) -> TrainState:
  """Shapes, dtypes and replicated shardings of ``init_fn``'s state.

  A restore target for ``checkpointing`` that allocates nothing.
  """
  replicated = sharding.replicated(mesh)
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
      jax.eval_shape(init_fn, jax.random.key(0)))
