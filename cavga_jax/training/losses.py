"""CAVGA losses (docs/protocol.md section 3).

Each returns a float32 scalar (L_cga keeps float64 for float64 maps).
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import optax

Array = jax.Array

# Class indices of the CAVGA_w classifier (= models.NORMAL, models.ANOMALOUS;
# repeated here so losses stay free of model imports).
_NORMAL, _ANOMALOUS = 0, 1


def _mean_over_examples(per_element: Array, weights: Array | None) -> Array:
  """Mean of (B, ...) values; with (B,) ``weights``, their weighted mean of
  per-example means (0 when every weight is 0)."""
  if weights is None:
    return jnp.mean(per_element)
  per_example = jnp.mean(per_element.reshape(per_element.shape[0], -1), axis=1)
  weights = weights.astype(per_example.dtype)
  return jnp.sum(weights * per_example) / jnp.maximum(jnp.sum(weights), 1.0)


def reconstruction_loss(images: Array,
                        reconstructions: Array,
                        weights: Array | None = None) -> Array:
  """Mean squared error over all pixels: (B, H, W, C) x2 -> ().

  ``weights`` (B,) weighs each image's mean (synthetic anomalies get 0 under
  ``reconstruction='normal_only'``); None is the plain mean.
  """
  return _mean_over_examples(
      jnp.square(
          images.astype(jnp.float32) - reconstructions.astype(jnp.float32)),
      weights)


def kl_loss(mu: Array, logvar: Array, weights: Array | None = None) -> Array:
  """Mean over latent elements of KL(N(mu, exp(logvar)) || N(0, I))."""
  return _mean_over_examples(
      -0.5 * (1.0 + logvar - jnp.square(mu) - jnp.exp(logvar)), weights)


def discriminator_loss(real_logits: Array,
                       fake_logits: Array,
                       fake_weights: Array | None = None) -> Array:
  """Non-saturating GAN loss of D: mean softplus(-D(x)) + mean softplus(D(x_hat))."""
  return (jnp.mean(jax.nn.softplus(-real_logits))
          + _mean_over_examples(jax.nn.softplus(fake_logits), fake_weights))


def generator_adversarial_loss(fake_logits: Array,
                               weights: Array | None = None) -> Array:
  """Non-saturating GAN loss of G: mean softplus(-D(x_hat))."""
  return _mean_over_examples(jax.nn.softplus(-fake_logits), weights)


def mask_dice_loss(anomaly_maps: Array,
                   masks: Array,
                   weights: Array,
                   smooth: float = 1.0) -> Array:
  """Dice loss of maps against exact masks, mean over weighted images.

  ``1 - (2 sum(M m) + s) / (sum(M) + sum(m) + s)`` per image: 0 for a map
  equal to its binary mask, 1 - s / (sum(m) + s) for an all-zero map (so a
  dead map cannot minimise it); s = ``smooth`` keeps an empty mask finite.

  Args:
    anomaly_maps: (B, S, S) maps in [0, 1] (A^ca at image size).
    masks: (B, S, S) in {0, 1} (``synthesis.synthesize``).
    weights: (B,) which images count (the synthetic ones).
    smooth: s.
  """
  maps = anomaly_maps.astype(jnp.float32)
  masks = masks.astype(jnp.float32)
  overlap = jnp.sum(maps * masks, axis=(1, 2))
  total = jnp.sum(maps, axis=(1, 2)) + jnp.sum(masks, axis=(1, 2))
  dice = 1.0 - (2.0 * overlap + smooth) / (total + smooth)
  return _mean_over_examples(dice, weights)


def attention_expansion_loss(attention: Array) -> Array:
  """L_ae = mean over images and positions of (1 - A); A (B, h, w)."""
  return jnp.mean(1.0 - attention)


def binary_cross_entropy_loss(logits: Array, labels: Array) -> Array:
  """L_bce of CAVGA_w's classifier, mean over the batch.

  The classifier has two logits (normal, anomalous), so the binary cross
  entropy is the softmax cross entropy over them (equal to the sigmoid BCE
  of ``logit_a - logit_n``).

  Args:
    logits: (B, 2) logits, column 0 normal, 1 anomalous.
    labels: (B,) int, 0 normal, 1 anomalous.
  """
  return jnp.mean(
      optax.softmax_cross_entropy_with_integer_labels(
          logits.astype(jnp.float32), labels.astype(jnp.int32)))


def complementary_guided_attention_loss(attention_normal: Array,
                                        attention_anomalous: Array,
                                        logits: Array, labels: Array) -> Array:
  """L_cga: ``mean_b 1(p_b = y_b = normal) * mean_ij(1 - A^cn + A^ca)``.

  Only normal images the classifier calls normal contribute; the sum is
  divided by the batch size B (the paper's "averaged over N images"), not by
  the number of qualifying images, so each image's weight does not jump with
  how many images qualify, and a batch where none qualifies gives exactly 0
  (no division by zero). The prediction ``p = argmax(logits)`` (ties go to
  normal) is a constant of the loss: gradients flow only through the maps.

  Args:
    attention_normal: A^cn (B, h, w) in [0, 1].
    attention_anomalous: A^ca (B, h, w) in [0, 1].
    logits: (B, 2) classifier logits (column 0 normal, 1 anomalous).
    labels: (B,) int, 0 normal, 1 anomalous.
  """
  predictions = jnp.argmax(jax.lax.stop_gradient(logits), axis=-1)
  qualifies = (predictions == _NORMAL) & (labels == _NORMAL)
  # Low-precision maps are upcast; float64 stays float64.
  dtype = jnp.promote_types(attention_normal.dtype, jnp.float32)
  per_image = jnp.mean(
      1.0 - attention_normal.astype(dtype) + attention_anomalous.astype(dtype),
      axis=(1, 2))
  return jnp.sum(jnp.where(qualifies, per_image, 0.0)) / labels.shape[0]


def weighted_total(losses: Mapping[str, Array],
                   weights: Mapping[str, float]) -> Array:
  """sum_k weights[k] * losses[k]; every loss needs a weight (0 disables it).

  Raises:
    KeyError: naming a loss term without a weight.
  """
  missing = sorted(set(losses) - set(weights))
  if missing:
    raise KeyError(f'no weight in config.loss_weights for loss terms {missing}')
  return sum(weights[name] * value for name, value in losses.items())


def objective_terms(supervision: str,
                    synthetic: bool = False) -> tuple[str, ...]:
  """The loss terms of a CAVGA objective, each needing a weight.

  CAVGA_u: rec, kl, adv, ae. CAVGA_w: rec, kl, adv, bce, cga (its L_ae is an
  optional ablation), plus the Dice term ``mask`` with synthetic anomalies.
  """
  terms = (('rec', 'kl', 'adv', 'bce', 'cga') if supervision == 'weak' else
           ('rec', 'kl', 'adv', 'ae'))
  return terms + ('mask',) if synthetic else terms


# Liu et al.'s beta-VAE objective on binary images (dSprites, MNIST):
# ``bernoulli_reconstruction_loss + beta * kl_divergence + w_ad * L_AD``.
# Unlike CAVGA's per-element means above, these are sums per image (averaged
# over the batch), the beta-VAE convention that makes beta comparable with
# the literature (Higgins et al. 2017, Burgess et al. 2018).


def bernoulli_reconstruction_per_image(images: Array, logits: Array) -> Array:
  """Sum of pixel cross entropies per image: (B, H, W, C) x2 -> (B,).

  Args:
    images: (B, H, W, C) targets in [0, 1].
    logits: (B, H, W, C) decoder logits.
  """
  per_pixel = optax.sigmoid_binary_cross_entropy(
      logits.astype(jnp.float32), images.astype(jnp.float32))
  return jnp.sum(per_pixel.reshape(per_pixel.shape[0], -1), axis=1)


def bernoulli_reconstruction_loss(images: Array, logits: Array) -> Array:
  """``bernoulli_reconstruction_per_image`` averaged over the batch."""
  return jnp.mean(bernoulli_reconstruction_per_image(images, logits))


def kl_divergence_per_image(mu: Array, logvar: Array) -> Array:
  """Sum over latent units of KL(N(mu, exp(logvar)) || N(0, I)): (B, ...) -> (B,)."""
  per_unit = -0.5 * (1.0 + logvar - jnp.square(mu) - jnp.exp(logvar))
  return jnp.sum(per_unit.reshape(per_unit.shape[0], -1), axis=1)


def kl_divergence(mu: Array, logvar: Array) -> Array:
  """``kl_divergence_per_image`` averaged over the batch."""
  return jnp.mean(kl_divergence_per_image(mu, logvar))


def attention_disentanglement_per_image(unit_maps: Array,
                                        eps: float = 1e-8) -> Array:
  """Liu et al.'s L_AD of each image: (B, U, h, w) -> (B,).

  Per image (docs/protocol.md section 3): ``sum_{i<j} 2 * sum(min(A_i, A_j)) / sum(A_i + A_j)``, a soft
  IoU of every pair of unit maps: 1 for identical maps, 0 for disjoint
  ones; ``eps`` makes a pair of all-zero maps count 0.

  Args:
    unit_maps: (B, U, h, w) non-negative maps, e.g. ``explain.unit_attention``'s
      ``units``.
  """
  batch, units = unit_maps.shape[:2]
  maps = unit_maps.reshape(batch, units, -1).astype(
      jnp.promote_types(unit_maps.dtype, jnp.float32))
  overlap = jnp.sum(jnp.minimum(maps[:, :, None], maps[:, None]), axis=-1)
  mass = jnp.sum(maps, axis=-1)
  return _sum_over_pairs(2.0 * overlap /
                         (mass[:, :, None] + mass[:, None] + eps))


def _sum_over_pairs(pair_values: Array) -> Array:
  """(B, U, U) values of unit pairs -> (B,) their sum over pairs i < j."""
  units = pair_values.shape[-1]
  upper = jnp.triu(jnp.ones((units, units), bool), k=1)
  return jnp.sum(jnp.where(upper, pair_values, 0.0), axis=(1, 2))


def attention_disentanglement_loss(unit_maps: Array,
                                   eps: float = 1e-8) -> Array:
  """``attention_disentanglement_per_image`` averaged over the batch: L_AD."""
  return jnp.mean(attention_disentanglement_per_image(unit_maps, eps))


def attention_overlap_per_image(unit_cams: Array, eps: float = 1e-6) -> Array:
  """L_AD variant 'distribution' of each image: (B, U, h, w) -> (B,).

  The paper's L_AD is a soft IoU of ReLU'd maps, and an all-zero map (the
  ReLU of a cam that is negative everywhere) overlaps nothing, so the cheapest
  way to lower it is to switch maps off (docs/results.md: 20-23 % live maps
  with L_AD against 75-82 % without). Here each unit's *raw* cam
  ``sum_c alpha_c F_c`` is normalised before any ReLU: standardised over its
  positions and turned into a distribution ``p_k = softmax(z_k)``, then
  ``sum_{i<j} sum_pos min(p_i, p_j)``, the overlap of every pair of
  distributions (1 identical, near 0 disjoint peaks). The loss is invariant
  to a cam's scale and offset, so it cannot be lowered by shrinking or
  switching off a map, and a flat cam (no spatial evidence) becomes the
  uniform distribution, which overlaps every map more than a peaked map
  elsewhere does: dead maps cost, not pay.

  Args:
    unit_cams: (B, U, h, w) raw unit cams (``explain.UnitAttention.unit_cams``).
    eps: variance floor of the standardisation (keeps flat cams finite).
  """
  batch, units = unit_cams.shape[:2]
  cams = unit_cams.reshape(batch, units, -1).astype(
      jnp.promote_types(unit_cams.dtype, jnp.float32))
  mean = jnp.mean(cams, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(cams - mean), axis=-1, keepdims=True)
  p = jax.nn.softmax((cams - mean) / jnp.sqrt(var + eps), axis=-1)
  return _sum_over_pairs(
      jnp.sum(jnp.minimum(p[:, :, None], p[:, None]), axis=-1))


AD_VARIANTS = ('paper', 'distribution')


def attention_disentanglement_variant(maps, variant: str = 'paper') -> Array:
  """The batch mean of the chosen L_AD: 'paper' (soft IoU of the unit maps,
  docs/protocol.md section 3) or 'distribution'
  (``attention_overlap_per_image``).

  Args:
    maps: an ``explain.UnitAttention`` (uses ``units`` or ``unit_cams``).
    variant: one of ``AD_VARIANTS``.

  Raises:
    ValueError: unknown variant.
  """
  if variant == 'paper':
    return attention_disentanglement_loss(maps.units)
  if variant == 'distribution':
    return jnp.mean(attention_overlap_per_image(maps.unit_cams))
  raise ValueError(f'loss.ad_variant must be one of {AD_VARIANTS}, got '
                   f'{variant!r}')


def live_unit_share(unit_maps: Array) -> Array:
  """Share of (image, unit) maps that are not all zero: (B, U, h, w) -> ()."""
  return jnp.mean((jnp.max(unit_maps, axis=(-2, -1)) > 0).astype(jnp.float32))
