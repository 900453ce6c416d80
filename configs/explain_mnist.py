"""Liu et al.'s one-class localization: a VAE on one MNIST digit explains another.

  python train.py --config=configs/explain_mnist.py --workdir=runs/explain_mnist
  python evaluate.py --config=configs/explain_mnist.py --workdir=runs/explain_mnist

Trains on the training images of `data.normal_class` (1); evaluation
explains the test images of `eval.explain_class` (7) among the normal test
images: per-unit Grad-CAM maps of `mu`, the anomaly map `eval.map` ('mean'
of the unit maps, Liu et al.'s), image AUROC of the negative ELBO, and
pixel metrics against a pseudo-mask (strokes outside the normal class's
support; `cavga_jax.programs.train_vae`). Data comes from TFDS (see the README
for the
one-time preparation); images are resized 28 -> 32 px.
"""

import ml_collections

from configs import dsprites


def get_config() -> ml_collections.ConfigDict:
  config = dsprites.get_config()
  config.data = ml_collections.ConfigDict()
  config.data.name = 'mnist'  # or 'fashion_mnist'
  config.data.root = ''  # TFDS data_dir; '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
  config.data.category = ''  # unused by TFDS datasets
  config.data.download = True
  config.data.normal_class = 1
  config.data.image_size = 32
  config.data.channels = 1

  config.model.encoder_widths = (32, 64, 128)
  config.model.latent_dim = 32
  config.loss_weights.beta = 1.0

  # ~6,700 images of 1s: 3,000 steps of 64 is ~29 epochs.
  config.train.num_steps = 3000
  config.train.log_every = 100
  config.train.checkpoint_every = 1000

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 256
  config.eval.num_panels = 8
  config.eval.explain_class = 7
  config.eval.map = 'mean'  # 'mean' of the unit maps (Liu et al.) or 'sum'
  config.eval.pseudo_mask_support = 0.05
  return config
