"""Tiny CAVGA-D_w on synthetic anomalies: a few steps on 32 px generated images, for tests."""

from configs import mvtec_synthetic
from configs import tiny


def get_config():
  return mvtec_synthetic.synthetic_settings(tiny.get_config())
