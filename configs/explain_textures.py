"""Liu et al.'s VAE attention on the embedded generated textures (CAVGA's default data).

  python train.py --config=configs/explain_textures.py --workdir=runs/explain_textures
  python evaluate.py --config=configs/explain_textures.py --workdir=runs/explain_textures

The VAE of `cavga_jax.vae.conv_vae` trained on the normal textures; evaluation
scores
its attention map (`eval.map`: 'mean' of the unit maps or 'sum') against
the exact defect masks with the same protocol and metrics as CAVGA
(`configs/default.py`), so the two methods compare on the same data.
"""

from configs import default
from configs import explain_mnist


def get_config():
  config = explain_mnist.get_config()
  config.data = default.get_config().data
  config.model.encoder_widths = (32, 64, 128)  # 64 px -> 8 x 8 maps
  config.model.latent_dim = 32
  config.train.num_steps = 1200
  config.train.batch_size = 32
  config.train.checkpoint_every = 600
  config.eval.batch_size = 32
  return config
