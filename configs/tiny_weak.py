"""Tiny CAVGA-D_w: a few steps on 32 px generated images, for tests and smoke checks."""

from configs import mvtec_weak
from configs import tiny


def get_config():
  config = mvtec_weak.weak_settings(tiny.get_config())
  # 3 test images per defect type: 1 moves to training, 2 stay in the test.
  config.data.num_test_per_defect = 3
  return config
