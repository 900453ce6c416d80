"""Optimizer options, the flat latent and the real datasets, each by what it
must do (tiny models, few steps, few images)."""

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cavga_jax import data
from cavga_jax import sharding
from cavga_jax import typed_config
from cavga_jax.programs import evaluate as eval_lib
from cavga_jax.training import cavga_step
from cavga_jax.training import run_setup
from cavga_jax.training import train_state
from conftest import REPO_ROOT

LR = 1e-2


def _optimizer(**fields):
  return typed_config.OptimizerSettings(
      learning_rate=LR, b1=0.5, b2=0.999, **fields)


def _step_sizes(tx, grads):
  """|update| of one scalar parameter under the gradients ``grads``."""
  params = jnp.zeros(())
  state = tx.init(params)
  sizes = []
  for g in grads:
    updates, state = tx.update(jnp.asarray(g, jnp.float32), state, params)
    sizes.append(float(jnp.abs(updates)))
  return np.array(sizes)


def test_warmup_and_cosine_schedules_set_the_step_size():
  # Adam's step for a constant gradient is lr_t * m_hat / (sqrt(v_hat) +
  # eps) = lr_t (to eps): the step sizes are the learning-rate schedule.
  ones = np.ones(10)
  constant = _step_sizes(train_state.make_optimizer(_optimizer(), 10), ones)
  np.testing.assert_allclose(constant, LR, rtol=1e-5)
  # Linear warmup from 0 over 4 steps, then constant.
  warm = _step_sizes(
      train_state.make_optimizer(_optimizer(warmup_steps=4), 10), ones)
  np.testing.assert_allclose(
      warm, LR * np.minimum(np.arange(10) / 4, 1), rtol=1e-5, atol=1e-9)
  # Warmup, then half a cosine from lr to 0 at num_steps.
  cosine = _step_sizes(
      train_state.make_optimizer(
          _optimizer(schedule='cosine', warmup_steps=2), 10), ones)
  t = np.arange(10)
  expected = np.where(t < 2, LR * t / 2, LR * 0.5 * (1 + np.cos(np.pi *
                                                                (t - 2) / 8)))
  np.testing.assert_allclose(cosine, expected, rtol=1e-5, atol=1e-9)
  assert cosine[2] == pytest.approx(LR, rel=1e-5) and cosine[-1] < 0.05 * LR


def test_grad_clip_norm_clips_the_gradient_adam_sees():
  grads = [
      {'a': jnp.array([30.0, 40.0]), 'b': jnp.array(0.0)},  # norm 50
      {'a': jnp.array([0.3, 0.4]), 'b': jnp.array(0.0)}
  ]  # norm 0.5
  params = jax.tree.map(jnp.zeros_like, grads[0])

  def updates_of(tx, gradients):
    state, out = tx.init(params), []
    for g in gradients:
      update, state = tx.update(g, state, params)
      out.append(update)
    return out

  clipped = updates_of(
      train_state.make_optimizer(_optimizer(grad_clip_norm=1.0), 2), grads)
  # The same as Adam on the gradients scaled to global norm <= 1 by hand.
  by_hand = [jax.tree.map(lambda x: x / 50.0, grads[0]), grads[1]]
  adam = updates_of(optax.adam(LR, b1=0.5, b2=0.999), by_hand)
  for got, want in zip(clipped, adam):
    for name in got:
      np.testing.assert_allclose(got[name], want[name], rtol=1e-6)
  # Without clipping the large first gradient dominates Adam's moments.
  unclipped = updates_of(train_state.make_optimizer(_optimizer(), 2), grads)
  assert not np.allclose(unclipped[1]['a'], clipped[1]['a'], rtol=1e-3)


