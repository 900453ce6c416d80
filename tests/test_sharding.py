"""Data-parallel training on 8 (forced CPU) devices equals 1 device."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cavga_jax import sharding
from cavga_jax.errors import CavgaError


def test_eight_devices_equal_one_device(tmp_path):
  script = os.path.join(os.path.dirname(__file__), 'multidevice_check.py')
  proc = subprocess.run([sys.executable, script, str(tmp_path)],
                        capture_output=True, text=True, timeout=600,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  # Same global batch: only the order of float reductions differs.
  assert result['losses'] < 1e-5
  assert result['params'] < 1e-5
  assert result['disc_params'] < 1e-5
  assert result['batch_stats'] < 1e-4
  # Evaluation of the same parameters: maps agree to float rounding. The
  # tiny model's maps are bilinear upsamplings of 2x2 attention, full of
  # near-ties, which rounding reorders; so ranking metrics agree to 1e-3.
  assert result['anomaly_map'] < 1e-5
  for name, (one, eight) in result['metrics'].items():
    if name.endswith('_threshold'):  # an argmax over near-equal IoUs
      continue
    assert np.isclose(one, eight, rtol=0, atol=1e-3, equal_nan=True), name


def test_batch_size_must_split_over_devices():
  mesh = sharding.make_mesh()
  sharding.check_batch_size(8 * mesh.size, mesh, 'config.train.batch_size')
  if mesh.size > 1:
    with pytest.raises(CavgaError, match='not divisible'):
      sharding.check_batch_size(mesh.size + 1, mesh, 'config.train.batch_size')
