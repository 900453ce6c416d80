"""Liu et al.'s attention disentanglement on dSprites: beta-VAE (+ L_AD).

  python train.py --config=configs/dsprites.py --workdir=runs/dsprites/beta_vae
  python train.py --config=configs/dsprites.py --workdir=runs/dsprites/ad \
      --config.loss_weights.ad=1.0
  python evaluate.py --config=configs/dsprites.py --workdir=runs/dsprites/ad

Evaluation writes the FactorVAE metric and MIG (`cavga_jax.vae.disentanglement`)
to `<workdir>/eval/metrics.json` and one row of per-unit attention maps per
panel. `data.name='rendered_sprites'` (default) renders the dSprites factor
grid procedurally (no download); `'dsprites'` reads the TFDS dataset
(`config.data.root` = TFDS data_dir; see the README for the one-time
preparation).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.task = (
      'vae'  # cavga_jax.programs.train_vae (train.py and evaluate.py dispatch)
  )
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.name = 'rendered_sprites'  # or 'dsprites' (TFDS)
  config.data.root = ''  # TFDS data_dir for 'dsprites'; '' = TFDS default
  config.data.download = True  # prepare the TFDS dataset if missing
  # rendered_sprites grid (dSprites: 6 scales, 40 orientations, 32 positions).
  config.data.scales = 6
  config.data.orientations = 40
  config.data.positions = 32
  config.data.image_size = 64
  config.data.channels = 1

  # The beta-VAE of Higgins et al. / Burgess et al. (cavga_jax.vae.conv_vae).
  config.model = ml_collections.ConfigDict()
  config.model.encoder_widths = (32, 32, 64, 64)
  config.model.hidden = 256
  config.model.latent_dim = 10
  config.model.conv_impl = 'auto'  # 'phase' on CPU, 'lax' elsewhere (layers)

  # rec + beta * kl + ad * L_AD (per-image sums, batch mean).
  config.loss_weights = ml_collections.ConfigDict(dict(beta=4.0, ad=0.0))
  # Which L_AD (cavga_jax.training.losses.AD_VARIANTS): 'paper'
  # (docs/protocol.md
  # section 3, a soft IoU of the ReLU'd unit maps; all-zero maps minimise it) or
  # 'distribution' (overlap of the raw cams as spatial distributions, which
  # switching a map off cannot lower).
  config.loss = ml_collections.ConfigDict(dict(ad_variant='paper'))

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 5e-4
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.999
  config.optimizer.schedule = 'constant'
  config.optimizer.warmup_steps = 0
  config.optimizer.grad_clip_norm = 0.0

  config.train = ml_collections.ConfigDict()
  config.train.num_steps = 20000
  config.train.batch_size = 64
  config.train.log_every = 500
  config.train.checkpoint_every = 5000
  config.train.keep_checkpoints = 2
  config.train.prefetch = 2

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 256
  config.eval.num_panels = 8
  config.eval.map = 'mean'  # panels/maps: 'mean' of the unit maps or 'sum'
  config.eval.metric_seed = 0
  # Kim & Mnih's FactorVAE metric: votes of 64 images each.
  config.eval.factor_vae_num_train = 10000
  config.eval.factor_vae_num_eval = 5000
  config.eval.factor_vae_num_variance = 10000
  config.eval.mig_num_samples = 10000
  config.eval.num_loss_samples = 1024  # images for the mean losses and panels
  return config
