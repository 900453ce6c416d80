"""Anomaly maps (cavga_jax.maps.anomaly_maps) and the attention variants."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import ndimage

from cavga_jax import config_checks
from cavga_jax import typed_config
from cavga_jax.errors import CavgaError
from cavga_jax.evaluation import evaluator as evaluator_lib
from cavga_jax.evaluation import fitting
from cavga_jax.evaluation import scoring
from cavga_jax.maps import anomaly_maps
from cavga_jax.metrics import pixel_metrics
from cavga_jax.models import attention
from cavga_jax.programs import train as train_lib
from cavga_jax.vae import explain
from conftest import dataset_from_masks

SETTINGS = anomaly_maps.MapSettings(residual_sigma=0.0)


def _images(shape=(2, 16, 16, 3), seed=0):
  return jax.random.uniform(jax.random.key(seed), shape, minval=-1, maxval=1)


def _masks():
  masks = np.zeros((2, 16, 16), bool)
  masks[0, 3:7, 5:11] = True
  masks[1, 9:14, 2:6] = True
  return masks


def test_residual_error_exactly_on_the_mask_gives_pixel_auroc_1():
  images = _images()
  masks = _masks()
  reconstruction = jnp.where(masks[..., None], -images, images)
  residual = anomaly_maps.residual_map(
      dict(images=images, reconstruction=reconstruction), SETTINGS)
  assert residual.shape == (2, 16, 16)
  np.testing.assert_allclose(np.asarray(residual)[~masks], 0.0)
  assert pixel_metrics.pixel_auroc(np.asarray(residual), masks) == 1.0


def test_constant_map_gives_pixel_auroc_one_half():
  constant = np.full((2, 16, 16), 0.3, np.float32)
  assert pixel_metrics.pixel_auroc(constant, _masks()) == pytest.approx(0.5)


def test_ssim_of_an_image_with_itself_is_one():
  images = _images()
  np.testing.assert_allclose(
      anomaly_maps.ssim_map(images, images), 1.0, atol=1e-5)
  outputs = dict(images=images, reconstruction=images)
  ssim_residual = anomaly_maps.residual_ssim_map(outputs, SETTINGS)
  assert ssim_residual.shape == (2, 16, 16)
  np.testing.assert_allclose(ssim_residual, 0.0, atol=1e-5)
  # A different reconstruction lowers the SSIM where it differs.
  other = images.at[:, 4:8, 4:8].set(-images[:, 4:8, 4:8])
  local = np.asarray(anomaly_maps.ssim_map(images, other))
  assert local[:, 6, 6].max() < 0.5 and local[:, 14, 14].min() > 0.99


@pytest.mark.parametrize('window', [11, 7])
def test_ssim_map_equals_dm_pix(window):
  dm_pix = pytest.importorskip('dm_pix')
  images = _images((2, 24, 20, 3))
  other = jnp.clip(images + 0.3 * _images((2, 24, 20, 3), seed=1), -1, 1)
  half = window // 2
  pad = lambda x: (jnp.pad(
      x, ((0, 0), (half, half), (half, half),
          (0, 0)), mode='reflect') + 1.0) / 2.0
  expected = jnp.mean(
      dm_pix.ssim(
          pad(images),
          pad(other),
          max_val=1.0,
          filter_size=window,
          return_map=True), -1)
  np.testing.assert_allclose(
      anomaly_maps.ssim_map(images, other, window), expected, atol=2e-5)


def test_ssim_scale_compares_the_resized_images(tiny_config):
  # eval.ssim_scale=2: dm-pix's SSIM of the images upsampled 2x, resized
  # back; scale 1 is the plain SSIM residual.
  dm_pix = pytest.importorskip('dm_pix')
  images = _images((2, 24, 24, 3))
  other = jnp.clip(images + 0.3 * _images((2, 24, 24, 3), seed=1), -1, 1)
  outputs = dict(images=images, reconstruction=other)
  plain = anomaly_maps.MapSettings(ssim_window=7)
  np.testing.assert_array_equal(
      anomaly_maps.residual_ssim_map(outputs, plain),
      1.0 - anomaly_maps.ssim_map(images, other, 7))
  up = lambda x: jax.image.resize(x, (2, 48, 48, 3), 'linear')
  pad = lambda x: (jnp.pad(x, ((0, 0), (3, 3), (3, 3),
                               (0, 0)), mode='reflect') + 1.0) / 2.0
  ssim = jnp.mean(
      dm_pix.ssim(
          pad(up(images)),
          pad(up(other)),
          max_val=1.0,
          filter_size=7,
          return_map=True), -1)
  expected = jax.image.resize(1.0 - ssim, (2, 24, 24), 'linear')
  scaled = anomaly_maps.MapSettings(ssim_window=7, ssim_scale=2.0)
  np.testing.assert_allclose(
      anomaly_maps.residual_ssim_map(outputs, scaled), expected, atol=2e-5)
  # The setting reaches the maps from the config.
  tiny_config.eval.ssim_scale = 2.0
  settings = evaluator_lib.map_settings(
      typed_config.from_config(tiny_config).eval, 24)
  assert settings.ssim_scale == 2.0


def test_gaussian_blur_equals_scipy_with_mirror_padding():
  maps = np.asarray(_images((2, 30, 26, 1))[..., 0])
  expected = np.stack([
      ndimage.gaussian_filter(
          m.astype(np.float64), 3.0, mode='mirror', truncate=3.0) for m in maps
  ])
  np.testing.assert_allclose(
      anomaly_maps.gaussian_blur(maps, 3.0), expected, atol=1e-5)


def test_gaussian_blur_keeps_constants_and_spreads_a_peak():
  flat = jnp.full((1, 20, 20), 2.0)
  np.testing.assert_allclose(
      anomaly_maps.gaussian_blur(flat, 2.0), 2.0, rtol=1e-5)
  peak = jnp.zeros((1, 41, 41)).at[0, 20, 20].set(1.0)
  blurred = np.asarray(anomaly_maps.gaussian_blur(peak, 2.0))[0]
  assert blurred.sum() == pytest.approx(1.0, rel=1e-4)
  # A separable Gaussian kernel cut at 3 sigma (radius 6) and normalised.
  x = np.arange(41) - 20
  g = np.where(np.abs(x) <= 6, np.exp(-x**2 / 8.0), 0.0)
  expected = np.outer(g, g) / g.sum()**2
  np.testing.assert_allclose(blurred, expected, atol=1e-6)


def test_image_score_is_the_mean_of_the_top_percent():
  maps = np.zeros((2, 20, 20), np.float32)  # 400 pixels: the top 4 count.
  maps[0].flat[:4] = [4.0, 3.0, 2.0, 1.0]
  maps[0].flat[4] = 0.5
  maps[1] = 0.25
  np.testing.assert_allclose(
      anomaly_maps.image_score(jnp.asarray(maps)), [2.5, 0.25])


def test_attention_maps_of_outputs():
  # 2x2 maps upsampled to 4x4 by hand: bilinear with half-pixel centres,
  # output pixel i samples input coordinate (i + 0.5) / 2 - 0.5, i.e.
  # -0.25 (edge: the first value), 0.25, 0.75, 1.25 (the last value).
  upsample = np.array([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])
  a = np.array([[1.0, 0.0], [0.5, 0.25]])  # asymmetric: transposes show
  unit_mean = np.array([[0.0, 0.2], [0.9, 1.0]])
  images = np.zeros((1, 4, 4, 1), np.float32)
  reconstruction = np.linspace(-1, 1, 16, dtype=np.float32).reshape(1, 4, 4, 1)
  outputs = dict(
      images=jnp.asarray(images),
      reconstruction=jnp.asarray(reconstruction),
      attention=jnp.asarray(a[None], jnp.float32),
      attention_unit_mean=jnp.asarray(unit_mean[None], jnp.float32))
  expected = upsample @ (1.0 - a) @ upsample.T  # M = 1 - A at image size
  np.testing.assert_allclose(
      anomaly_maps.attention_map(outputs, SETTINGS)[0],
      expected,
      rtol=0,
      atol=1e-6)
  np.testing.assert_allclose(
      anomaly_maps.attention_liu_map(outputs, SETTINGS)[0],
      upsample @ (1.0 - unit_mean) @ upsample.T,
      rtol=0,
      atol=1e-6)
  # Unblurred (sigma 0): (1 - A) times the squared error, channel mean.
  np.testing.assert_allclose(
      anomaly_maps.attention_x_residual_map(outputs, SETTINGS)[0],
      expected * reconstruction[0, :, :, 0]**2,
      rtol=0,
      atol=1e-6)


def test_normalize_variants_by_hand():
  cam = jnp.array([[[-1.0, 0.0], [1.0, 3.0]]])
  np.testing.assert_allclose(
      attention.normalize(cam, 'max'), [[[0.0, 0.0], [1 / 3, 1.0]]], rtol=1e-6)
  np.testing.assert_allclose(
      attention.normalize(cam, 'minmax'), [[[0.0, 0.25], [0.5, 1.0]]],
      rtol=1e-6)
  with pytest.raises(ValueError, match='norm'):
    attention.normalize(cam, 'softmax')


def _generator(**attention_settings):
  config = ml_collections.ConfigDict(
      dict(
          data=dict(image_size=32, channels=3),
          model=dict(
              variant='D',
              latent='conv',
              latent_channels=4,
              encoder_widths=(4, 8, 8, 8),
              decoder_widths=(8, 8, 4, 4),
              discriminator_widths=(4, 4, 4, 4),
              **attention_settings)))
  generator, _ = train_lib.build_models(config)
  x = _images((3, 32, 32, 3), seed=1)
  variables = generator.init({'params': jax.random.key(2)},
                             x,
                             None,
                             train=False)
  return generator, variables, x


def _forward(generator, variables, x):
  return attention.forward_with_attention(
      generator,
      variables['params'],
      variables['batch_stats'],
      x,
      None,
      train=False,
      unit_maps=True)[0]


def test_unit_mean_score_equals_liu_et_al_mean_map():
  generator, variables, x = _generator(attention_score='unit_mean')
  outputs = _forward(generator, variables, x)
  maps, _ = explain.explain(generator, variables, x)
  np.testing.assert_allclose(
      outputs['attention'], maps.mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      outputs['attention_sum'], maps.sum, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      outputs['unit_attention'], maps.units, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('stage,norm', [(2, 'max'), (3, 'minmax'),
                                        (4, 'minmax')])
def test_attention_at_an_earlier_stage_matches_per_image_gradients(stage, norm):
  generator, variables, x = _generator(
      attention_stage=stage, attention_norm=norm)
  outputs = _forward(generator, variables, x)
  assert outputs['attention'].shape == (3, 32 // 2**stage, 32 // 2**stage)

  def stage_features(image):
    return generator.apply(
        variables, image[None], False, stage, method='encode')

  def sum_mu(f):
    top = generator.apply(variables, f, stage, False, method='encode_from')
    return generator.apply(variables, top, method='latent_params')[0].sum()

  for b in range(x.shape[0]):
    # The reference: one image at a time, jax.grad and the formula of
    # docs/protocol.md section 2 written out in numpy.
    f = stage_features(x[b])
    grads = np.asarray(jax.grad(sum_mu)(f))[0]
    f = np.asarray(f)[0]
    cam = np.einsum('hwk,k->hw', f, grads.mean(axis=(0, 1)))
    if norm == 'max':
      cam = np.maximum(cam, 0) / (np.maximum(cam, 0).max() + 1e-8)
    else:
      cam = (cam - cam.min()) / (cam.max() - cam.min() + 1e-8)
    np.testing.assert_allclose(
        outputs['attention'][b], cam, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        outputs['attention_sum'][b], cam, rtol=1e-4, atol=1e-5)
  # The reconstruction does not depend on where the attention is taken.
  reference_generator, _, _ = _generator()
  reference = _forward(reference_generator, variables, x)
  np.testing.assert_allclose(
      outputs['reconstruction'],
      reference['reconstruction'],
      rtol=1e-5,
      atol=1e-6)


def _dataset(maps_shape=(4, 8, 8)):
  masks = np.zeros(maps_shape, bool)
  masks[2, 1:4, 1:4] = True
  masks[3, 5:7, 2:6] = True
  return dataset_from_masks(masks)


def test_compute_metrics_scores_every_map_and_the_prior():
  dataset = _dataset()
  rng = np.random.default_rng(0)
  perfect = dataset.masks.astype(np.float32) * 3.0  # unbounded, exact
  noise = rng.random(dataset.masks.shape).astype(np.float32)
  predictions = dict(
      score=np.array([0.1, 0.2, 0.3, 0.4]),
      maps=dict(attention=noise, residual=perfect),
      map_scores=dict(attention=np.zeros(4), residual=perfect.max((1, 2))))
  result = scoring.compute_metrics(predictions, dataset, headline='residual')
  assert set(
      result['maps']) == {'attention', 'residual', 'prior', 'prior_normal'}
  residual = result['maps']['residual']
  assert residual['pixel_auroc'] == 1.0 and residual['aupro'] == 1.0
  # Normalised over the test set, the exact map has IoU 1 at 0.5.
  assert residual['iou'] == 1.0 and residual['image_auroc'] == 1.0
  # The flat keys are the headline map's; s_a's are suffixed.
  assert result['pixel_auroc'] == 1.0 and result['iou'] == 1.0
  assert result['image_auroc_reconstruction'] == 1.0  # s_a rises here
  assert result['map'] == 'residual'
  assert set(predictions['maps']) == {'attention', 'residual'}  # unchanged
  priors = scoring.prior_maps(predictions['maps'], 'residual', dataset.labels)
  prior = priors['prior']
  np.testing.assert_allclose(prior[0], perfect.mean(axis=0))
  assert result['maps']['prior']['image_auroc'] == 0.5
  # prior_normal averages the normal images only: it cannot see the defects
  # (here a constant map, pixel AUROC 0.5), where prior leaks them.
  normal = dataset.labels == 0
  np.testing.assert_allclose(priors['prior_normal'][3],
                             perfect[normal].mean(axis=0))
  assert result['maps']['prior']['pixel_auroc'] > 0.85
  assert result['maps']['prior_normal']['pixel_auroc'] == 0.5


def test_flat_metrics_are_the_headline_maps_and_accuracies_name_thresholds():
  dataset = _dataset()
  perfect = dataset.masks.astype(np.float32) * 3.0 + 1.0
  predictions = dict(
      # s_a falls where the labels rise: its image AUROC is 0, the
      # headline's 1, so a flat key taken from s_a cannot pass.
      score=np.array([0.4, 0.3, 0.2, 0.1]),
      maps=dict(residual=perfect),
      map_scores=dict(residual=perfect.max((1, 2))),
      p_anomalous=np.array([0.9, 0.8, 0.7, 0.1]))
  result = scoring.compute_metrics(predictions, dataset, 'residual',
                                   {'residual': (2.0, 1.5, 1.0)})
  headline = result['maps']['residual']
  assert {k: result[k] for k in headline} == headline
  assert result['image_auroc'] == 1.0
  assert result['detection_accuracy_held_out'] == 1.0
  assert result['image_auroc_reconstruction'] == 0.0
  assert result['detection_accuracy_minmax_reconstruction'] == 0.0
  assert 'headline_detection' not in result
  # Every accuracy, flat or per map, says which threshold decided it.
  keys = set(result) | {k for m in result['maps'].values() for k in m}
  accuracies = {
      k.removesuffix('_reconstruction') for k in keys if 'accuracy' in k
  }
  assert accuracies == {
      'detection_accuracy_minmax', 'detection_accuracy_held_out',
      'classifier_accuracy_argmax'
  }


def test_held_out_split_is_fixed_disjoint_and_keeps_an_image():
  images = np.arange(20)[:, None, None, None] * np.ones((1, 2, 2, 1), np.uint8)
  fit, held_out = fitting.split_held_out(images, 0.1)
  assert len(fit) == 18 and len(held_out) == 2
  assert sorted(np.concatenate([fit, held_out])[:, 0, 0, 0]) == list(range(20))
  again_fit, again_held_out = fitting.split_held_out(images, 0.1)
  np.testing.assert_array_equal(held_out, again_held_out)
  np.testing.assert_array_equal(fit, again_fit)
  assert fitting.split_held_out(images, 0.0)[1] is None
  assert len(fitting.split_held_out(images, 0.99)[0]) == 1
  assert fitting.split_held_out(images[:1], 0.5)[1] is None


def test_thresholds_from_held_out_normal_images():
  dataset = _dataset()
  perfect = dataset.masks.astype(np.float32) * 3.0 + 1.0
  held_out = dict(
      maps=dict(residual=np.linspace(0, 2, 200).reshape(2, 10, 10)),
      map_scores=dict(residual=np.array([0.5, 1.5])))
  thresholds = scoring.held_out_thresholds(held_out, quantile=1.0)
  assert thresholds == {'residual': (2.0, 1.5, 1.0)}  # and the median
  predictions = dict(
      score=np.array([0.1, 0.2, 0.3, 0.4]),
      maps=dict(residual=perfect),
      map_scores=dict(residual=perfect.max((1, 2))))
  result = scoring.compute_metrics(predictions, dataset, 'residual', thresholds)
  residual = result['maps']['residual']
  # Defect pixels (4) are above the normal maximum 2, the others (1) below;
  # the image scores 4 and 1 split the same way at 1.5.
  assert residual['iou_held_out'] == 1.0
  assert residual['detection_accuracy_held_out'] == 1.0
  assert residual['threshold_held_out'] == 2.0
  assert result['iou_held_out'] == 1.0
  assert 'iou_held_out' not in result['maps']['prior']
  # A threshold below every pixel flags whole images: IoU = mask share.
  low = scoring.compute_metrics(
      dict(predictions), dataset, 'residual', {'residual': (0.0, 0.0)})
  share = dataset.masks[dataset.labels == 1].mean(axis=(1, 2)).mean()
  assert low['maps']['residual']['iou_held_out'] == pytest.approx(share)
  assert low['maps']['residual']['detection_accuracy_held_out'] == np.mean(
      dataset.labels)


def test_conv_latent_attention_is_a_fixed_linear_read_out_of_the_features():
  # The reason the paper's map cannot follow the input: with mu = W F + b,
  # the Grad-CAM weights of sum(mu) at F are the row sums of W for every
  # image, so A = ReLU(F . w) / max (scripts/attention_analysis.py).
  generator, variables, x = _generator()
  outputs = _forward(generator, variables, x)
  w = np.asarray(variables['params']['mu']['kernel']).reshape(
      -1, generator.latent_channels).sum(axis=1)
  cam = np.maximum(np.einsum('bhwk,k->bhw', outputs['features'], w), 0)
  expected = cam / (cam.max(axis=(1, 2), keepdims=True) + 1e-8)
  np.testing.assert_allclose(
      outputs['attention'], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('field, value, expected', [
    ('eval.map', 'nope', "config.eval.map='nope' must be one of"),
    ('eval.map', 'weak_anomalous', "needs config.model.supervision='weak'"),
    ('eval.maps', 'some', "config.eval.maps='some' must be one of 'all', "
     "'headline'"),
    ('eval.ssim_window', 10, 'config.eval.ssim_window=10 must be odd'),
    ('eval.ssim_scale', 0.0, r'config.eval.ssim_scale=0.0 must be a finite'),
    ('eval.residual_sigma', -1.0, 'config.eval.residual_sigma=-1.0 must be'),
    ('model.attention_stage', 5, 'must be an encoder stage in 1..4'),
    ('model.attention_stage', 0, 'config.model.attention_stage=0 must be an'),
    ('model.attention_score', 'max', "config.model.attention_score='max'"),
    ('model.attention_norm', 'l2', "config.model.attention_norm='l2'"),
    ('train.eval_every', -1, 'config.train.eval_every=-1 must be'),
    ('eval.threshold_holdout', 1.0, 'threshold_holdout=1.0 must be a finite '
     'number >= 0.0 and < 1.0'),
    ('eval.threshold_quantile', 1.5, 'threshold_quantile=1.5 must be in'),
    ('eval.threshold_quantile', -0.1, 'threshold_quantile=-0.1 must be a'),
])
def test_bad_map_and_attention_settings_are_one_line_errors(
    tiny_config, field, value, expected):
  section, name = field.split('.')
  tiny_config[section][name] = value
  with pytest.raises(CavgaError) as info:
    config_checks.check_config(tiny_config)
  assert expected in str(info.value) and '\n' not in str(info.value)


def test_default_blur_scales_with_the_image_size(tiny_config):
  # None: 4 px per 256 px, so the blur covers the same share of any image;
  # a number is pixels, whatever the size.
  assert tiny_config.eval.residual_sigma is None
  config_checks.check_config(tiny_config)
  for size, sigma in ((256, 4.0), (128, 2.0), (64, 1.0)):
    assert (evaluator_lib.map_settings(
        typed_config.from_config(tiny_config).eval,
        size).residual_sigma == sigma)
  tiny_config.eval.residual_sigma = 3.0
  assert evaluator_lib.map_settings(
      typed_config.from_config(tiny_config).eval, 64).residual_sigma == 3.0
