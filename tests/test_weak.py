"""CAVGA_w: L_bce, L_cga, class Grad-CAM, the weak split, train + evaluate."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cavga_jax import checkpointing
from cavga_jax import config_checks
from cavga_jax import data
from cavga_jax import sharding
from cavga_jax import typed_config
from cavga_jax.data import weak
from cavga_jax.errors import CavgaError
from cavga_jax.errors import DataError
from cavga_jax.models import attention
from cavga_jax.programs import evaluate as eval_lib
from cavga_jax.programs import train as train_lib
from cavga_jax.training import losses
from cavga_jax.training import train_state
from configs import tiny_weak
from conftest import resume_copy_of_run
from conftest import tree_equal

NORMAL_LOGITS, ANOMALOUS_LOGITS = [2.0, 0.0], [0.0, 2.0]


def test_bce_loss_hand_case():
  logits = jnp.array([[0.0, 0.0], [math.log(3.0), 0.0]])
  labels = jnp.array([1, 0])
  # p(anomalous) = 1/2 for image 0; p(normal) = 3/4 for image 1.
  expected = (-math.log(0.5) - math.log(0.75)) / 2
  assert losses.binary_cross_entropy_loss(logits, labels) == pytest.approx(
      expected, rel=1e-6)


def test_cga_loss_hand_case():
  ones, zeros = jnp.ones((2, 2)), jnp.zeros((2, 2))
  a_cn = jnp.stack([ones, jnp.array([[0.5, 1.0], [1.0, 1.0]]), zeros, zeros])
  a_ca = jnp.stack([zeros, jnp.array([[0.0, 0.5], [0.0, 0.0]]), ones, ones])
  logits = jnp.array(
      [NORMAL_LOGITS, NORMAL_LOGITS, NORMAL_LOGITS, ANOMALOUS_LOGITS])
  # Image 0: perfect maps (0); image 1: mean([.5+0, 0+.5, 0, 0]) = 0.25;
  # image 2 is anomalous and image 3 is predicted anomalous: excluded.
  labels = jnp.array([0, 0, 1, 0])
  value = losses.complementary_guided_attention_loss(a_cn, a_ca, logits, labels)
  assert value == pytest.approx((0.0 + 0.25) / 4)  # divided by the batch size


def test_cga_loss_is_zero_without_correct_normal_predictions():
  a = jax.random.uniform(jax.random.key(0), (3, 2, 2))
  logits = jnp.array([ANOMALOUS_LOGITS, NORMAL_LOGITS, ANOMALOUS_LOGITS])
  labels = jnp.array([0, 1, 1])

  def loss(a_cn, a_ca):
    return losses.complementary_guided_attention_loss(a_cn, a_ca, logits,
                                                      labels)

  assert float(loss(a, a)) == 0.0
  grads = jax.grad(loss, argnums=(0, 1))(a, a)
  assert all(bool(jnp.all(g == 0.0)) for g in grads)


def test_class_grad_cam_on_a_linear_classifier():
  # logits_bc = sum_ijk W_cijk F_bijk + b_c: d logit_c / dF = W_c, so
  # alpha_ck = mean_ij W_cijk and A_c = ReLU(F . alpha_c) / max.
  features = jax.random.normal(jax.random.key(0), (3, 4, 5, 6))
  weights = np.asarray(jax.random.normal(jax.random.key(1), (2, 4, 5, 6)))
  bias = jnp.array([0.3, -0.2])
  logit_fn = lambda f: jnp.einsum('bhwk,chwk->bc', f, weights) + bias
  maps, logits = attention.class_grad_cam(logit_fn, features)
  assert maps.shape == (3, 2, 4, 5)
  np.testing.assert_allclose(logits, logit_fn(features), rtol=1e-6)
  for c in range(2):
    alpha = weights[c].mean(axis=(0, 1))
    cam = np.maximum(np.einsum('bhwk,k->bhw', np.asarray(features), alpha), 0)
    expected = cam / (cam.max(axis=(1, 2), keepdims=True) + 1e-8)
    np.testing.assert_allclose(maps[:, c], expected, rtol=1e-5, atol=1e-6)
    # The same map as single-score Grad-CAM of logit c.
    np.testing.assert_allclose(
        maps[:, c],
        attention.grad_cam(lambda f: logit_fn(f)[:, c], features),
        rtol=1e-5,
        atol=1e-6)


def test_class_grad_cam_second_order_matches_finite_differences():
  with jax.enable_x64(True):
    features = jax.random.normal(jax.random.key(0), (2, 3, 3, 4), jnp.float64)
    params = jax.random.normal(jax.random.key(1), (4, 2), jnp.float64)
    labels = jnp.array([0, 0])

    def loss(p):
      logit_fn = lambda f: jnp.sum(jnp.tanh(f @ p), axis=(1, 2))
      maps, logits = attention.class_grad_cam(logit_fn, features)
      return losses.complementary_guided_attention_loss(maps[:, 0], maps[:, 1],
                                                        jnp.zeros_like(logits),
                                                        labels)

    grad = np.asarray(jax.grad(loss)(params))
    assert np.abs(grad).max() > 0
    eps = 1e-6
    for index in [(0, 0), (3, 1)]:
      delta = np.zeros(params.shape)
      delta[index] = eps
      fd = (loss(params + delta) - loss(params - delta)) / (2 * eps)
      assert grad[index] == pytest.approx(float(fd), rel=1e-5, abs=1e-9)


def _weak_generator():
  # The tiny CAVGA_w models and state initialiser of train_lib.train, so the
  # compiled initialiser is shared (compilation cache) with the training test.
  config = tiny_weak.get_config()
  generator, _, init_fn, _ = train_state.setup(
      typed_config.from_config(config), sharding.make_mesh())
  state = init_fn(jax.random.key(1))
  variables = {'params': state.gen_params, 'batch_stats': state.gen_batch_stats}
  x = jax.random.uniform(jax.random.key(0), (3, 32, 32, 3), minval=-1, maxval=1)
  return generator, variables, x


def test_forward_with_attention_gives_the_class_maps_of_the_logits():
  generator, variables, x = _weak_generator()
  params = variables['params']
  forward = jax.jit(lambda rng: attention.forward_with_attention(
      generator, params, variables['batch_stats'], x, rng, train=False)[0])
  for rng in (None, jax.random.key(2)):
    outputs = forward(rng)
    assert outputs['class_attention'].shape == (3, 2, 2, 2)
    # The logits are the classifier's on the z that is decoded.
    np.testing.assert_allclose(
        outputs['logits'],
        generator.apply({'params': params}, outputs['z'], method='classify'),
        rtol=1e-5,
        atol=1e-6)
    if rng is None:
      np.testing.assert_array_equal(outputs['z'], outputs['mu'])

      def logit_fn(f):
        mu, _ = generator.apply({'params': params}, f, method='latent_params')
        return generator.apply({'params': params}, mu, method='classify')

      direct, _ = attention.class_grad_cam(logit_fn, outputs['features'])
      np.testing.assert_allclose(
          outputs['class_attention'], direct, rtol=1e-5, atol=1e-6)
      # CAVGA_u's map is still there, unchanged.
      sum_mu = attention.grad_cam(
          lambda f: generator.apply(
              {'params': params}, f, method='latent_params')[0].sum((1, 2, 3)),
          outputs['features'])
      np.testing.assert_allclose(
          outputs['attention'], sum_mu, rtol=1e-5, atol=1e-6)


def test_weak_localization_maps():
  class_attention = jnp.array([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # (1, 2, 1, 2)
  outputs = dict(
      class_attention=class_attention, attention=jnp.array([[[0.25, 0.75]]]))
  expected = {
      'anomalous': [0.0, 1.0], 'not_normal': [0.0, 1.0],
      'complementary': [0.0, 1.0], 'latent': [0.75, 0.25]
  }
  for name in attention.WEAK_MAPS:
    m = attention.weak_localization_map(outputs, 2, name)
    assert m.shape == (1, 2, 2)
    np.testing.assert_allclose(m[0, 0], expected[name], atol=1e-6)
  with pytest.raises(ValueError, match='weak_map'):
    attention.weak_localization_map(outputs, 2, 'nope')


def _test_split(counts):
  """An in-memory test split: 'good' plus defect types with given counts."""
  defects = ['good'] * 5 + [d for d, n in counts.items() for _ in range(n)]
  names = [f'/data/cat/test/{d}/{i:03d}.png' for i, d in enumerate(defects)]
  n = len(defects)
  images = np.arange(
      n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 1), np.uint8)
  return data.AnomalyDataset(
      images=images,
      masks=np.zeros((n, 2, 2), bool),
      labels=np.array([d != 'good' for d in defects], np.int32),
      defect_types=tuple(defects),
      paths=tuple(names))


def _train_split():
  return data.AnomalyDataset(
      images=np.full((4, 2, 2, 1), 200, np.uint8),
      masks=np.zeros((4, 2, 2), bool),
      labels=np.zeros(4, np.int32),
      defect_types=('good',) * 4,
      paths=tuple(f'/data/cat/train/good/{i}.png' for i in range(4)))


def test_weak_split_moves_a_few_anomalies_without_leaking():
  test = _test_split({'crack': 250, 'hole': 20, 'scratch': 1})
  result = weak.split(
      _train_split(), test, fraction=0.01, min_per_defect=1, seed=0)
  moved_paths = set(result.train.paths[4:])
  # crack: round(2.5) = 3 (halves round up); hole: max(1, round(0.2)) = 1;
  # scratch: its only image stays in the test set.
  per_defect = result.record['per_defect']
  assert {d: c['moved'] for d, c in per_defect.items()
         } == {'crack': 3, 'hole': 1, 'scratch': 0}
  assert len(moved_paths) == 4
  assert np.all(result.train.labels[4:] == 1)
  assert np.all(result.train.labels[:4] == 0)
  # No training anomaly is in the test set; nothing else was lost.
  assert moved_paths.isdisjoint(result.test.paths)
  assert sorted(result.test.paths + tuple(moved_paths)) == sorted(test.paths)
  # Images follow their paths.
  for path, image in zip(result.train.paths[4:], result.train.images[4:]):
    assert int(image[0, 0, 0]) == test.paths.index(path) % 256
  # Deterministic, and a function of the seed.
  again = weak.split(
      _train_split(), test, fraction=0.01, min_per_defect=1, seed=0)
  np.testing.assert_array_equal(result.moved, again.moved)
  other = weak.split(
      _train_split(), test, fraction=0.01, min_per_defect=1, seed=1)
  assert not np.array_equal(result.moved, other.moved)


def test_weak_split_file_is_written_and_checked(tmp_path):
  test = _test_split({'crack': 6, 'hole': 3})
  data_settings = typed_config.DataSettings(
      image_size=32, weak_fraction=0.01, weak_min_per_defect=2, weak_seed=3)
  train_w, test_w = weak.apply_weak_split(data_settings, str(tmp_path),
                                          _train_split(), test)
  with open(tmp_path / weak.SPLIT_FILE) as f:
    record = json.load(f)
  assert [m['path'] for m in record['moved']] == list(train_w.paths[4:])
  assert record['num_test_after'] == test_w.num_examples == 5 + 9 - 4
  assert record['seed'] == 3
  # The same config reproduces the file; another selection is refused.
  weak.apply_weak_split(data_settings, str(tmp_path), _train_split(), test)
  data_settings = dataclasses.replace(data_settings, weak_seed=4)
  with pytest.raises(DataError, match='differs from the one this workdir'):
    weak.apply_weak_split(data_settings, str(tmp_path), _train_split(), test)


def test_weak_split_needs_anomalies():
  test = _test_split({})
  with pytest.raises(DataError, match='has none'):
    weak.split(_train_split(), test)


def _weak_labels(num_normal=20, num_anomalous=3):
  # As weak.split lays the train split out: the normal images, then the
  # moved anomalies.
  return np.array([0] * num_normal + [1] * num_anomalous, np.int32)


@pytest.mark.parametrize('num_anomalous', [1, 3, 7])
def test_quota_batch_indices_holds_the_quota_and_covers_the_normals(
    num_anomalous):
  labels = _weak_labels(20, num_anomalous)
  batch_size, quota, seed = 8, 3, 5
  steps = 40
  batches = [
      data.quota_batch_indices(labels, batch_size, quota, step, seed)
      for step in range(steps)
  ]
  for step, idx in enumerate(batches):
    assert idx.shape == (batch_size,) and idx.dtype == np.int64
    assert np.all((idx >= 0) & (idx < labels.size))
    assert int(labels[idx].sum()) == quota
    # A pure function of (seed, step): a resumed run draws the same batch.
    np.testing.assert_array_equal(
        idx, data.quota_batch_indices(labels, batch_size, quota, step, seed))
  normal_draws = np.concatenate([idx[labels[idx] == 0] for idx in batches])
  anomalous_draws = np.concatenate([idx[labels[idx] == 1] for idx in batches])
  # The normal stream is an epoch permutation of the 20 normal images at 5
  # per step: each pass of 4 steps visits every normal image once.
  for start in range(0, steps, 4):
    window = normal_draws[start * 5:(start + 4) * 5]
    assert sorted(window) == list(range(20))
  # Anomalies cycle too: every one is drawn equally often (120 = 40 * 3
  # draws), repeating within a batch when there are fewer than the quota.
  counts = np.bincount(anomalous_draws - 20, minlength=num_anomalous)
  assert counts.max() - counts.min() <= 1 and counts.sum() == steps * quota
  # The anomalies are not always in the same rows (or on the same host).
  rows = np.array([labels[idx] for idx in batches])
  assert len({tuple(r) for r in rows}) > 1
  # Another seed, another order.
  assert not np.array_equal(
      batches[0], data.quota_batch_indices(labels, batch_size, quota, 0, 6))


def test_quota_batch_indices_zero_is_uniform_sampling_and_errors():
  labels = _weak_labels(20, 3)
  for step in range(5):
    np.testing.assert_array_equal(
        data.quota_batch_indices(labels, 8, 0, step, 2),
        data.epoch_permutation_indices(23, 8, step, 2))
  with pytest.raises(DataError, match='0 anomalous'):
    data.quota_batch_indices(_weak_labels(20, 0), 8, 2, 0, 0)
  with pytest.raises(DataError, match='must be < batch_size=8'):
    data.quota_batch_indices(labels, 8, 8, 0, 0)


def test_train_batches_draws_the_index_fn_batches_when_resumed():
  labels = _weak_labels(20, 3)
  images = np.arange(labels.size, dtype=np.uint8)[:, None]

  def index_fn(step):
    return data.quota_batch_indices(labels, 8, 2, step, 1)

  with data.TrainBatches(
      images, 8, seed=1, start_step=3, index_fn=index_fn) as batches:
    for step in range(3, 7):
      np.testing.assert_array_equal(next(batches)[:, 0], index_fn(step))
  with data.TrainBatches(
      images, 8, seed=1, index_fn=lambda step: np.arange(4)) as batches:
    with pytest.raises(DataError, match=r'shape \(4,\), expected \(8,\)'):
      next(batches)


@pytest.mark.parametrize('quota, supervision, expected', [
    (8, 'weak', 'config.data.weak_anomalies_per_batch=8 must be < '
     'config.train.batch_size=8'),
    (-1, 'weak', 'config.data.weak_anomalies_per_batch=-1 must be an integer '
     '>= 0'),
    (2, 'unsupervised', "config.data.weak_anomalies_per_batch=2 needs "
     "config.model.supervision='weak'"),
])
def test_check_config_rejects_bad_anomaly_quotas(quota, supervision, expected):
  config = tiny_weak.get_config()
  config.data.weak_anomalies_per_batch = quota
  config.model.supervision = supervision
  config.eval.map = 'attention'  # A map every supervision has.
  with pytest.raises(CavgaError) as info:
    config_checks.check_config(config)
  assert expected in str(info.value) and '\n' not in str(info.value)
  config.data.weak_anomalies_per_batch = 0  # Uniform sampling: always valid.
  config_checks.check_config(config)


def test_weak_config_without_weak_loss_weights_is_a_clear_error(tmp_path):
  config = tiny_weak.get_config()
  del config.loss_weights['cga']
  with pytest.raises(CavgaError, match='cga'):
    train_lib.train(config, str(tmp_path))


def test_tiny_weak_train_resume_and_evaluate(tmp_path):
  config = tiny_weak.get_config()
  full = train_lib.train(config, str(tmp_path / 'full'))
  # Resume determinism: killed before checkpoint 4 (checkpoint 2 kept),
  # resumed to 4, equals 4 steps in one go: the whole state, both
  # optimizers included.
  resumed = resume_copy_of_run(config, str(tmp_path / 'full'),
                               str(tmp_path / 'resumed'))
  assert tree_equal(full, resumed)
  assert 'classifier' in full.gen_params

  workdir = tmp_path / 'full'
  with open(workdir / 'train_metrics.jsonl') as f:
    logged = [json.loads(line) for line in f]
  assert {'rec', 'kl', 'adv', 'bce', 'cga', 'g_loss', 'd_loss',
          'cls_accuracy'} <= set(logged[0])
  assert 'ae' not in logged[0]  # not part of CAVGA_w's objective
  assert all(np.isfinite(v) for line in logged for v in line.values())
  # cls_accuracy is measured on batches holding the configured quota of
  # labelled anomalies (2 of 8), not on all-normal batches.
  quota = config.data.weak_anomalies_per_batch
  assert quota == 2
  batch_size = config.train.batch_size
  assert [line['step'] for line in logged] == [2, 4]
  for line in logged:
    assert line['anomalous_fraction'] == quota / batch_size
    assert line['cls_accuracy'] * batch_size == pytest.approx(
        round(line['cls_accuracy'] * batch_size))
  with open(tmp_path / 'resumed' / 'train_metrics.jsonl') as f:
    resumed_logged = [json.loads(line) for line in f]
  drop_speed = lambda lines: [
      {k: v for k, v in line.items() if k != 'images_per_s'} for line in lines
  ]
  assert drop_speed(resumed_logged) == drop_speed(logged)

  with open(workdir / 'weak_split.json') as f:
    split = json.load(f)
  assert split['num_train_anomalous'] == 3  # one per defect type

  result = eval_lib.evaluate(config, str(workdir))
  with open(workdir / 'eval' / 'metrics.json') as f:
    saved = json.load(f)
  # 4 good + 3 defect types x (3 - 1 moved to training).
  assert saved['num_test_images'] == result['num_test_images'] == 10
  assert saved['num_anomalous_images'] == 6
  for key in ('pixel_auroc', 'iou', 'image_auroc', 'detection_accuracy_minmax',
              'detection_accuracy_held_out', 'aupro', 'image_auroc_classifier',
              'classifier_accuracy_argmax'):
    assert 0.0 <= saved[key] <= 1.0, key
  with open(workdir / 'eval' / 'scores.csv') as f:
    lines = f.read().splitlines()
  assert lines[0].endswith(',p_anomalous') and len(lines) == 11
  moved = {m['path'] for m in split['moved']}
  assert moved.isdisjoint(line.split(',')[0] for line in lines[1:])
  assert checkpointing.make_manager(str(workdir)).latest_step() == 4
