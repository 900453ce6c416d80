"""The Liu et al. VAE experiments end to end (tiny configs, no network)."""

import json
import math
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from cavga_jax import checkpointing
from cavga_jax import sharding
from cavga_jax import typed_config
from cavga_jax.errors import CavgaError
from cavga_jax.programs import evaluate_vae as vae_eval_lib
from cavga_jax.programs import train_vae as vae_lib
from cavga_jax.training import train_state
from configs import tiny_dsprites
from configs import tiny_explain_mnist


def _params(workdir, config):
  mesh = sharding.make_mesh()
  _, init_fn, _ = vae_lib.setup(typed_config.from_config(config), mesh)
  state, _ = checkpointing.restore_for_eval(
      str(workdir), train_state.abstract_state(init_fn, mesh))
  return jax.device_get(state.params)


@pytest.fixture(scope='module')
def dsprites_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('dsprites')
  config = tiny_dsprites.get_config()
  vae_lib.train(config, str(workdir))
  return workdir, config, vae_eval_lib.evaluate(config, str(workdir))


def test_dsprites_train_and_evaluate(dsprites_run):
  workdir, config, result = dsprites_run
  for key in ('factor_vae_train_accuracy', 'factor_vae_eval_accuracy', 'mig',
              'attention_disentanglement_loss', 'mean_negative_elbo',
              'nonzero_unit_maps'):
    assert math.isfinite(result[key]), key
  assert 0 <= result['factor_vae_eval_accuracy'] <= 1
  assert result['checkpoint_step'] == config.train.num_steps
  # One MI row per latent unit, one column per factor.
  assert np.array(result['mutual_info']).shape == (config.model.latent_dim, 5)
  with open(workdir / 'eval' / 'metrics.json') as f:
    assert json.load(f)['mig'] == result['mig']
  panels = sorted(os.listdir(workdir / 'eval' / 'panels'))
  assert len(panels) == config.eval.num_panels
  logged = [json.loads(line) for line in open(workdir / 'train_metrics.jsonl')]
  assert [m['step'] for m in logged] == [1, 2, 3]
  assert all(m['ad'] > 0 for m in logged)
  assert all(0 <= m['nonzero_unit_maps'] <= 1 for m in logged)
  assert result['attention_overlap_loss'] > 0


def test_dsprites_resume_equals_uninterrupted(dsprites_run, tmp_path):
  workdir, config, _ = dsprites_run
  resumed = tmp_path / 'resumed'
  first = tiny_dsprites.get_config()
  first.train.num_steps = 2
  first.train.checkpoint_every = 2
  vae_lib.train(first, str(resumed))
  vae_lib.train(config, str(resumed))
  jax.tree.map(np.testing.assert_array_equal, _params(workdir, config),
               _params(resumed, config))


def test_l_ad_weight_changes_the_update(tmp_path):
  config = tiny_dsprites.get_config()
  config.train.num_steps = 1
  vae_lib.train(config, str(tmp_path / 'ad'))
  config.loss_weights.ad = 0.0
  vae_lib.train(config, str(tmp_path / 'no_ad'))
  with_ad = _params(tmp_path / 'ad', config)
  without = _params(tmp_path / 'no_ad', config)
  # L_AD reaches the mu head (through dmu/dF), never the decoder.
  assert not np.allclose(with_ad['mu']['kernel'], without['mu']['kernel'])
  np.testing.assert_array_equal(with_ad['deconv0']['kernel'],
                                without['deconv0']['kernel'])


def test_distribution_variant_trains_and_changes_the_update(tmp_path):
  config = tiny_dsprites.get_config()
  config.train.num_steps = 1
  config.loss.ad_variant = 'distribution'
  vae_lib.train(config, str(tmp_path / 'distribution'))
  config.loss.ad_variant = 'paper'
  vae_lib.train(config, str(tmp_path / 'paper'))
  assert not np.allclose(
      _params(tmp_path / 'distribution', config)['mu']['kernel'],
      _params(tmp_path / 'paper', config)['mu']['kernel'])
  config.loss.ad_variant = 'iou'
  with pytest.raises(CavgaError, match="config.loss.ad_variant='iou'"):
    vae_lib.train(config, str(tmp_path / 'bad'))


def test_pseudo_masks():
  images = np.zeros((1, 4, 4, 1), np.uint8)
  images[0, 0, :] = 255  # a bar on top
  images[0, :, 1] = 200  # a stroke down column 1
  normal_mean = np.zeros((4, 4))
  normal_mean[:, 1] = 0.6  # the normal class draws column 1
  masks = vae_eval_lib.pseudo_masks(images, normal_mean, support=0.05)
  expected = np.zeros((1, 4, 4), bool)
  expected[0, 0, [0, 2, 3]] = True
  np.testing.assert_array_equal(masks, expected)


def _labels(split):
  source = tfds.data_source('mnist', split=split)
  return np.array([int(source[i]['label']) for i in range(len(source))])


def test_explain_mnist_one_class(tmp_path):
  with tfds.testing.mock_data(num_examples=40):
    train_counts = np.bincount(_labels('train'), minlength=10)
    test_counts = np.bincount(_labels('test'), minlength=10)
    normal = int(np.argmax(train_counts * (test_counts > 0)))
    other = int(np.argmax(np.where(np.arange(10) == normal, -1, test_counts)))
    config = tiny_explain_mnist.get_config()
    config.data.normal_class = normal
    config.eval.explain_class = other
    vae_lib.train(config, str(tmp_path))
    result = vae_eval_lib.evaluate(config, str(tmp_path))
    assert result['num_test_images'] == test_counts[normal] + test_counts[other]
    assert result['num_anomalous_images'] == test_counts[other]
    assert math.isfinite(result['image_auroc'])
    assert len(os.listdir(tmp_path / 'eval' / 'panels')) == 2
    config.eval.explain_class = normal
    with pytest.raises(CavgaError, match='explain_class'):
      vae_eval_lib.evaluate(config, str(tmp_path))
