"""CAVGA-R_w (weak supervision) on one MVTec AD category at 256 px, the paper's settings.

  python train.py --config=configs/mvtec_weak.py --workdir=runs/bottle_w \
      --config.data.root=/data/mvtec_anomaly_detection --config.data.category=bottle
  python evaluate.py --config=configs/mvtec_weak.py --workdir=runs/bottle_w \
      --config.data.root=/data/mvtec_anomaly_detection --config.data.category=bottle

Trains on all normal training images plus ``weak_fraction`` of each defect
type's test images (at least ``weak_min_per_defect``), which are removed from
the test set (``<workdir>/weak_split.json`` lists them); every batch of 16
holds ``weak_anomalies_per_batch`` = 2 of them. Objective
``rec + kl + adv + 0.001 bce + 0.01 cga`` (the paper's CAVGA_w; no L_ae).
``--config.model.variant=D`` gives CAVGA-D_w.
"""

import ml_collections

from configs import mvtec


def weak_settings(
    config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Turns a CAVGA_u config into CAVGA_w (shared with configs/tiny_weak.py)."""
  config.model.supervision = 'weak'
  # The paper's CAVGA_w weights; ae = 0 drops L_ae (not part of CAVGA_w), a
  # nonzero ae adds it back as an ablation.
  config.loss_weights = ml_collections.ConfigDict(
      dict(rec=1.0, kl=1.0, adv=1.0, ae=0.0, bce=0.001, cga=0.01, mask=0.0))
  # Labelled anomalies per defect type: max(min, round(fraction * n_d)),
  # leaving at least one per type in the test set; chosen from weak_seed
  # (independent of config.seed, so all training seeds share one test set).
  config.data.weak_fraction = 0.01
  config.data.weak_min_per_defect = 1
  config.data.weak_seed = 0
  # Labelled anomalies in every training batch (drawn from the few moved ones,
  # repeating them), the rest normal images; 0 draws batches uniformly, which
  # almost never includes one of ~3 anomalies among ~200 images, so the
  # classifier learns 'all normal'. 2 (1/8 of mvtec's batch of 16, 1/4 of
  # tiny's 8) gives the classifier anomalies at every step while most of each
  # batch still trains the reconstruction and L_cga on normal images.
  config.data.weak_anomalies_per_batch = 2
  # Headline map: 'weak_anomalous' (A^ca) | 'weak_not_normal' (1 - A^cn) |
  # 'weak_complementary' ((1 - A^cn + A^ca) / 2) | 'attention' (1 - A of
  # sum(mu)) | any other map of cavga_jax.maps.anomaly_maps.
  config.eval.map = 'weak_anomalous'
  return config


def get_config():
  return weak_settings(mvtec.paper_cavga_r(mvtec.get_config()))
