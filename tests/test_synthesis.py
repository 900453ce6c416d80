"""Synthetic anomalies for CAVGA_w: the synthesis, its losses, training."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cavga_jax import config_checks
from cavga_jax import typed_config
from cavga_jax.errors import CavgaError
from cavga_jax.programs import evaluate as eval_lib
from cavga_jax.programs import train as train_lib
from cavga_jax.training import cavga_step
from cavga_jax.training import losses
from cavga_jax.training import synthesis
from configs import tiny_synthetic
from conftest import resume_copy_of_run
from conftest import tree_equal

SIZE = 32


def _images(batch=6, seed=0, channels=3):
  return jax.random.uniform(
      jax.random.key(seed), (batch, SIZE, SIZE, channels),
      minval=-0.3,
      maxval=0.3)


def _synthesize(key, images, **fields):
  settings = typed_config.SynthesisSettings(**fields)
  return jax.jit(synthesis.synthesize, static_argnums=2)(key, images, settings)


def test_synthesis_is_a_function_of_the_key():
  images = _images()
  a = _synthesize(jax.random.key(3), images)
  b = _synthesize(jax.random.key(3), images)
  c = _synthesize(jax.random.key(4), images)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert not np.array_equal(np.asarray(a[1]), np.asarray(c[1]))


@pytest.mark.parametrize('mask_kind', typed_config.MASK_KINDS)
@pytest.mark.parametrize('fill_kind', typed_config.FILL_KINDS)
def test_masks_are_binary_and_bound_the_change(mask_kind, fill_kind):
  images = _images()
  out, masks, is_synthetic = _synthesize(
      jax.random.key(0), images, masks=(mask_kind,), fills=(fill_kind,))
  out, masks, images = map(np.asarray, (out, masks, images))
  assert masks.dtype == np.float32 and set(np.unique(masks)) <= {0.0, 1.0}
  np.testing.assert_array_equal(np.asarray(is_synthetic), [1, 1, 1, 0, 0, 0])
  changed = np.any(out != images, axis=-1)
  # Nothing changes outside the mask; unaltered images have empty masks.
  assert not changed[masks == 0].any()
  assert masks[3:].sum() == 0 and masks[:3].reshape(3, -1).sum(1).min() > 0
  # Inside the mask the image is a blend towards the fill.
  assert changed[masks == 1].mean() > 0.95


def test_mask_is_exactly_the_altered_region_for_a_distinct_fill():
  # A colour shift of at least 0.2 at full opacity changes every pixel of
  # a mid-gray image under the mask, and none outside it.
  images = jnp.zeros((4, SIZE, SIZE, 3))
  out, masks, _ = _synthesize(
      jax.random.key(1),
      images,
      fills=('shift',),
      min_opacity=1.0,
      fraction=1.0)
  changed = np.all(np.asarray(out) != 0.0, axis=-1)
  np.testing.assert_array_equal(changed, np.asarray(masks) == 1.0)


def test_gray_images_get_gray_fills():
  gray = jnp.repeat(_images(channels=1), 3, axis=-1)
  out, masks, _ = _synthesize(
      jax.random.key(2), gray, fills=('texture',), fraction=1.0)
  out = np.asarray(out)
  assert np.asarray(masks).sum() > 0
  np.testing.assert_allclose(out[..., 0], out[..., 1], atol=1e-6)
  np.testing.assert_allclose(out[..., 0], out[..., 2], atol=1e-6)


def test_perlin_mask_covers_the_requested_area():
  for area in (0.01, 0.1):
    mask = synthesis.perlin_mask(jax.random.key(0), 64, jnp.float32(area))
    assert float(mask.mean()) == pytest.approx(area, abs=1 / 64)


def test_settings_errors_and_fields():
  assert typed_config.synthesis_settings_from_fields({'fraction': 0.0}) is None
  assert typed_config.synthesis_settings_from_fields(None) is None
  settings = typed_config.synthesis_settings_from_fields(
      {'fraction': 0.25, 'masks': ['scratch']})
  assert settings.masks == ('scratch',) and settings.num_synthetic(8) == 2
  with pytest.raises(ValueError, match='unknown fields'):
    typed_config.synthesis_settings_from_fields({'fraction': 0.5, 'colour': 1})
  with pytest.raises(ValueError, match='masks'):
    typed_config.SynthesisSettings(masks=('square',))
  with pytest.raises(ValueError, match='opacity'):
    typed_config.SynthesisSettings(min_opacity=0.0)
  with pytest.raises(ValueError, match='reconstruction'):
    typed_config.SynthesisSettings(reconstruction='all')


@pytest.mark.parametrize('field,value,supervision,match', [
    ('fraction', 0.5, 'unsupervised', "supervision='weak'"),
    ('fills', ('paint',), 'weak', 'fills'),
    ('fraction', 1.5, 'weak', 'fraction'),
])
def test_check_config_rejects_bad_synthesis(field, value, supervision, match):
  config = tiny_synthetic.get_config()
  config.model.supervision = supervision
  config.data.synthetic[field] = value
  with pytest.raises(CavgaError, match=match):
    config_checks.check_config(config)


def test_mask_dice_loss_hand_cases():
  mask = jnp.zeros((1, 4, 4)).at[0, :2, :2].set(1.0)  # 4 px
  weights = jnp.ones(1)
  assert float(losses.mask_dice_loss(mask, mask, weights)) == 0.0
  # All-zero map: 1 - s / (4 + s) with s = 1, above the perfect map's 0.
  zero = losses.mask_dice_loss(jnp.zeros_like(mask), mask, weights)
  assert float(zero) == pytest.approx(1 - 1 / 5)
  # Disjoint map of 4 px: 1 - 1 / 9.
  disjoint = jnp.zeros((1, 4, 4)).at[0, 2:, 2:].set(1.0)
  assert float(losses.mask_dice_loss(disjoint, mask, weights)) == (
      pytest.approx(1 - 1 / 9))
  # Weights select images: a perfect and a zero map, only the first counts.
  maps = jnp.concatenate([mask, jnp.zeros_like(mask)])
  both = jnp.concatenate([mask, mask])
  assert float(losses.mask_dice_loss(maps, both, jnp.array([1.0, 0.0]))) == 0


def test_normal_only_losses_ignore_the_synthetic_images():
  images = _images(batch=2)
  recon = images.at[1].set(0.9)  # the second (synthetic) image is off
  mu = jnp.zeros((2, 2, 2, 3)).at[1].set(5.0)
  logvar = jnp.zeros((2, 2, 2, 3))
  fake_logits = jnp.array([0.3, -7.0])
  outputs = dict(
      reconstruction=recon,
      mu=mu,
      logvar=logvar,
      class_attention=jnp.zeros((2, 2, 2, 2)),
      logits=jnp.zeros((2, 2)))
  weights = jnp.array([1.0, 0.0])
  terms = cavga_step.weak_generator_loss_terms(
      outputs, images, fake_logits, jnp.array([0, 1]), vae_weights=weights)
  assert float(terms['rec']) == 0.0 and float(terms['kl']) == 0.0
  assert float(terms['adv']) == pytest.approx(
      float(jax.nn.softplus(-0.3)), rel=1e-6)
  assert float(losses.discriminator_loss(
      jnp.zeros(2), fake_logits, weights)) == pytest.approx(
          float(2 * jax.nn.softplus(0.0) / 2 + jax.nn.softplus(0.3)), rel=1e-6)
  # Unweighted, the second image counts.
  plain = cavga_step.weak_generator_loss_terms(outputs, images, fake_logits,
                                               jnp.array([0, 1]))
  assert float(plain['rec']) > 0 and float(plain['kl']) > 0


def test_tiny_synthetic_train_resume_and_evaluate(tmp_path):
  config = tiny_synthetic.get_config()
  full = train_lib.train(config, str(tmp_path / 'full'))
  resumed = resume_copy_of_run(config, str(tmp_path / 'full'),
                               str(tmp_path / 'resumed'))
  assert tree_equal(full, resumed)  # The whole state.
  workdir = tmp_path / 'full'
  with open(workdir / 'train_metrics.jsonl') as f:
    logged = [json.loads(line) for line in f]
  # No real label: the anomalous half of each batch is the synthetic one.
  assert all(line['anomalous_fraction'] == 0.5 for line in logged)
  assert all(0.0 <= line['mask'] <= 1.0 for line in logged)
  assert (workdir / train_lib.SYNTHETIC_EXAMPLES_FILE).exists()
  with open(workdir / 'weak_split.json') as f:
    assert json.load(f)['num_train_anomalous'] == 0
  result = eval_lib.evaluate(config, str(workdir))
  # The whole test set stays: 4 good + 3 defect types x 2.
  assert result['num_test_images'] == 10
  assert 'weak_anomalous' in result['maps']
