"""Tiny: a few steps on 32 px generated images, for tests and smoke checks (< 1 min)."""

from configs import default


def get_config():
  config = default.get_config()
  config.data.image_size = 32
  config.data.num_train = 16
  config.data.num_test_good = 4
  config.data.num_test_per_defect = 2
  config.model.latent_channels = 8
  config.model.latent_dim = 16
  config.model.encoder_widths = (8, 16, 16, 32)
  config.model.decoder_widths = (32, 16, 16, 8)
  config.model.discriminator_widths = (8, 8, 16, 16)
  config.train.num_steps = 4
  config.train.batch_size = 8
  config.train.log_every = 2
  config.train.checkpoint_every = 2
  config.eval.batch_size = 8
  config.eval.num_panels = 2
  return config