def test_train_step_with_the_flat_latent(tiny_config):
  tiny_config.model.latent = 'flat'
  mesh = sharding.make_mesh()
  generator, discriminator, init_fn, _ = train_state.setup(
      typed_config.from_config(tiny_config), mesh)
  state = init_fn(jax.random.key(0))
  assert state.gen_params['mu']['kernel'].shape[-1] == (
      tiny_config.model.latent_dim)
  step = jax.jit(
      cavga_step.make_train_step(generator, discriminator,
                                 dict(tiny_config.loss_weights)))
  images = jax.random.randint(jax.random.key(2), (8, 32, 32, 3), 0,
                              256).astype(jnp.uint8)
  new, metrics = step(state, images, jax.random.key(1))
  assert int(new.step) == 1 and not bool(metrics['nonfinite'])
  assert all(np.isfinite(float(v)) for v in metrics.values())
  assert float(metrics['ae']) > 0  # the attention of the flat latent
  # Every dense layer of the flat latent learns, the encoder before it too.
  for name in ('mu', 'logvar', 'flat_to_map'):
    assert not np.array_equal(new.gen_params[name]['kernel'],
                              state.gen_params[name]['kernel']), name
  assert not jax.tree.all(
      jax.tree.map(np.array_equal, new.gen_params['encoder'],
                   state.gen_params['encoder']))


# The real datasets under ../shared/data (MVTec layout): root, category.
_SHARED = pathlib.Path(REPO_ROOT).parent / 'shared' / 'data'
_REAL = [('mvtec_bottle_256', 'bottle'), ('kolektorsdd_256', 'kolektorsdd'),
         ('bsdata_256', 'bsdata')]


def _few_images(source: pathlib.Path, target: pathlib.Path, num: int = 3):
  """Links the first ``num`` images of every split and defect (and their
  masks) of ``source`` (a category folder) into ``target``."""
  for split in ('train', 'test'):
    for defect in sorted(os.listdir(source / split)):
      (target / split / defect).mkdir(parents=True)
      for name in sorted(os.listdir(source / split / defect))[:num]:
        os.symlink(source / split / defect / name,
                   target / split / defect / name)
        mask = (
            source / 'ground_truth' / defect /
            (pathlib.Path(name).stem + '_mask.png'))
        if split == 'test' and defect != 'good':
          (target / 'ground_truth' / defect).mkdir(parents=True, exist_ok=True)
          os.symlink(mask, target / 'ground_truth' / defect / mask.name)


@pytest.mark.parametrize('root, category', _REAL, ids=[c for _, c in _REAL])
def test_a_few_images_of_each_real_category_load_and_evaluate(
    tiny_config, tmp_path, root, category):
  source = _SHARED / root / category
  if not source.is_dir():
    pytest.skip(f'{source} is absent (the real datasets live in '
                '../shared/data beside the repository)')
  _few_images(source, tmp_path / 'data' / category)
  tiny_config.data.name = 'mvtec'
  tiny_config.data.root = str(tmp_path / 'data')
  tiny_config.data.category = category
  # 64 px: KolektorSDD's and BSData's thinnest defects vanish from the
  # masks at 32 px.
  tiny_config.data.image_size = 64
  train_ds, test_ds = run_setup.load_datasets(
      typed_config.from_config(tiny_config), str(tmp_path))
  assert train_ds.images.shape == (3, 64, 64, 3)
  assert train_ds.images.dtype == np.uint8 and not train_ds.labels.any()
  defects = sorted(os.listdir(source / 'test'))
  assert test_ds.num_examples == 3 * len(defects)
  assert sorted(set(test_ds.defect_types)) == defects
  # Every defect image has a non-empty mask, every good one an empty mask.
  has_defect = test_ds.masks.reshape(test_ds.num_examples, -1).any(axis=1)
  np.testing.assert_array_equal(has_defect, test_ds.labels == 1)
  # One evaluation (the untrained tiny networks) with every map.
  result = eval_lib.evaluate(tiny_config, str(tmp_path), untrained=True)
  assert result['num_test_images'] == test_ds.num_examples
  for key in ('pixel_auroc', 'aupro', 'image_auroc', 'iou_held_out'):
    assert 0.0 <= result[key] <= 1.0, key
