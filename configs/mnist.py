"""One-class MNIST with CAVGA-D_u: train on one digit, test on all ten.

  python train.py --config=configs/mnist.py --workdir=runs/mnist/class_3 \
      --config.data.normal_class=3
  python evaluate.py --config=configs/mnist.py --workdir=runs/mnist/class_3 \
      --config.data.normal_class=3
  python scripts/one_class.py --config=configs/mnist.py --workdir=runs/mnist

The test set is the full MNIST test split with `normal_class` as normal and
the other nine digits anomalous; read `image_auroc_reconstruction` (the
image AUROC of s_a, docs/protocol.md section 4) or the headline map's
`image_auroc` (no masks, so the localization metrics are NaN). Images are resized 28 -> 32 px. Data comes
from TFDS (`config.data.root` is the TFDS data_dir, '' for its default);
see the README for the one-time preparation.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = 'mnist'  # 'mnist' | 'fashion_mnist' | 'cifar10'
  config.data.root = ''  # TFDS data_dir; '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
  config.data.category = ''  # unused by TFDS datasets
  config.data.normal_class = 0  # the one class trained on, in [0, 10)
  config.data.download = True  # prepare the TFDS dataset if it is missing
  config.data.image_size = 32
  config.data.channels = 1
  config.model.variant = 'D'
  config.model.latent_channels = 128
  # () = the paper's DCGAN widths (models.PAPER_WIDTHS).
  config.model.encoder_widths = ()
  config.model.decoder_widths = ()
  config.model.discriminator_widths = ()
  # ~6,000 training images per class: 3,000 steps of 64 is ~32 epochs.
  config.train.num_steps = 3000
  config.train.batch_size = 64
  config.train.log_every = 100
  config.train.checkpoint_every = 1000
  config.eval.batch_size = 256
  config.eval.num_panels = 8
  return config
