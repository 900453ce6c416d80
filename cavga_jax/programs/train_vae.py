"""Training and evaluation of the Liu et al. VAE experiments (``config.task='vae'``).

Two uses of the per-unit attention maps of ``cavga_jax.vae.explain``:

* **Disentanglement** (``config.data.name`` 'rendered_sprites' or
  'dsprites'): a beta-VAE, optionally with the attention disentanglement
  loss, ``L = rec + beta * kl + w_ad * L_AD`` (``config.loss_weights.beta``,
  ``.ad``), scored by the FactorVAE metric and MIG on the ground-truth
  factors (``cavga_jax.vae.disentanglement``).
* **One-class localization** ('mnist', 'fashion_mnist'): a VAE trained on
  the images of ``config.data.normal_class``; evaluation explains the test
  images of ``config.eval.explain_class`` (Liu et al.: train on 1, explain
  7s). The anomaly map is the attention map itself (``config.eval.map``:
  'mean' of the unit maps, Liu et al.'s, or 'sum', the map of sum(mu)),
  where CAVGA uses ``1 - A``. There are no defect masks, so we score the maps
  against a *pseudo-mask* of our own: the strokes of the test digit (pixel
  >= 0.5) that lie where the normal class's mean training image is below
  ``config.eval.pseudo_mask_support`` (0.05), i.e. strokes the normal class
  never draws (the bar of a 7 for normal 1s). Image scores are the negative
  ELBO (Bernoulli rec + KL) of ``z = mu``.
* **Localization on MVTec-layout folders** ('generated', 'mvtec'): the same
  VAE trained on the normal training images, its attention map scored
  against the real defect masks with the protocol of docs/protocol.md
  section 4, which puts Liu et al.'s method next to CAVGA on the same data. Colour images are
  Bernoulli "likelihood" targets in [0, 1] too (the cross entropy of
  continuous targets, as common VAE code does).

The train step is one jitted, donated program (like ``cavga_step``'s); the
data order and the noise are functions of ``(seed, step)``, so an
interrupted run resumes to the same parameters.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from cavga_jax import config_checks
from cavga_jax import data
from cavga_jax import nonfinite
from cavga_jax import sharding
from cavga_jax import typed_config
from cavga_jax import workdirs
from cavga_jax.data import factor_dataset
from cavga_jax.data import sprite_renderer
from cavga_jax.data import sprites
from cavga_jax.errors import CavgaError
from cavga_jax.models import cavga
from cavga_jax.models import layers
from cavga_jax.programs import runtime
from cavga_jax.training import losses
from cavga_jax.training import train_state
from cavga_jax.training import training_loop
from cavga_jax.vae import conv_vae
from cavga_jax.vae import explain

Array = jax.Array
PyTree = Any


@flax.struct.dataclass
class VAEState:
  """A resumable VAE run; ``step`` counts completed updates."""
  step: Array
  params: PyTree
  opt_state: PyTree
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)


def create_state(run: typed_config.VaeRunSettings, model: conv_vae.ConvVAE,
                 rng: Array) -> VAEState:
  size, channels = run.data.image_size, run.data.channels
  params = model.init(rng, jnp.zeros((1, size, size, channels)))['params']
  tx = train_state.make_optimizer(run.optimizer, run.train.num_steps)
  return VAEState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      tx=tx)


def images_to_unit(images: Array) -> Array:
  """uint8 (B, H, W, C) -> float32 in [0, 1] (Bernoulli targets)."""
  return images.astype(jnp.float32) / 255.0


def loss_terms(model: conv_vae.ConvVAE,
               params: PyTree,
               x: Array,
               rng: Array,
               with_attention_grad: bool,
               ad_variant: str = 'paper') -> dict[str, Array]:
  """rec, kl and ad (L_AD) of one batch, per-batch scalars.

  Also 'nonzero_unit_maps', the batch's share of live (not all-zero) unit
  maps, which tells a disentangled batch from one whose maps were switched
  off (the paper's L_AD is 0 for both).

  Args:
    model: the VAE.
    params: its parameters.
    x: (B, S, S, C) in [0, 1].
    rng: key for sampling z.
    with_attention_grad: whether L_AD is differentiated (it is always
      computed, for logging; without its weight the second-order pass is
      skipped).
    ad_variant: ``losses.AD_VARIANTS`` ('paper' or 'distribution').
  """
  variables = {'params': params}
  maps, outputs = explain.explain(model, variables, x)
  if not with_attention_grad:
    maps = jax.lax.stop_gradient(maps)
  mu, logvar = outputs['mu'], outputs['logvar']
  logits = model.apply(
      variables, cavga.reparameterize(rng, mu, logvar), method='decode')
  return dict(
      rec=losses.bernoulli_reconstruction_loss(x, logits),
      kl=losses.kl_divergence(mu, logvar),
      ad=losses.attention_disentanglement_variant(maps, ad_variant),
      nonzero_unit_maps=losses.live_unit_share(maps.units))


def make_train_step(
    model: conv_vae.ConvVAE,
    beta: float,
    ad_weight: float,
    nonfinite_mode: str = 'stop',
    ad_variant: str = 'paper'
) -> Callable[[VAEState, Array, Array], tuple[VAEState, dict[str, Array]]]:
  """``train_step(state, images, rng) -> (state, metrics)``.

  ``images`` uint8 (B, S, S, C); ``rng`` is the run's key, folded with the
  step. Minimises ``rec + beta * kl + ad_weight * L_AD`` (L_AD of
  ``ad_variant``); metrics hold the three terms (unweighted), the share of
  live unit maps 'nonzero_unit_maps', the total 'loss' and 'nonfinite'
  (1.0 when the loss or a gradient is NaN or infinite). With
  ``nonfinite_mode='skip'`` such a step keeps the state
  (``nonfinite.keep_state_unless_finite``).
  """
  nonfinite.check_mode(nonfinite_mode)

  def train_step(state: VAEState, images: Array, rng: Array):
    rng = jax.random.fold_in(rng, state.step)
    x = images_to_unit(images)

    def loss_fn(params):
      terms = loss_terms(model, params, x, rng, bool(ad_weight), ad_variant)
      total = terms['rec'] + beta * terms['kl'] + ad_weight * terms['ad']
      return total, terms

    (loss, terms), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(
            state.params)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        opt_state=opt_state)
    finite = nonfinite.tree_all_finite((loss, grads))
    if nonfinite_mode == 'skip':
      new_state = nonfinite.keep_state_unless_finite(finite, new_state, state)
    return new_state, dict(
        terms, loss=loss, nonfinite=1.0 - finite.astype(jnp.float32))

  return train_step


class TrainingData:
  """What training and evaluation read: an image getter and its size."""

  def __init__(self, run: typed_config.VaeRunSettings, workdir: str):
    data_settings = run.data
    name = data_settings.name
    self.factors: factor_dataset.FactorDataset | None = None
    self.test: data.AnomalyDataset | None = None
    if name in sprites.SPRITES_DATASETS:
      if data_settings.image_size != sprite_renderer.IMAGE_SIZE:
        raise CavgaError(f'config.data.image_size must be '
                         f'{sprite_renderer.IMAGE_SIZE} for {name}, got '
                         f'{data_settings.image_size}')
      self.factors = sprites.load_sprites(
          name,
          data_settings.root or None,
          data_settings.download,
          scales=data_settings.scales,
          orientations=data_settings.orientations,
          positions=data_settings.positions)
      self.num_examples = self.factors.num_examples
      self.images = self.factors.images
    elif name in conv_vae.ONE_CLASS_DATASETS + conv_vae.FOLDER_DATASETS:
      train_ds, self.test = data.get_datasets(data_settings, workdir, run.seed)
      self.num_examples = train_ds.num_examples
      self.images = lambda idx: train_ds.images[idx]
      self.normal_mean = train_ds.images.mean(axis=(0, 3)) / 255.0
    else:
      raise CavgaError(
          f"config.data.name={name!r} is not a dataset of config.task='vae' "
          f'(known: {", ".join(conv_vae.DATASETS)})')


def setup(run: typed_config.VaeRunSettings, mesh: jax.sharding.Mesh):
  """The VAE, the jitted state initialiser and the replicated sharding."""
  model = conv_vae.build_vae(run.model, run.data.image_size, run.data.channels)
  state_sharding = sharding.replicated(mesh)
  init_fn = jax.jit(
      functools.partial(create_state, run, model), out_shardings=state_sharding)
  return model, init_fn, state_sharding


def train(config: ml_collections.ConfigDict,
          workdir: str,
          overwrite: bool = False) -> VAEState:
  """Trains the VAE as configured, resuming from ``<workdir>/checkpoints``.

  ``overwrite`` starts over in a workdir of another run
  (``runtime.prepare_run``).

  The loop is ``training_loop.training_loop``'s: JSONL metrics in
  ``<workdir>/train_metrics.jsonl``, Orbax checkpoints with retention, the
  non-finite policy of ``config.train.nonfinite``. The run holds
  ``<workdir>/.lock`` as ``train.py``'s CAVGA runs do (``workdirs.lock``).
  """
  # Before the lock creates the workdir.
  run = config_checks.check_config(config)
  with workdirs.lock(workdir, 'train.py'):
    mesh = runtime.prepare_run(config, workdir, overwrite)
    return _train(run, workdir, mesh)


def _train(run: typed_config.VaeRunSettings, workdir: str,
           mesh: jax.sharding.Mesh) -> VAEState:
  """``train`` with the workdir locked and prepared."""
  loop_settings = training_loop.LoopSettings.from_settings(run.seed, run.train)
  training_data = TrainingData(run, workdir)
  model, init_fn, state_sharding = setup(run, mesh)
  init_rng, step_rng = jax.random.split(jax.random.key(run.seed))
  weights = run.loss_weights
  ad_variant = run.loss.ad_variant
  train_step = jax.jit(
      make_train_step(model, weights['beta'], weights['ad'],
                      loop_settings.nonfinite, ad_variant),
      donate_argnums=0,
      out_shardings=(state_sharding, sharding.replicated(mesh)),
      compiler_options=layers.compiler_options(model.conv_impl))
  host_slice = sharding.host_batch_slice(loop_settings.batch_size)
  description = (f'a beta-VAE (beta {weights["beta"]:g}, L_AD ({ad_variant}) '
                 f'weight {weights["ad"]:g}, latent {run.model.latent_dim}) on '
                 f'{run.data.name} ({training_data.num_examples} images)')
  return training_loop.training_loop(
      loop_settings, workdir, init_fn(init_rng), train_step,
      training_data.num_examples, lambda idx: sharding.shard_batch(
          training_data.images(idx[host_slice]), mesh), step_rng, ('loss',),
      description)
