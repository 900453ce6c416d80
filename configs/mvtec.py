"""CAVGA-R_u on one MVTec AD category at 256 px, the paper's settings.

  python train.py --config=configs/mvtec.py --workdir=runs/bottle \
      --config.data.root=/data/mvtec_anomaly_detection --config.data.category=bottle

Add ``--config.model.pretrained=resnet18_imagenet.npz
--config.model.input_norm=imagenet`` for the ImageNet encoder the paper
fine-tunes (see README), ``--config.model.variant=D`` for
CAVGA-D_u. The headline map is ``default.py``'s ``feature_gaussian``;
``--config.eval.map=attention`` reports the paper's ``1 - A`` under the SPEC
keys instead (every map is in ``metrics.json``'s ``maps`` either way).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = 'mvtec'
  config.data.root = ''
  config.data.category = 'bottle'
  config.data.image_size = 256
  config.model.variant = 'R'
  config.loss_weights.ae = 0.01  # the paper's weight
  config.model.latent_channels = 128
  # () = the paper's widths for the chosen variant (models.PAPER_WIDTHS).
  config.model.encoder_widths = ()
  config.model.decoder_widths = ()
  config.model.discriminator_widths = ()
  config.train.num_steps = 20000
  config.train.batch_size = 16
  config.train.log_every = 100
  config.train.checkpoint_every = 1000
  config.eval.batch_size = 16
  config.eval.num_panels = 16
  return config
