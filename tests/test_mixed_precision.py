"""bf16 compute (config.model.compute_dtype) with float32 state."""

import jax
import jax.numpy as jnp
import numpy as np

from cavga_jax import sharding
from cavga_jax import typed_config
from cavga_jax.training import cavga_step
from cavga_jax.training import train_state
from configs import tiny


def _one_step(compute_dtype):
  config = tiny.get_config()
  config.model.compute_dtype = compute_dtype
  mesh = sharding.make_mesh()
  generator, discriminator, init_fn, _ = train_state.setup(
      typed_config.from_config(config), mesh)
  state = init_fn(jax.random.key(0))
  step = jax.jit(
      cavga_step.make_train_step(generator, discriminator,
                                 dict(config.loss_weights)))
  images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), np.uint8)
  new_state, metrics = step(state, images, jax.random.key(1))
  return state, new_state, jax.device_get(metrics)


def test_bfloat16_compute_keeps_float32_state_and_close_losses():
  _, state32, metrics32 = _one_step('float32')
  initial, state16, metrics16 = _one_step('bfloat16')
  # Parameters, optimizer state and BatchNorm statistics stay float32.
  for tree in (state16.gen_params, state16.gen_opt_state,
               state16.gen_batch_stats, state16.disc_params,
               state16.disc_batch_stats):
    for leaf in jax.tree.leaves(tree):
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        assert leaf.dtype == jnp.float32
  # The update happened and the losses match float32 to bf16 precision.
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                       initial.gen_params, state16.gen_params)
  assert max(jax.tree.leaves(moved)) > 0
  for name, value in metrics32.items():
    assert np.isfinite(metrics16[name]), name
    assert metrics16[name].dtype == np.float32, name
    np.testing.assert_allclose(
        metrics16[name], value, rtol=0.05, atol=0.02, err_msg=name)
  del state32
