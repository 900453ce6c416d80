"""Tiny one-class MNIST: a few steps at 32 px, for tests under `tfds.testing.mock_data`."""

from configs import tiny


def get_config():
  config = tiny.get_config()
  config.data.name = 'mnist'
  config.data.root = ''
  config.data.category = ''
  config.data.normal_class = 0
  config.data.download = True  # a no-op under tfds.testing.mock_data
  config.data.channels = 1
  config.train.num_steps = 2
  config.train.checkpoint_every = 2
  return config
