"""CAVGA_w trained on normal images only, with synthetic anomalies as labels.

  python train.py --config=configs/mvtec_synthetic.py --workdir=runs/bottle_s \
      --config.data.root=/data/mvtec_anomaly_detection --config.data.category=bottle
  python evaluate.py --config=configs/mvtec_synthetic.py --workdir=runs/bottle_s \
      --config.data.root=/data/mvtec_anomaly_detection --config.data.category=bottle

No defect image is labelled or moved out of the test set: half of every
batch becomes synthetic anomalies inside the train step
(``cavga_jax.training.synthesis``: Perlin / polygon / scratch masks filled from
another
image, the same image elsewhere, a procedural texture or a colour shift), with
exact masks. The objective is CAVGA_w's ``rec + kl + adv + 0.001 bce + 0.01
cga`` plus ``0.1 mask``, the Dice loss of the anomalous-class map A^ca against
the synthetic masks (``--config.loss_weights.mask=0`` gives the paper's
objective unchanged); the VAE reconstructs the clean image from the
synthetic one (``data.synthetic.reconstruction='clean'``, DRAEM's
reconstructive objective: it learns to remove what does not belong instead
of copying it). The paper's settings otherwise (CAVGA-R at 256 px;
``--config.model.variant=D --config.data.image_size=128`` is the CPU setting
of docs/results.md).
"""

from configs import mvtec
from configs import mvtec_weak


def synthetic_settings(config):
  """Turns a CAVGA_u config into CAVGA_w on synthetic anomalies (shared with
  configs/tiny_synthetic.py)."""
  config = mvtec_weak.weak_settings(config)
  # No real labels: nothing moves from the test set, no quota.
  config.data.weak_fraction = 0.0
  config.data.weak_min_per_defect = 0
  config.data.weak_anomalies_per_batch = 0
  config.data.synthetic.fraction = 0.5
  config.loss_weights.mask = 0.1
  return config


def get_config():
  return synthetic_settings(mvtec.paper_cavga_r(mvtec.get_config()))
