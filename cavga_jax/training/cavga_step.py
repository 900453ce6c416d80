"""The jitted CAVGA train step and the assembly of its loss terms.

One step (docs/protocol.md section 3) runs, inside a single jitted and
donated program:

1. the generator forward pass with Grad-CAM attention (``jax.vjp`` over the
   generator parameters, so it is computed once and reused for the update);
2. the discriminator update on real ``x`` vs the (stopped) reconstruction;
3. the generator update through the *updated* discriminator: the gradient of
   the weighted loss with respect to the forward outputs is pulled back
   through the generator VJP of step 1.

The discriminator's BatchNorm statistics are updated by its own step only;
the forward pass of ``D`` inside the generator loss uses batch statistics
but its running-average update is discarded.

CAVGA_w (``config.model.supervision == 'weak'``; the generator has the
classifier) uses the same step with labelled batches ``(images, labels)`` and
the objective ``rec + kl + adv + bce + cga`` (``weak_generator_loss_terms``);
its training set is the normal images plus the few labelled anomalies of
``cavga_jax.data.weak``.

With ``nonfinite='skip'`` a step whose losses or gradients are not finite
keeps the previous state (``cavga_jax.nonfinite``).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from cavga_jax import nonfinite
from cavga_jax import typed_config
from cavga_jax.models import attention
from cavga_jax.models import backbones
from cavga_jax.models import cavga
from cavga_jax.training import losses
from cavga_jax.training import synthesis
from cavga_jax.training import train_state

Array = jax.Array

# fold_in tag of the synthetic-anomaly key (the step key itself samples z).
SYNTHESIS_STREAM = 1


def _vae_gan_terms(outputs: dict[str, Array],
                   images: Array,
                   fake_logits: Array,
                   weights: Array | None = None) -> dict[str, Array]:
  """rec, kl and adv: the terms CAVGA_u and CAVGA_w share.

  ``weights`` (B,) weighs each image (None: all count equally).
  """
  return dict(
      rec=losses.reconstruction_loss(images, outputs['reconstruction'],
                                     weights),
      kl=losses.kl_loss(outputs['mu'], outputs['logvar'], weights),
      adv=losses.generator_adversarial_loss(fake_logits, weights))


def generator_loss_terms(outputs: dict[str, Array], images: Array,
                         fake_logits: Array) -> dict[str, Array]:
  """CAVGA_u loss terms: rec, kl, adv, ae (weights in ``config.loss_weights``)."""
  return dict(
      _vae_gan_terms(outputs, images, fake_logits),
      ae=losses.attention_expansion_loss(outputs['attention']))


def weak_generator_loss_terms(
    outputs: dict[str, Array],
    images: Array,
    fake_logits: Array,
    labels: Array,
    include_ae: bool = False,
    masks: Array | None = None,
    vae_weights: Array | None = None) -> dict[str, Array]:
  """CAVGA_w loss terms: rec, kl, adv, bce, cga (and ae when ``include_ae``).

  The paper's CAVGA_w objective has no L_ae; ``include_ae`` adds it as an
  ablation (the train step sets it when ``loss_weights['ae']`` is nonzero).
  With synthetic anomalies (``masks`` given) the term ``mask`` is the Dice
  loss of A^ca (resized to image size) against the exact masks of the
  synthetic images (``labels`` 1 and a non-empty mask).

  Args:
    outputs: ``attention.forward_with_attention`` outputs of a generator with
      a classifier ('logits' (B, 2), 'class_attention' (B, 2, h, w), ...).
    images: (B, H, W, C) float in [-1, 1].
    fake_logits: discriminator logits of the reconstructions.
    labels: (B,) int, 0 normal, 1 anomalous.
    include_ae: also return L_ae of CAVGA_u's map.
    masks: (B, H, W) synthetic-anomaly masks (``synthesis.synthesize``).
    vae_weights: (B,) weights of rec, kl and adv (None: every image).
  """
  class_attention = outputs['class_attention']
  terms = dict(
      _vae_gan_terms(outputs, images, fake_logits, vae_weights),
      bce=losses.binary_cross_entropy_loss(outputs['logits'], labels),
      cga=losses.complementary_guided_attention_loss(
          class_attention[:, cavga.NORMAL], class_attention[:, cavga.ANOMALOUS],
          outputs['logits'], labels))
  if include_ae:
    terms['ae'] = losses.attention_expansion_loss(outputs['attention'])
  if masks is not None:
    anomalous_map = attention.resize_map(class_attention[:, cavga.ANOMALOUS],
                                         images.shape[1])
    terms['mask'] = losses.mask_dice_loss(anomalous_map, masks,
                                          jnp.any(masks > 0, axis=(1, 2)))
  return terms


def make_train_step(
    generator: cavga.CAVGAGenerator,
    discriminator: backbones.Discriminator,
    loss_weights: dict[str, float],
    nonfinite_mode: str = 'stop',
    synthetic: typed_config.SynthesisSettings | None = None,
) -> Callable[..., tuple[train_state.TrainState, dict[str, Array]]]:
  """Returns the pure, jittable CAVGA train step.

  ``train_step(state, images, rng, labels=None) -> (state, metrics)``:
  ``images`` is a uint8 batch (B, H, W, C) (or float in [-1, 1], see
  ``train_state.images_to_float``); ``rng`` is the run's base key,
  folded with ``state.step`` so a resumed run draws the same noise.
  ``labels`` (B,) int (0 normal, 1 anomalous) is required when the generator
  has the CAVGA_w classifier and ignored otherwise. ``metrics`` holds every
  loss term (unweighted), the generator total ``g_loss`` and the
  discriminator loss ``d_loss``, and ``nonfinite``, 1.0 when a loss or a
  gradient of the step is NaN or infinite (else 0.0); CAVGA_w adds
  ``cls_accuracy``, the classifier's batch accuracy, and
  ``anomalous_fraction``, the batch's fraction of labelled anomalies
  (float32 scalars).

  With ``nonfinite_mode='skip'`` a flagged step returns the input state with only
  ``step`` incremented (selected with ``jnp.where`` inside the program);
  with ``'stop'`` the update is applied as computed and the caller stops.

  ``synthetic`` (CAVGA_w only) makes the first images of every batch
  synthetic anomalies inside the step (``synthesis.synthesize``, keyed by the
  step's key, so resuming is bit-identical), labels them anomalous and adds
  the ``mask`` loss term; the discriminator's real images are the clean
  ones, and ``synthetic.reconstruction`` says whether the VAE terms target
  the clean images ('clean') or skip the synthetic ones ('normal_only').
  """
  nonfinite.check_mode(nonfinite_mode)
  weak = generator.with_classifier
  if synthetic is not None and not weak:
    raise ValueError('synthetic anomalies need the CAVGA_w classifier '
                     "(model.supervision='weak')")
  include_ae = bool(loss_weights.get('ae', 0.0))

  def train_step(state: train_state.TrainState,
                 images: Array,
                 rng: Array,
                 labels: Array | None = None):
    if weak and labels is None:
      raise ValueError('CAVGA_w train step needs the batch labels')
    rng = jax.random.fold_in(rng, state.step)
    clean = train_state.images_to_float(images)
    x, masks, vae_weights = clean, None, None
    if synthetic is not None:
      x, masks, is_synthetic = synthesis.synthesize(
          jax.random.fold_in(rng, SYNTHESIS_STREAM), clean, synthetic)
      labels = jnp.where(is_synthetic, cavga.ANOMALOUS, labels)
      if synthetic.reconstruction == 'normal_only':
        vae_weights = 1.0 - is_synthetic.astype(jnp.float32)

    def gen_forward(params):
      return attention.forward_with_attention(
          generator, params, state.gen_batch_stats, x, rng, train=True)

    outputs, gen_vjp, gen_batch_stats = jax.vjp(
        gen_forward, state.gen_params, has_aux=True)

    def disc_apply(params, batch_stats, inputs):
      logits, updates = discriminator.apply(
          {'params': params, 'batch_stats': batch_stats},
          inputs,
          True,
          mutable=['batch_stats'])
      return logits, updates['batch_stats']

    fake = jax.lax.stop_gradient(outputs['reconstruction'])

    def disc_loss_fn(params):
      real_logits, batch_stats = disc_apply(params, state.disc_batch_stats,
                                            clean)
      fake_logits, batch_stats = disc_apply(params, batch_stats, fake)
      return losses.discriminator_loss(real_logits, fake_logits,
                                       vae_weights), batch_stats

    (d_loss, disc_batch_stats), d_grads = jax.value_and_grad(
        disc_loss_fn, has_aux=True)(
            state.disc_params)
    d_updates, disc_opt_state = state.disc_tx.update(d_grads,
                                                     state.disc_opt_state,
                                                     state.disc_params)
    disc_params = optax.apply_updates(state.disc_params, d_updates)

    def gen_loss_fn(outs):
      fake_logits, _ = disc_apply(disc_params, disc_batch_stats,
                                  outs['reconstruction'])
      if weak:
        terms = weak_generator_loss_terms(outs, clean, fake_logits, labels,
                                          include_ae, masks, vae_weights)
      else:
        terms = generator_loss_terms(outs, clean, fake_logits)
      return losses.weighted_total(terms, loss_weights), terms

    (g_loss, terms), output_grads = jax.value_and_grad(
        gen_loss_fn, has_aux=True)(
            outputs)
    (g_grads,) = gen_vjp(output_grads)
    g_updates, gen_opt_state = state.gen_tx.update(g_grads, state.gen_opt_state,
                                                   state.gen_params)
    new_state = state.replace(
        step=state.step + 1,
        gen_params=optax.apply_updates(state.gen_params, g_updates),
        gen_batch_stats=gen_batch_stats,
        gen_opt_state=gen_opt_state,
        disc_params=disc_params,
        disc_batch_stats=disc_batch_stats,
        disc_opt_state=disc_opt_state)
    finite = nonfinite.tree_all_finite((g_loss, d_loss, g_grads, d_grads))
    if nonfinite_mode == 'skip':
      new_state = nonfinite.keep_state_unless_finite(finite, new_state, state)
    metrics = dict(
        terms,
        g_loss=g_loss,
        d_loss=d_loss,
        nonfinite=1.0 - finite.astype(jnp.float32))
    if weak:
      predictions = jnp.argmax(outputs['logits'], axis=-1)
      metrics['cls_accuracy'] = jnp.mean(
          (predictions == labels).astype(jnp.float32))
      # What cls_accuracy is measured on: an all-normal classifier scores
      # exactly 1 - anomalous_fraction.
      metrics['anomalous_fraction'] = jnp.mean(labels.astype(jnp.float32))
    return new_state, metrics

  return train_step
