"""CAVGA losses (SPEC section 3).

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


def reconstruction_loss(images: Array, reconstructions: Array) -> Array:
  """Mean squared error over all pixels: (B, H, W, C) x2 -> ()."""
  return jnp.mean(jnp.square(images.astype(jnp.float32)
                             - reconstructions.astype(jnp.float32)))


def kl_loss(mu: Array, logvar: Array) -> Array:
  """Mean over latent elements of KL(N(mu, exp(logvar)) || N(0, I))."""
  return jnp.mean(-0.5 * (1.0 + logvar - jnp.square(mu) - jnp.exp(logvar)))


def discriminator_loss(real_logits: Array, fake_logits: Array) -> Array:
  """Non-saturating GAN loss of D: mean softplus(-D(x)) + mean softplus(D(x_hat))."""
  return (jnp.mean(jax.nn.softplus(-real_logits))
          + jnp.mean(jax.nn.softplus(fake_logits)))


def generator_adversarial_loss(fake_logits: Array) -> Array:
  """Non-saturating GAN loss of G: mean softplus(-D(x_hat))."""
  return jnp.mean(jax.nn.softplus(-fake_logits))


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
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels.astype(jnp.int32)))


def complementary_guided_attention_loss(attention_normal: Array,
                                        attention_anomalous: Array,
                                        logits: Array,
                                        labels: Array) -> Array:
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
  per_image = jnp.mean(1.0 - attention_normal.astype(dtype)
                       + attention_anomalous.astype(dtype), axis=(1, 2))
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
