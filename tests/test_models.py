"""Shapes and parameter counts of the CAVGA networks (docs/protocol.md)."""

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from cavga_jax.errors import CavgaError
from cavga_jax.programs import train as train_lib


def _count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


def _config(variant, size, channels=3, latent='conv'):
  return ml_collections.ConfigDict(
      dict(
          data=dict(image_size=size, channels=channels),
          model=dict(
              variant=variant,
              latent=latent,
              latent_channels=128,
              latent_dim=64,
              encoder_widths=(),
              decoder_widths=(),
              discriminator_widths=(),
              supervision='unsupervised')))


def _shapes(variant, size, channels=3, latent='conv'):
  generator, discriminator = train_lib.build_models(
      _config(variant, size, channels, latent))
  x = jnp.zeros((2, size, size, channels))
  gen_vars = jax.eval_shape(lambda: generator.init(
      {'params': jax.random.key(0)}, x, jax.random.key(1), train=False))
  outputs = jax.eval_shape(
      lambda v: generator.apply(v, x, jax.random.key(1), train=False), gen_vars)
  disc_vars = jax.eval_shape(
      lambda: discriminator.init(jax.random.key(0), x, train=False))
  logits = jax.eval_shape(lambda v: discriminator.apply(v, x, train=False),
                          disc_vars)
  return gen_vars, disc_vars, outputs, logits


@pytest.mark.parametrize('variant,gen_count,feature_shape', [
    ('R', 16_854_723, (2, 8, 8, 512)),
    ('D', 6_236_032, (2, 16, 16, 512)),
])
def test_paper_models_match_the_pytorch_peer(variant, gen_count, feature_shape):
  # Counts from ../shared/peer/README.md (256 px, latent 128).
  gen_vars, disc_vars, outputs, logits = _shapes(variant, 256)
  assert _count(gen_vars['params']) == gen_count
  assert _count(disc_vars['params']) == 2_765_568
  assert outputs['features'].shape == feature_shape
  assert outputs['mu'].shape == feature_shape[:3] + (128,)
  assert outputs['reconstruction'].shape == (2, 256, 256, 3)
  assert logits.shape == (2, 13, 13)


def test_mnist_sized_cavga_d():
  gen_vars, disc_vars, outputs, logits = _shapes('D', 32, channels=1)
  assert outputs['reconstruction'].shape == (2, 32, 32, 1)
  assert outputs['mu'].shape == (2, 2, 2, 128)
  assert logits.shape == (2, 1, 1)
  assert _count(disc_vars['params']) - _count(
      disc_vars['params']['trunk']) == 2 * 2 * 512  # head kernel shrinks to 2x2


def test_flat_latent():
  _, _, outputs, _ = _shapes('R', 64, latent='flat')
  assert outputs['mu'].shape == (2, 64)
  assert outputs['z'].shape == (2, 64)
  assert outputs['reconstruction'].shape == (2, 64, 64, 3)


def test_reconstruction_in_tanh_range_and_eval_decodes_mu():
  generator, _ = train_lib.build_models(_config('D', 32))
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
  variables = generator.init({'params': jax.random.key(1)},
                             x,
                             None,
                             train=False)
  out = generator.apply(variables, x, None, train=False)
  assert jnp.all(jnp.abs(out['reconstruction']) <= 1)
  assert jnp.array_equal(out['z'], out['mu'])


@pytest.mark.parametrize('field,value,message', [
    ('model.variant', 'X', "config.model.variant='X' must be one of 'R', 'D'"),
    ('data.image_size', 48, 'multiple of 32'),
    ('model.decoder_widths', (8, 8), 'needs 5 entries'),
])
def test_bad_model_config(field, value, message):
  config = _config('R', 64)
  section, name = field.split('.')
  config[section][name] = value
  with pytest.raises(CavgaError, match=message):
    train_lib.build_models(config)
