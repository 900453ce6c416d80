"""The phase-decomposed convolutions equal the direct ones, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cavga_jax import layers


def _direct_conv(x, kernel, strides, padding):
  return jax.lax.conv_general_dilated(
      x, kernel, (strides, strides), ((padding, padding),) * 2,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      precision=jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize('kernel_size,padding,size', [
    (4, 1, 16), (4, 1, 2), (3, 1, 16), (3, 1, 15), (7, 3, 32), (7, 3, 31),
    (1, 0, 16), (1, 0, 15)])
def test_strided_conv_and_its_gradients(kernel_size, padding, size):
  rng = np.random.default_rng(kernel_size * 100 + size)
  x = jnp.asarray(rng.normal(size=(2, size, size, 3)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(kernel_size, kernel_size, 3, 5)),
                       jnp.float32)
  with jax.default_matmul_precision('highest'):
    expected, expected_vjp = jax.vjp(
        lambda a, b: _direct_conv(a, b, 2, padding), x, kernel)
    actual, actual_vjp = jax.vjp(
        lambda a, b: layers.conv_stride2(a, b, padding), x, kernel)
    cotangent = jnp.asarray(rng.normal(size=expected.shape), jnp.float32)
    for e, a in zip(expected_vjp(cotangent), actual_vjp(cotangent)):
      np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-4)


def _torch_conv_transpose(x, weight):
  """PyTorch ConvTranspose2d(k=4, s=2, p=1) by its definition, in numpy."""
  b, h, w, _ = x.shape
  out = np.zeros((b, 2 * h + 2, 2 * w + 2, weight.shape[-1]))
  for i in range(h):
    for j in range(w):
      for ky in range(4):
        for kx in range(4):
          out[:, 2 * i + ky, 2 * j + kx] += x[:, i, j] @ weight[ky, kx]
  return out[:, 1:2 * h + 1, 1:2 * w + 1]


def test_conv_transpose_matches_pytorch_definition():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 6, 3))
  kernel = rng.normal(size=(4, 4, 3, 4))
  layer = layers.ConvTranspose4x4(4)
  with jax.default_matmul_precision('highest'):
    actual = layer.apply({'params': {'kernel': jnp.asarray(kernel,
                                                           jnp.float32)}},
                         jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(actual, _torch_conv_transpose(x, kernel),
                             rtol=1e-5, atol=1e-5)


def test_conv_layer_second_order_gradient():
  # L_ae differentiates through an input gradient: grad-of-grad must work.
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(1, 8, 8, 2)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(4, 4, 2, 3)), jnp.float32)

  def loss(fn, k):
    gx = jax.grad(lambda a: jnp.sum(jnp.tanh(fn(a, k))))(x)
    return jnp.sum(gx ** 2)

  with jax.default_matmul_precision('highest'):
    expected = jax.grad(lambda k: loss(
        lambda a, b: _direct_conv(a, b, 2, 1), k))(kernel)
    actual = jax.grad(lambda k: loss(
        lambda a, b: layers.conv_stride2(a, b, 1), k))(kernel)
  np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('size', [(1, 1), (5, 6), (8, 8)])
def test_upsample_conv3x3_equals_conv_of_upsampled(size):
  rng = np.random.default_rng(size[0])
  x = jnp.asarray(rng.normal(size=(2, *size, 3)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)
  up = lambda t: jnp.repeat(jnp.repeat(t, 2, axis=1), 2, axis=2)
  with jax.default_matmul_precision('highest'):
    expected, expected_vjp = jax.vjp(
        lambda a, b: _direct_conv(up(a), b, 1, 1), x, kernel)
    actual, actual_vjp = jax.vjp(layers.upsample_conv3x3, x, kernel)
    cotangent = jnp.asarray(rng.normal(size=expected.shape), jnp.float32)
    for e, a in zip(expected_vjp(cotangent), actual_vjp(cotangent)):
      np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-4)
  assert actual.shape == (2, 2 * size[0], 2 * size[1], 4)
  np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-4)
