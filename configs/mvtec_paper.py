"""CAVGA-E_u as the paper trains it: configs/mvtec.py with the VAE-GAN trained.

  python train.py --config=configs/mvtec_paper.py --workdir=runs/bottle \
      --config.data.root=/data/mvtec_anomaly_detection --config.data.category=bottle
  python evaluate.py --config=configs/mvtec_paper.py --workdir=runs/bottle ...

configs/mvtec.py trains no VAE-GAN (its headline reads only the initial
networks, issue 36 item 5); this config trains CAVGA's VAE-GAN for 20,000
steps (about 1 image/s on a 2-core CPU: days; hours on a GPU), everything
else the same (the paper's ``1 - A``: ``--config.eval.map=attention``).
"""

from configs import mvtec


def get_config():
  config = mvtec.get_config()
  config.train.num_steps = 20000
  return config
