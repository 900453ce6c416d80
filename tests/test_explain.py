"""Per-unit VAE explanations (Liu et al.), L_AD and the beta-VAE losses."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cavga_jax.models import attention
from cavga_jax.models import cavga
from cavga_jax.training import losses
from cavga_jax.vae import conv_vae
from cavga_jax.vae import explain


def _vae_and_images(latent_dim=5, batch=3, seed=0):
  model = conv_vae.ConvVAE(
      image_size=16,
      image_channels=1,
      encoder_widths=(4, 6),
      hidden=8,
      latent_dim=latent_dim,
  )
  images = jax.random.uniform(jax.random.key(seed), (batch, 16, 16, 1))
  variables = model.init(jax.random.key(1), images)
  return model, variables, images


def _conv_generator_and_images(batch=2):
  model = cavga.CAVGAGenerator(
      variant='D',
      image_size=32,
      latent='conv',
      latent_channels=3,
      image_channels=3,
      encoder_widths=(4, 4, 8, 8),
      decoder_widths=(8, 8, 4, 4))
  images = jax.random.uniform(
      jax.random.key(2), (batch, 32, 32, 3), minval=-1, maxval=1)
  variables = model.init(jax.random.key(3), images, None, False)
  return model, variables, images


def _separate_unit_maps(model, variables, images):
  """Unit k's map by its own grad_cam call, one unit at a time."""
  features = model.apply(variables, images, False, method='encode')

  def unit_score(k):

    def score(f):
      mu, _ = model.apply(variables, f, method='latent_params')
      return attention.unit_scores(mu)[:, k]

    return score

  mu, _ = model.apply(variables, features, method='latent_params')
  num_units = attention.unit_scores(mu).shape[1]
  units = np.stack(
      [attention.grad_cam(unit_score(k), features) for k in range(num_units)],
      axis=1)

  def sum_score(f):
    return jnp.sum(
        model.apply(variables, f,
                    method='latent_params')[0].reshape(f.shape[0], -1),
        axis=1)

  return units, np.asarray(attention.grad_cam(sum_score, features))


@pytest.mark.parametrize(
    'make', [_vae_and_images, _conv_generator_and_images],
    ids=['flat_latent_vae', 'conv_latent_cavga'])
def test_unit_maps_equal_separate_grad_cam(make):
  model, variables, images = make()
  maps, outputs = jax.jit(lambda v, x: explain.explain(model, v, x))(variables,
                                                                     images)
  units, sum_map = _separate_unit_maps(model, variables, images)
  assert maps.units.shape == units.shape
  np.testing.assert_allclose(maps.units, units, atol=1e-5)
  np.testing.assert_allclose(maps.sum, sum_map, atol=1e-5)
  mean = units.mean(axis=1)
  mean /= mean.max(axis=(1, 2), keepdims=True) + 1e-8
  np.testing.assert_allclose(maps.mean, mean, atol=1e-5)
  assert outputs['mu'].shape[0] == images.shape[0]
  # The maps are real maps, not all zero.
  assert float(maps.units.max()) > 0.5


def test_unit_scores_sum_conv_latent_over_positions():
  mu = jnp.arange(2 * 3 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 3, 4)
  np.testing.assert_allclose(attention.unit_scores(mu), mu.sum(axis=(1, 2)))
  flat = jnp.ones((2, 7))
  assert attention.unit_scores(flat) is flat


def test_attention_disentanglement_loss_hand_computed():
  rng = np.random.default_rng(0)
  a = rng.uniform(size=(4, 4))
  identical = jnp.asarray(np.stack([a, a, a])[None])  # 3 pairs of IoU 1
  np.testing.assert_allclose(
      losses.attention_disentanglement_loss(identical), 3.0, rtol=1e-6)
  disjoint = np.zeros((1, 3, 4, 4))
  disjoint[0, 0, :2] = 1.0
  disjoint[0, 1, 2:, :2] = 0.5
  disjoint[0, 2, 2:, 2:] = 0.25
  assert float(losses.attention_disentanglement_loss(disjoint)) == 0.0
  # Two maps: 2 * sum(min) / sum(a + b), averaged over the batch.
  b = rng.uniform(size=(4, 4))
  c = rng.uniform(size=(4, 4))
  expected = np.mean([
      2 * np.minimum(a, b).sum() / (a + b).sum(), 2 * np.minimum(a, c).sum() /
      (a + c).sum()
  ])
  pairs = jnp.asarray(np.stack([np.stack([a, b]), np.stack([a, c])]))
  np.testing.assert_allclose(
      losses.attention_disentanglement_loss(pairs), expected, rtol=1e-6)
  # All-zero maps count 0, not NaN.
  assert float(losses.attention_disentanglement_loss(jnp.zeros(
      (2, 3, 4, 4)))) == 0.0


def test_attention_disentanglement_loss_sums_all_pairs():
  maps = np.random.default_rng(1).uniform(size=(2, 5, 3, 3))
  per_image = [
      sum(2 * np.minimum(m[i], m[j]).sum() / (m[i] + m[j]).sum()
          for i, j in itertools.combinations(range(5), 2))
      for m in maps
  ]
  np.testing.assert_allclose(
      losses.attention_disentanglement_loss(maps),
      np.mean(per_image),
      rtol=1e-6)


