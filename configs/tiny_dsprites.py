"""Tiny dSprites beta-VAE + L_AD: a few steps on a coarse rendered grid, for tests."""

from configs import dsprites


def get_config():
  config = dsprites.get_config()
  config.data.scales = 2
  config.data.orientations = 4
  config.data.positions = 4
  config.model.encoder_widths = (8, 8, 16)
  config.model.hidden = 16
  config.model.latent_dim = 4
  config.loss_weights.ad = 1.0
  config.train.num_steps = 3
  config.train.batch_size = 8
  config.train.log_every = 1
  config.train.checkpoint_every = 3
  config.eval.batch_size = 16
  config.eval.num_panels = 2
  config.eval.factor_vae_num_train = 20
  config.eval.factor_vae_num_eval = 10
  config.eval.factor_vae_num_variance = 64
  config.eval.mig_num_samples = 64
  config.eval.num_loss_samples = 16
  return config
