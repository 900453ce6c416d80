"""One-class Fashion-MNIST with CAVGA-D_u: as `configs/mnist.py`, other data.

  python scripts/one_class.py --config=configs/fashion_mnist.py --workdir=runs/fashion_mnist
"""

from configs import mnist


def get_config():
  config = mnist.get_config()
  config.data.name = 'fashion_mnist'
  return config
