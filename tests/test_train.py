"""The train step, checkpoints, resume and non-finite losses (tiny config)."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cavga_jax import checkpointing
from cavga_jax import nonfinite
from cavga_jax import sharding
from cavga_jax import typed_config
from cavga_jax.errors import TrainingError
from cavga_jax.programs import train as train_lib
from cavga_jax.training import cavga_step
from cavga_jax.training import train_state
from cavga_jax.training import training_loop
from conftest import train_with_interruption
from conftest import tree_equal


def test_train_step_lowers_the_loss(tiny_config):
  # Without the adversarial term the objective is stationary, so the VAE
  # terms must fall; the D update still runs every step.
  tiny_config.loss_weights.adv = 0.0
  tiny_config.optimizer.learning_rate = 1e-3
  mesh = sharding.make_mesh()
  generator, discriminator, init_fn, _ = train_state.setup(
      typed_config.from_config(tiny_config), mesh)
  state = init_fn(jax.random.key(0))
  step = jax.jit(
      cavga_step.make_train_step(generator, discriminator,
                                 dict(tiny_config.loss_weights)),
      donate_argnums=0)
  # A fixed batch of smooth images the VAE can learn to reconstruct.
  grid = np.linspace(0, 255, 32)
  image = np.stack([np.add.outer(grid, grid) / 2] * 3, -1).astype(np.uint8)
  images = jnp.asarray(
      np.stack([image, image[::-1], image[:, ::-1],
                image.transpose(1, 0, 2)] * 2))
  history = []
  for _ in range(40):
    state, metrics = step(state, images, jax.random.key(1))
    history.append({k: float(v) for k, v in metrics.items()})
  assert int(state.step) == 40
  assert history[-1]['rec'] < 0.7 * history[0]['rec']
  assert history[-1]['kl'] < history[0]['kl']
  assert set(history[0]) == {
      'rec', 'kl', 'adv', 'ae', 'g_loss', 'd_loss', 'nonfinite'
  }
  assert all(np.isfinite(v) for m in history for v in m.values())
  assert not any(m['nonfinite'] for m in history)


# Steps before the interruption: 2 stops at checkpoint 2; 3 is killed after
# step 3 and its log line, before its checkpoint. CAVGA-D only: resuming is
# the same code for every variant, and CAVGA-R's second-order train step
# took 100-200 s of CI's 1100 s to compile (R trains on one and on eight
# devices in test_sharding).
@pytest.mark.parametrize('first_steps', [2, 3])
def test_resume_after_interrupt_equals_uninterrupted_run(
    tiny_config, tmp_path, first_steps):
  full = train_lib.train(tiny_config, str(tmp_path / 'full'))
  resumed = train_with_interruption(tiny_config, str(tmp_path / 'resumed'),
                                    first_steps)
  assert int(full.step) == int(resumed.step) == tiny_config.train.num_steps
  # The whole state: both networks' parameters, BatchNorm statistics and
  # optimizer states.
  assert tree_equal(full, resumed)
  # The metrics log has one line per logged step, none twice.
  with open(tmp_path / 'resumed' / 'train_metrics.jsonl') as f:
    resumed_log = [json.loads(line) for line in f]
  with open(tmp_path / 'full' / 'train_metrics.jsonl') as f:
    full_log = [json.loads(line) for line in f]
  assert [l['step'] for l in resumed_log] == [2, 4]
  for got, want in zip(resumed_log, full_log):
    assert {k: v for k, v in got.items() if k != 'images_per_s'
           } == {k: v for k, v in want.items() if k != 'images_per_s'}


def test_checkpoint_roundtrip(tiny_config, tmp_path):
  state = train_lib.train(tiny_config, str(tmp_path))
  manager = checkpointing.make_manager(str(tmp_path))
  assert manager.latest_step() == tiny_config.train.num_steps
  restored = checkpointing.restore_latest(manager, state)
  assert tree_equal(state, restored)
  assert restored.gen_tx is state.gen_tx  # static fields survive


def _inject_nan(monkeypatch, bad_step):
  """Makes the loss NaN in the steps where ``bad_step(state.step)`` holds.

  Wraps ``cavga_step.make_train_step`` so that ``train_lib.train`` jits a
  step whose ``rec`` weight is NaN exactly in those steps (the config
  checks reject a NaN weight in the config itself).
  """
  original = cavga_step.make_train_step

  def make_train_step(generator, discriminator, loss_weights, *args):

    def train_step(state, images, rng, labels=None):
      weights = dict(loss_weights)
      weights['rec'] = jnp.where(
          bad_step(state.step), jnp.nan, loss_weights['rec'])
      return original(generator, discriminator, weights, *args)(state, images,
                                                                rng, labels)

    return train_step

  monkeypatch.setattr(cavga_step, 'make_train_step', make_train_step)


def _logged(workdir):
  with open(os.path.join(workdir, 'train_metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def two_good_steps(tmp_path_factory):
  """A tiny run stopped after 2 good steps (stop mode): (workdir, state)."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.train.num_steps = 2
  workdir = tmp_path_factory.mktemp('two_good_steps')
  return workdir, train_lib.train(config, str(workdir))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
    two_good_steps, tiny_config, tmp_path, monkeypatch):
  good_dir, good_state = two_good_steps
  shutil.copytree(good_dir, tmp_path, dirs_exist_ok=True)
  # The resumed run's first step (step 3) has a NaN loss.
  _inject_nan(monkeypatch, lambda step: step >= 2)
  with pytest.raises(TrainingError) as info:
    train_lib.train(tiny_config, str(tmp_path))
  message = str(info.value)
  assert message.startswith('non-finite loss or gradients at step 3 '
                            '(g_loss nan')
  assert 'last good checkpoint (step 2)' in message and '\n' not in message
  manager = checkpointing.make_manager(str(tmp_path))
  assert manager.all_steps() == [2]
  assert tree_equal(good_state,
                    checkpointing.restore_latest(manager, good_state))
  assert [line['step'] for line in _logged(tmp_path)] == [2]