def test_l_ad_trains_through_the_maps():
  model, variables, images = _vae_and_images()

  def l_ad(params):
    maps, _ = explain.explain(model, {'params': params}, images)
    return losses.attention_disentanglement_loss(maps.units)

  grads = jax.jit(jax.grad(l_ad))(variables['params'])
  norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
  assert all(np.isfinite(norms)) and max(norms) > 0
  # Second order: L_AD depends on the mu head only through dmu/dF.
  assert float(jnp.linalg.norm(grads['mu']['kernel'])) > 0
  assert float(jnp.linalg.norm(grads['conv0']['kernel'])) > 0
  # The decoder plays no part in the maps.
  assert float(jnp.linalg.norm(grads['to_map']['kernel'])) == 0


def _softmax(z):
  e = np.exp(z - np.max(z))
  return e / e.sum()


def test_distribution_variant_hand_cases():
  # Two positions: a cam peaked at 0, one peaked at 1, a flat (dead) one.
  peak_a, peak_b, flat = [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]
  loss = lambda *cams: float(
      losses.attention_overlap_per_image(
          jnp.asarray([cams], jnp.float32).reshape(1, len(cams), 1, 2))[0])
  z = 0.5 / np.sqrt(0.25 + 1e-6)  # standardised peak
  p_a, p_b = _softmax(np.array([z, -z])), _softmax(np.array([-z, z]))
  assert loss(peak_a, peak_b) == pytest.approx(
      np.minimum(p_a, p_b).sum(), rel=1e-5)  # ~0.238
  assert loss(peak_a, peak_a) == pytest.approx(1.0, rel=1e-6)
  # The flat cam is the uniform distribution: it overlaps the peak by
  # 0.5 + 0.119, more than the disjoint peak does; switching a map off
  # does not give the minimum (the paper's L_AD would give 0).
  assert loss(peak_a, flat) == pytest.approx(
      np.minimum(p_a, [0.5, 0.5]).sum(), rel=1e-5)
  assert loss(peak_a, flat) > loss(peak_a, peak_b)
  relu_maps = jnp.asarray([[[[1.0, 0.0]], [[0.0, 0.0]]]])
  assert float(losses.attention_disentanglement_loss(relu_maps)) == 0.0
  # Scale and offset of a cam do not matter; three identical cams: 3 pairs.
  assert loss([5.0, 3.0], [0.0, 1.0]) == pytest.approx(
      loss(peak_a, peak_b), rel=1e-5)
  assert loss(peak_a, peak_a, peak_a) == pytest.approx(3.0, rel=1e-6)


def test_distribution_variant_trains_the_mu_head():
  model, variables, images = _vae_and_images()

  def l_ad(params):
    maps, _ = explain.explain(model, {'params': params}, images)
    return losses.attention_disentanglement_variant(maps, 'distribution')

  grads = jax.jit(jax.grad(l_ad))(variables['params'])
  assert all(
      np.isfinite(float(jnp.linalg.norm(g))) for g in jax.tree.leaves(grads))
  assert float(jnp.linalg.norm(grads['mu']['kernel'])) > 0
  assert float(jnp.linalg.norm(grads['conv0']['kernel'])) > 0
  with pytest.raises(ValueError, match='ad_variant'):
    losses.attention_disentanglement_variant(None, 'iou')


def test_unit_cams_are_the_maps_before_relu_and_normalisation():
  model, variables, images = _vae_and_images()
  maps, _ = explain.explain(model, variables, images)
  np.testing.assert_allclose(
      maps.units, attention.normalize(maps.unit_cams), atol=1e-6)


def test_live_unit_share_on_a_hand_made_batch():
  maps = np.zeros((2, 4, 3, 3))
  maps[0, 0, 1, 1] = 0.2
  maps[0, 3] = 1.0
  maps[1, 2, 0, 0] = 1e-3
  # 3 of the 8 (image, unit) maps have a positive pixel.
  assert float(losses.live_unit_share(maps)) == 3 / 8


def test_beta_vae_losses_hand_computed():
  rng = np.random.default_rng(2)
  images = rng.uniform(size=(2, 3, 3, 1))
  logits = rng.normal(size=(2, 3, 3, 1))
  p = 1 / (1 + np.exp(-logits))
  bce = -(images * np.log(p) + (1 - images) * np.log(1 - p))
  np.testing.assert_allclose(
      losses.bernoulli_reconstruction_loss(images, logits),
      bce.reshape(2, -1).sum(1).mean(),
      rtol=1e-5)
  mu, logvar = rng.normal(size=(2, 4)), rng.normal(size=(2, 4))
  kl = 0.5 * (np.exp(logvar) + mu**2 - 1 - logvar)
  np.testing.assert_allclose(
      losses.kl_divergence(mu, logvar), kl.sum(1).mean(), rtol=1e-5)
  # The beta-VAE KL is the CAVGA per-element mean times the latent size.
  np.testing.assert_allclose(
      losses.kl_divergence(mu, logvar),
      4 * losses.kl_loss(mu, logvar),
      rtol=1e-5)


def test_conv_vae_shapes():
  model, variables, images = _vae_and_images(latent_dim=5)
  out = model.apply(variables, images, jax.random.key(0))
  assert out['features'].shape == (3, 4, 4, 6)
  assert out['mu'].shape == out['z'].shape == (3, 5)
  assert out['logits'].shape == images.shape
