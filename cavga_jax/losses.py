"""CAVGA losses (SPEC section 3). Each returns a float32 scalar."""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

Array = jax.Array


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