def test_skip_mode_skips_non_finite_steps_and_stops_after_too_many(
    two_good_steps, tiny_config, tmp_path, monkeypatch):
  tiny_config.train.nonfinite = 'skip'
  tiny_config.train.max_consecutive_skips = 2
  tiny_config.train.num_steps = 6
  tiny_config.train.checkpoint_every = 1
  tiny_config.train.keep_checkpoints = 10
  # Updates 3, 5 and 6 (0-based steps 2, 4, 5) have a NaN loss.
  _inject_nan(monkeypatch, lambda step: jnp.isin(step, jnp.array([2, 4, 5])))
  with pytest.raises(
      TrainingError,
      match=(
          r'^2 consecutive steps up to step 6 had non-finite losses or gradients '
          r'and were skipped \(train.max_consecutive_skips=2\); training stopped, '
          r'the last good checkpoint \(step 5\)')):
    train_lib.train(tiny_config, str(tmp_path))

  _, good_state = two_good_steps
  manager = checkpointing.make_manager(str(tmp_path))
  assert manager.all_steps() == [1, 2, 3, 4, 5]
  after = {
      s: checkpointing.restore(manager, s, good_state) for s in (2, 3, 4, 5)
  }
  # Finite steps are those of 'stop' mode (up to rounding: the program
  # differs, so XLA may fuse the batch-norm reductions differently).
  for x, y in zip(jax.tree.leaves(after[2]), jax.tree.leaves(good_state)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  # A skipped step leaves everything but the step counter unchanged.
  assert int(after[3].step) == 3
  assert tree_equal(after[3].replace(step=after[2].step), after[2])
  assert not tree_equal(after[4].gen_params, after[3].gen_params)
  assert tree_equal(after[5].replace(step=after[4].step), after[4])
  assert bool(nonfinite.tree_all_finite(after[5]))
  assert [(line['step'], line['skipped']) for line in _logged(tmp_path)
         ] == [(2, 0), (4, 1)]


def test_writes_config_and_metrics(tiny_config, tmp_path):
  train_lib.train(tiny_config, str(tmp_path))
  assert os.path.exists(tmp_path / 'config.json')
  assert os.path.exists(tmp_path / 'train_metrics.jsonl')


def test_progress_line_gives_the_time_left_at_the_measured_speed():
  line = training_loop._log_line(100, 1000, {'loss': 0.5}, 10.0, 8)
  # 900 steps of 8 images at 10 img/s.
  assert line == 'step 100/1000 | loss 0.5000 | 10.0 img/s | ETA 0:12:00'
  assert 'ETA' not in training_loop._log_line(1000, 1000, {}, 10.0, 8)
