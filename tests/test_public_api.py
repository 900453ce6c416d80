"""The package's public API and the image-dtype contract of the steps."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cavga_jax
from configs import tiny


def test_every_public_name_resolves():
  for name in cavga_jax.__all__:
    assert getattr(cavga_jax, name) is not None, name
  assert callable(cavga_jax.make_train_step)
  assert callable(cavga_jax.explain.explain)
  with pytest.raises(AttributeError, match='no_such_name'):
    getattr(cavga_jax, 'no_such_name')


def test_import_is_lazy():
  # The package import itself loads no training, data or evaluation code.
  code = (
      'import sys, cavga_jax; '
      'print(any(m.startswith(("cavga_jax.programs", "cavga_jax.data", '
      '"cavga_jax.training", "cavga_jax.evaluation")) for m in sys.modules))')
  out = subprocess.run([sys.executable, '-c', code],
                       capture_output=True,
                       text=True,
                       check=True).stdout.strip()
  assert out == 'False'


def _plain_step():
  config = tiny.get_config()
  generator, discriminator = cavga_jax.build_models(config)
  state = cavga_jax.create_train_state(
      generator, discriminator, jax.random.key(0), image_size=32)
  weights = dict(rec=1.0, kl=1.0, adv=1.0, ae=0.01)
  step = jax.jit(cavga_jax.make_train_step(generator, discriminator, weights))
  return state, step


def test_train_step_from_plain_arguments_reads_uint8_and_float_alike():
  state, step = _plain_step()
  images = np.random.default_rng(0).integers(
      0, 256, (4, 32, 32, 3), dtype=np.uint8)
  rng = jax.random.key(1)
  _, from_uint8 = step(state, jnp.asarray(images), rng)
  as_float = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
  _, from_float = step(state, as_float, rng)
  for name in ('rec', 'kl', 'adv', 'ae', 'g_loss', 'd_loss'):
    assert float(from_uint8[name]) == pytest.approx(
        float(from_float[name]), rel=1e-5), name
  assert float(from_uint8['nonfinite']) == 0.0


def test_steps_reject_ambiguous_image_dtypes():
  state, step = _plain_step()
  with pytest.raises(TypeError, match='uint8 in \\[0, 255\\] or floating'):
    step(state, jnp.zeros((4, 32, 32, 3), jnp.int32), jax.random.key(1))
