"""Loss values on hand-computed cases (docs/protocol.md section 3)."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from cavga_jax.training import losses


def test_reconstruction_loss():
  x = jnp.zeros((1, 2, 2, 1))
  x_hat = jnp.array([1.0, -1.0, 2.0, 0.0]).reshape(1, 2, 2, 1)
  assert losses.reconstruction_loss(x, x_hat) == pytest.approx((1 + 1 + 4) / 4)


def test_kl_loss():
  # KL(N(mu, s^2) || N(0, 1)) = 0.5 * (mu^2 + s^2 - 1 - log s^2) per element.
  mu = jnp.array([[0.0, 1.0], [2.0, 0.0]])
  logvar = jnp.array([[0.0, 0.0], [0.0, math.log(4.0)]])
  expected = np.mean([0.0, 0.5, 2.0, 0.5 * (4 - 1 - math.log(4.0))])
  assert losses.kl_loss(mu, logvar) == pytest.approx(expected, rel=1e-6)


def test_gan_losses():
  zeros = jnp.zeros((2, 3, 3))
  assert losses.discriminator_loss(zeros, zeros) == pytest.approx(
      2 * math.log(2), rel=1e-6)
  assert losses.generator_adversarial_loss(zeros) == pytest.approx(
      math.log(2), rel=1e-6)
  # A confident, correct discriminator has a small loss; G's loss is large.
  real, fake = jnp.full((2,), 10.0), jnp.full((2,), -10.0)
  assert losses.discriminator_loss(real, fake) < 1e-4
  assert losses.generator_adversarial_loss(fake) == pytest.approx(
      10.0, rel=1e-4)


def test_attention_expansion_loss():
  attention = jnp.array([[[1.0, 0.5], [0.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]]])
  assert losses.attention_expansion_loss(attention) == pytest.approx(1.5 / 8)


def test_weighted_total():
  terms = dict(rec=jnp.array(2.0), ae=jnp.array(4.0))
  assert losses.weighted_total(terms, dict(rec=1.0, ae=0.01, kl=3.0)) == (
      pytest.approx(2.04))
  with pytest.raises(KeyError, match='ae'):
    losses.weighted_total(terms, dict(rec=1.0))
