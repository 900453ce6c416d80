"""Data-parallel training on 8 (forced CPU) devices equals 1 device."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cavga_jax import sharding


@pytest.fixture(scope='module')
def eight_devices(tmp_path_factory):
  """multidevice_check.py's JSON (a subprocess with 8 forced CPU devices)."""
  script = os.path.join(os.path.dirname(__file__), 'multidevice_check.py')
  proc = subprocess.run(
      [sys.executable, script,
       str(tmp_path_factory.mktemp('eight'))],
      capture_output=True,
      text=True,
      timeout=600,
      check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


# The maps the 8-device evaluation must cover: the default headline, the
# calibrated ones (fitted on the normal training images like it).
# feature_detector is scored only once trained (or as the headline): its
# 8-device check is the sharded training ('detector' below).
_FITTED_MAPS = ('feature_gaussian', 'residual_calibrated',
                'residual_ssim_smooth_calibrated', 'residual_x_ssim_calibrated')


def test_eight_devices_equal_one_device(eight_devices):
  result = eight_devices
  # Same global batch: only the order of float reductions differs.
  assert result['losses'] < 1e-5
  assert result['params'] < 1e-5
  # Adam's first updates are g / (|g| + 1e-8): a gradient component that is
  # rounding noise around zero moves by up to lr (2e-4) on one mesh and not
  # the other. Measured on the discriminator after three steps: under 1e-5
  # with XLA's default code generation, 3.5e-5 at the suite's LLVM level 0
  # (conftest), so 1e-4 like the BatchNorm statistics; a sharding bug
  # (a missing all-reduce, a wrong batch slice) also shows in the losses.
  assert result['disc_params'] < 1e-4
  assert result['batch_stats'] < 1e-4
  # The trained detector's sharded step (feature cells split over the
  # devices, one BatchNorm batch): Adam's first steps as above.
  assert result['detector'] < 1e-4
  # evaluate.py's evaluator on both meshes, the default headline map.
  assert result['headline'] == ['feature_gaussian', 'feature_gaussian']
  assert set(_FITTED_MAPS) <= set(result['anomaly_maps'])
  # Evaluation of the same parameters: maps agree to float rounding of the
  # features relative to each map's range (the fitted maps go through a
  # float32 precision matrix, which amplifies it). The tiny model's maps are
  # bilinear upsamplings of 2x2 attention, full of near-ties, which rounding
  # reorders; so ranking metrics agree to 1e-3.
  for name, diff in result['anomaly_maps'].items():
    assert diff < 1e-4, name
  metrics = result['metrics']
  for name in _FITTED_MAPS:
    # Thresholds fixed on the held-out normal images, on both meshes.
    for key in ('iou_held_out', 'detection_accuracy_held_out',
                'threshold_held_out', 'image_threshold_held_out'):
      assert f'maps.{name}.{key}' in metrics, (name, key)
  for name, (one, eight) in metrics.items():
    if name.endswith('best_threshold'):  # an argmax over near-equal IoUs
      continue
    # Thresholds are in map units (feature_gaussian's reach ~10).
    assert np.isclose(one, eight, rtol=1e-4, atol=1e-3, equal_nan=True), name


def test_batch_size_must_split_over_devices(eight_devices):
  mesh = sharding.make_mesh()
  sharding.check_batch_size(8 * mesh.size, mesh, 'config.train.batch_size')
  # train.py's one-line error on 8 devices, before any data or compilation.
  error = eight_devices['batch_size_error']
  assert error is not None and 'config.train.batch_size' in error
  assert 'not divisible' in error and '\n' not in error
