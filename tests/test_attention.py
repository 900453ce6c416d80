"""Grad-CAM from the latent space (docs/protocol.md section 2)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cavga_jax.models import attention
from cavga_jax.programs import train as train_lib


def _features(shape=(3, 4, 5, 6), seed=0):
  return jax.random.normal(jax.random.key(seed), shape)


def test_linear_score_matches_hand_computation():
  # s_b = sum_{i,j,k} W_{ijk} F_{bijk}: ds/dF = W, alpha_k = mean_ij W_ijk.
  features = _features()
  weights = np.asarray(_features(features.shape[1:], seed=1))
  attention_map = attention.grad_cam(
      lambda f: jnp.einsum('bhwk,hwk->b', f, weights), features)
  alpha = weights.mean(axis=(0, 1))
  cam = np.maximum(np.einsum('bhwk,k->bhw', np.asarray(features), alpha), 0)
  expected = cam / (cam.max(axis=(1, 2), keepdims=True) + 1e-8)
  np.testing.assert_allclose(attention_map, expected, rtol=1e-5, atol=1e-6)
  assert attention_map.shape == (3, 4, 5)
  assert float(attention_map.min()) >= 0 and float(attention_map.max()) <= 1


def _nonlinear_score(params, f):
  return jnp.sum(
      jnp.tanh(jnp.einsum('bhwk,kc->bhwc', f, params))**2, axis=(1, 2, 3))


def test_gradients_match_finite_differences():
  with jax.enable_x64(True):
    features = _features((2, 3, 3, 4)).astype(jnp.float64)
    params = _features((4, 5), seed=2).astype(jnp.float64)
    score = lambda f: _nonlinear_score(params, f)
    eps = 1e-6
    flat = np.asarray(features).ravel()
    fd = np.zeros_like(flat)
    for i in range(flat.size):
      plus, minus = flat.copy(), flat.copy()
      plus[i] += eps
      minus[i] -= eps
      fd[i] = (score(plus.reshape(features.shape)).sum()
               - score(minus.reshape(features.shape)).sum()) / (2 * eps)
    expected = attention.cam_from_gradients(features,
                                            fd.reshape(features.shape))
    np.testing.assert_allclose(
        attention.grad_cam(score, features), expected, rtol=1e-6, atol=1e-8)


def test_second_order_gradient_matches_finite_differences():
  # L_ae depends on the parameters through dS/dF: check d L_ae / d params.
  with jax.enable_x64(True):
    features = _features((2, 3, 3, 4)).astype(jnp.float64)
    params = _features((4, 5), seed=2).astype(jnp.float64)

    def loss(p):
      a = attention.grad_cam(lambda f: _nonlinear_score(p, f), features)
      return jnp.mean(1.0 - a)

    grad = np.asarray(jax.grad(loss)(params))
    assert np.abs(grad).max() > 0
    eps = 1e-6
    for index in [(0, 0), (1, 3), (3, 4)]:
      delta = np.zeros(params.shape)
      delta[index] = eps
      fd = (loss(params + delta) - loss(params - delta)) / (2 * eps)
      assert grad[index] == pytest.approx(float(fd), rel=1e-5, abs=1e-9)


def test_batched_equals_per_image():
  features = _features()
  params = _features((6, 5), seed=3)
  score = lambda f: _nonlinear_score(params, f)
  batched = attention.grad_cam(score, features)
  for b in range(features.shape[0]):
    single = attention.grad_cam(score, features[b:b + 1])
    np.testing.assert_allclose(batched[b], single[0], rtol=1e-5, atol=1e-6)


def test_localization_map():
  a = jnp.array([[[1.0, 0.0], [0.0, 1.0]]])
  m = attention.localization_map(a, 8)
  assert m.shape == (1, 8, 8)
  assert float(m.min()) >= 0 and float(m.max()) <= 1
  assert float(m[0, 0, 0]) < 0.3 and float(m[0, 0, 7]) > 0.7


def test_forward_with_attention_on_the_generator():
  config = ml_collections.ConfigDict(
      dict(
          data=dict(image_size=32, channels=3),
          model=dict(
              variant='D',
              latent='conv',
              latent_channels=8,
              encoder_widths=(8, 8, 16, 16),
              decoder_widths=(16, 8, 8, 8),
              discriminator_widths=(8, 8, 8, 8))))
  generator, _ = train_lib.build_models(config)
  x = jax.random.uniform(jax.random.key(0), (4, 32, 32, 3), minval=-1, maxval=1)
  variables = generator.init({'params': jax.random.key(1)},
                             x,
                             None,
                             train=False)
  outputs, stats = jax.jit(lambda v: attention.forward_with_attention(
      generator,
      v['params'],
      v['batch_stats'],
      x,
      jax.random.key(2),
      train=True))(
          variables)
  assert outputs['attention'].shape == (4, 2, 2)
  assert jax.tree.structure(stats) == jax.tree.structure(
      variables['batch_stats'])
  # Same map as Grad-CAM of sum(mu) computed directly from the features.
  direct = attention.grad_cam(
      lambda f: generator.apply({'params': variables['params']},
                                f,
                                method='latent_params')[0].sum(axis=(1, 2, 3)),
      outputs['features'])
  np.testing.assert_allclose(outputs['attention'], direct, rtol=1e-5, atol=1e-6)
