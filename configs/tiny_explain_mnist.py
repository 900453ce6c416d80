"""Tiny one-class explanation: a few steps, for tests under `tfds.testing.mock_data`."""

from configs import explain_mnist


def get_config():
  config = explain_mnist.get_config()
  config.model.encoder_widths = (8, 16, 16)
  config.model.hidden = 16
  config.model.latent_dim = 4
  config.train.num_steps = 2
  config.train.batch_size = 8
  config.train.log_every = 1
  config.train.checkpoint_every = 2
  config.eval.batch_size = 8
  config.eval.num_panels = 2
  return config
