"""One-class CIFAR-10 with CAVGA-D_u: 32 px RGB, otherwise as `configs/mnist.py`.

  python scripts/one_class.py --config=configs/cifar10.py --workdir=runs/cifar10

5,000 training images per class: 3,000 steps of 64 is ~38 epochs.
"""

from configs import mnist


def get_config():
  config = mnist.get_config()
  config.data.name = 'cifar10'
  config.data.channels = 3
  return config
