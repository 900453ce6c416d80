"""The convolutions: phase rewrites equal the direct ones; the phase and lax paths agree."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cavga_jax import config_checks
from cavga_jax.errors import CavgaError
from cavga_jax.models import layers
from cavga_jax.programs import train as train_lib
from cavga_jax.training import cavga_step
from cavga_jax.training import train_state
from configs import default
from configs import tiny


def _direct_conv(x, kernel, strides, padding):
  return jax.lax.conv_general_dilated(
      x,
      kernel, (strides, strides), ((padding, padding),) * 2,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      precision=jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize('kernel_size,padding,size', [(4, 1, 16), (4, 1, 2),
                                                      (3, 1, 16), (3, 1, 15),
                                                      (7, 3, 32), (7, 3, 31),
                                                      (1, 0, 16), (1, 0, 15)])
def test_strided_conv_and_its_gradients(kernel_size, padding, size):
  rng = np.random.default_rng(kernel_size * 100 + size)
  x = jnp.asarray(rng.normal(size=(2, size, size, 3)), jnp.float32)
  kernel = jnp.asarray(
      rng.normal(size=(kernel_size, kernel_size, 3, 5)), jnp.float32)
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
    actual = layer.apply(
        {'params': {'kernel': jnp.asarray(kernel, jnp.float32)}},
        jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(
      actual, _torch_conv_transpose(x, kernel), rtol=1e-5, atol=1e-5)


def test_conv_layer_second_order_gradient():
  # L_ae differentiates through an input gradient: grad-of-grad must work.
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(1, 8, 8, 2)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(4, 4, 2, 3)), jnp.float32)

  def loss(fn, k):
    gx = jax.grad(lambda a: jnp.sum(jnp.tanh(fn(a, k))))(x)
    return jnp.sum(gx**2)

  with jax.default_matmul_precision('highest'):
    expected = jax.grad(
        lambda k: loss(lambda a, b: _direct_conv(a, b, 2, 1), k))(
            kernel)
    actual = jax.grad(
        lambda k: loss(lambda a, b: layers.conv_stride2(a, b, 1), k))(
            kernel)
  np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('size', [(1, 1), (5, 6), (8, 8)])
def test_upsample_conv3x3_equals_conv_of_upsampled(size):
  rng = np.random.default_rng(size[0])
  x = jnp.asarray(rng.normal(size=(2, *size, 3)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)
  up = lambda t: jnp.repeat(jnp.repeat(t, 2, axis=1), 2, axis=2)
  with jax.default_matmul_precision('highest'):
    expected, expected_vjp = jax.vjp(lambda a, b: _direct_conv(up(a), b, 1, 1),
                                     x, kernel)
    actual, actual_vjp = jax.vjp(layers.upsample_conv3x3, x, kernel)
    cotangent = jnp.asarray(rng.normal(size=expected.shape), jnp.float32)
    for e, a in zip(expected_vjp(cotangent), actual_vjp(cotangent)):
      np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-4)
  assert actual.shape == (2, 2 * size[0], 2 * size[1], 4)
  np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    'layer',
    [
        layers.Conv(5, 4, 2, 1),
        layers.Conv(5, 7, 2, 3),
        layers.Conv(5, 3, 1, 1),
        layers.ConvTranspose4x4(5),
        layers.ConvTranspose4x4(16),
        layers.UpsampleConv3x3(5)
    ],
    # 16 features = 64 phase channels: the GEMM kernel gradient (layers.py).
    ids=[
        'conv4s2', 'conv7s2', 'conv3s1', 'convt4', 'convt4_gemm_grad', 'upconv3'
    ])
def test_phase_and_lax_implementations_agree(layer):
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  variables = layer.init(jax.random.key(1), x)
  lax_layer = layer.clone(impl='lax')
  loss = lambda v, t, m: jnp.sum(jnp.sin(m.apply(v, t)))
  np.testing.assert_allclose(
      lax_layer.apply(variables, x), layer.apply(variables, x), atol=1e-5)
  grads = jax.grad(loss, (0, 1))(variables, x, layer)
  lax_grads = jax.grad(loss, (0, 1))(variables, x, lax_layer)
  for a, b in zip(jax.tree.leaves(lax_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('features', [5, 16])
def test_conv_transpose_second_order_gradient_matches_lax(features):
  layer = layers.ConvTranspose4x4(features)
  x = jax.random.normal(jax.random.key(2), (1, 5, 6, 3))
  variables = layer.init(jax.random.key(3), x)

  def loss(module, v):
    gx = jax.grad(lambda t: jnp.sum(jnp.tanh(module.apply(v, t))))(x)
    return jnp.sum(gx**2)

  with jax.default_matmul_precision('highest'):
    expected = jax.grad(lambda v: loss(layer.clone(impl='lax'), v))(variables)
    actual = jax.grad(lambda v: loss(layer, v))(variables)
  np.testing.assert_allclose(
      actual['params']['kernel'],
      expected['params']['kernel'],
      rtol=1e-4,
      atol=1e-4)


def test_resolve_conv_impl():
  assert layers.resolve_conv_impl('auto', 'cpu') == 'phase'
  assert layers.resolve_conv_impl('auto', 'gpu') == 'lax'
  assert layers.resolve_conv_impl('auto', 'tpu') == 'lax'
  assert layers.resolve_conv_impl('lax', 'cpu') == 'lax'
  with pytest.raises(ValueError, match='conv_impl'):
    layers.resolve_conv_impl('cudnn')


def test_compiler_options_take_convolutions_off_ynnpack_on_the_cpu():
  assert layers.compiler_options('lax', 'cpu') is None
  assert layers.compiler_options('auto', 'gpu') is None
  assert layers.compiler_options('phase', 'tpu') is None
  options = layers.compiler_options('auto', 'cpu')
  # Compiled only; YNNPACK takes convolutions of about this size.
  x = jax.ShapeDtypeStruct((8, 64, 64, 64), jnp.float32)
  kernel = jax.ShapeDtypeStruct((4, 4, 64, 128), jnp.float32)
  conv = lambda a, b: layers.conv_stride2(a, b, 1)
  default_hlo = jax.jit(conv).lower(x, kernel).compile().as_text()
  if '__ynn_fusion' not in default_hlo:  # an XLA:CPU without YNNPACK
    assert options is None
    return
  assert options is not None
  hlo = jax.jit(
      conv, compiler_options=options).lower(x, kernel).compile().as_text()
  assert '__ynn_fusion' not in hlo and 'convolution(' in hlo


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='XLA:CPU only')
@pytest.mark.parametrize('variant', ['D', 'R'])
def test_cpu_train_step_convolutions_take_the_eigen_form(variant):
  # XLA:CPU runs a convolution with Eigen only in the NHWC/HWIO form
  # b01f_01io->b01f; others become a naive loop. XLA's own kernel gradient
  # of the R decoder's up-sampling conv compiled to 01fb_o01i->f01b inside
  # the train step (35 s per step instead of 2.3 s at 256 px), hence
  # _conv2x2's custom VJP. Paper widths at 128 px, compiled only; windows
  # under 8 px (the last layers' kernel gradients) are cheap in any form.
  config = default.get_config()
  config.model.variant = variant
  config.data.image_size = 128
  config.model.encoder_widths = config.model.decoder_widths = ()
  config.model.discriminator_widths = ()
  generator, discriminator = train_lib.build_models(config)
  state = jax.eval_shape(
      lambda key: train_state.create_train_state(
          generator, discriminator, key, image_size=128, channels=3),
      jax.random.key(0))
  step = jax.jit(
      cavga_step.make_train_step(generator, discriminator,
                                 dict(config.loss_weights)),
      compiler_options=layers.compiler_options(generator.conv_impl))
  hlo = step.lower(state, jax.ShapeDtypeStruct((2, 128, 128, 3), jnp.uint8),
                   jax.random.key(1)).compile().as_text()
  convs = re.findall(
      r'convolution\(.*?window=\{size=(\d+)x\d+.*?'
      r'dim_labels=([\w>-]+)', hlo)
  assert len(convs) > 40
  assert [(int(size), labels)
          for size, labels in convs
          if int(size) >= 8 and labels != 'b01f_01io->b01f'] == []


@pytest.mark.parametrize('variant', ['D', 'R'])
def test_models_agree_across_conv_impls_and_lax_supports_forward_mode(variant):
  config = tiny.get_config()
  config.model.variant = variant
  if variant == 'R':
    config.model.decoder_widths = (32, 16, 16, 8, 8)
  config.model.conv_impl = 'phase'
  generator, discriminator = train_lib.build_models(config)
  config.model.conv_impl = 'lax'
  lax_generator, lax_discriminator = train_lib.build_models(config)
  assert (generator.conv_impl, lax_generator.conv_impl) == ('phase', 'lax')
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
  variables = generator.init({'params': jax.random.key(1)},
                             x,
                             None,
                             train=False)
  d_variables = discriminator.init(jax.random.key(2), x, train=False)

  def loss(params, gen, disc):
    out = gen.apply(dict(variables, params=params), x, None, train=False)
    logits = disc.apply(d_variables, out['reconstruction'], train=False)
    return jnp.sum(out['reconstruction']**2) + jnp.sum(logits)

  # Jitted: one compilation per path instead of op-by-op dispatch.
  value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=(1, 2))
  value, grads = value_and_grad(variables['params'], generator, discriminator)
  lax_value, lax_grads = value_and_grad(variables['params'], lax_generator,
                                        lax_discriminator)
  # The phase path as the programs compile it (XLA's Eigen convolutions on
  # the CPU, layers.compiler_options).
  eigen_value, eigen_grads = jax.jit(
      jax.value_and_grad(loss),
      static_argnums=(1, 2),
      compiler_options=layers.compiler_options('phase'))(variables['params'],
                                                         generator,
                                                         discriminator)
  for other_value, other_grads in ((lax_value, lax_grads), (eigen_value,
                                                            eigen_grads)):
    np.testing.assert_allclose(other_value, value, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(other_grads), jax.tree.leaves(grads)):
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
  # Forward mode through the whole model on the lax path; the phase path's
  # custom VJPs refuse it.
  reconstruct = lambda t, gen: gen.apply(
      variables, t, None, train=False)['reconstruction']
  _, tangent = jax.jit(
      lambda t: jax.jvp(lambda u: reconstruct(u, lax_generator), (t,), (t,)))(
          x)
  assert tangent.shape == x.shape and bool(jnp.all(jnp.isfinite(tangent)))
  with pytest.raises(TypeError, match='custom_vjp'):
    jax.jvp(lambda t: reconstruct(t, generator), (x,), (x,))


def test_bad_conv_impl_is_a_config_error(tiny_config):
  tiny_config.model.conv_impl = 'cudnn'
  with pytest.raises(CavgaError, match="config.model.conv_impl='cudnn'"):
    config_checks.check_config(tiny_config)
