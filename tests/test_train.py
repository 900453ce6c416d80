"""The train step, checkpoints, resume and non-finite losses (tiny config)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cavga_jax import checkpointing
from cavga_jax import sharding
from cavga_jax import train_lib
from cavga_jax.errors import TrainingError


def _tree_equal(a, b):
  return all(jax.tree.leaves(jax.tree.map(
      lambda x, y: bool(jnp.array_equal(x, y)), a, b)))


def test_train_step_lowers_the_loss(tiny_config):
  # Without the adversarial term the objective is stationary, so the VAE
  # terms must fall; the D update still runs every step.
  tiny_config.loss_weights.adv = 0.0
  tiny_config.optimizer.learning_rate = 1e-3
  mesh = sharding.make_mesh()
  generator, discriminator, init_fn, _ = train_lib.setup(tiny_config, mesh)
  state = init_fn(jax.random.key(0))
  step = jax.jit(train_lib.make_train_step(
      generator, discriminator, dict(tiny_config.loss_weights)),
                 donate_argnums=0)
  # A fixed batch of smooth images the VAE can learn to reconstruct.
  grid = np.linspace(0, 255, 32)
  image = np.stack([np.add.outer(grid, grid) / 2] * 3, -1).astype(np.uint8)
  images = jnp.asarray(np.stack([image, image[::-1], image[:, ::-1],
                                 image.transpose(1, 0, 2)] * 2))
  history = []
  for _ in range(40):
    state, metrics = step(state, images, jax.random.key(1))
    history.append({k: float(v) for k, v in metrics.items()})
  assert int(state.step) == 40
  assert history[-1]['rec'] < 0.7 * history[0]['rec']
  assert history[-1]['kl'] < history[0]['kl']
  assert set(history[0]) == {'rec', 'kl', 'adv', 'ae', 'g_loss', 'd_loss'}
  assert all(np.isfinite(v) for m in history for v in m.values())


def test_resume_after_interrupt_equals_uninterrupted_run(tiny_config,
                                                         tmp_path):
  full = train_lib.train(tiny_config, str(tmp_path / 'full'))
  interrupted = tiny_config.copy_and_resolve_references()
  interrupted.train.num_steps = 2
  train_lib.train(interrupted, str(tmp_path / 'resumed'))
  resumed = train_lib.train(tiny_config, str(tmp_path / 'resumed'))
  assert int(full.step) == int(resumed.step) == tiny_config.train.num_steps
  assert _tree_equal((full.gen_params, full.gen_batch_stats, full.disc_params,
                      full.gen_opt_state),
                     (resumed.gen_params, resumed.gen_batch_stats,
                      resumed.disc_params, resumed.gen_opt_state))
  # The metrics log has one line per logged step of both runs.
  with open(tmp_path / 'resumed' / 'train_metrics.jsonl') as f:
    assert len(f.readlines()) == tiny_config.train.num_steps // 2


def test_checkpoint_roundtrip(tiny_config, tmp_path):
  state = train_lib.train(tiny_config, str(tmp_path))
  manager = checkpointing.make_manager(str(tmp_path))
  assert manager.latest_step() == tiny_config.train.num_steps
  restored = checkpointing.restore_latest(manager, state)
  assert _tree_equal(state, restored)
  assert restored.gen_tx is state.gen_tx  # static fields survive


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
    tiny_config, tmp_path):
  good = tiny_config.copy_and_resolve_references()
  good.train.num_steps = 2
  state = train_lib.train(good, str(tmp_path))
  broken = tiny_config.copy_and_resolve_references()
  broken.loss_weights.rec = float('nan')
  with pytest.raises(TrainingError, match='non-finite loss at step 4'):
    train_lib.train(broken, str(tmp_path))
  manager = checkpointing.make_manager(str(tmp_path))
  assert manager.latest_step() == 2
  assert _tree_equal(state.gen_params,
                     checkpointing.restore_latest(manager, state).gen_params)


def test_writes_config_and_metrics(tiny_config, tmp_path):
  train_lib.train(tiny_config, str(tmp_path))
  assert os.path.exists(tmp_path / 'config.json')
  assert os.path.exists(tmp_path / 'train_metrics.jsonl')
