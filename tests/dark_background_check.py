"""Issue 36: the feature maps on an unaligned object on a noisy dark background.

The generated 'dark_objects' category (cavga_jax.data.dark_objects): a bright
textured object at a random position and rotation on a black background with
Gaussian sensor noise, the same noise in training and test images. Users
reported that there `feature_gaussian` (PaDiM) trails `feature_knn`
(PatchCore) far, its largest normal-image values on the flat background, and
that the standardised average `combined_features` loses to its better part.

One evaluation of the untrained CAVGA-E at 64 px (ImageNet EfficientNet-Lite0
encoder; the random tiny CAVGA-D's features are so small that the absolute
0.01 regulariser swamps every covariance and its Gaussian map is a
Euclidean one, which does not show the failure). The feature fields are
PaDiM's and PatchCore's choices at this size: PaDiM's stages 1-3 (100 of 176
channels kept, more than the 43 images its per-cell Gaussians are fitted on,
as at 100 dims with the few dozen normal images users have), the kNN's stages
1-2 (stages 2-3 are 8 and 4 cells a side at 64 px, too coarse for these
defects).

Measured on the code at issue 36: feature_gaussian 0.810, feature_knn 0.902,
combined_features 0.866, combined_all 0.897, combined_knn_ssim 0.922 pixel
AUROC. Of feature_gaussian's top 1 % pixels on the normal test images, 29 %
lie on background at least 4 px from the object (the kNN's: 2 %); defect
pixels against those background pixels score 0.91 for it, 0.98 for the kNN.
Without the sensor noise it scores 0.849 (0.954 on that background).

Not in the CI suite: compiling CAVGA-E's state and evaluation takes about
200 s of the 2-core machine's time, which the 20-minute CI job does not
have beside the rest. Run it by name:

  python -m pytest -q tests/dark_background_check.py

Its two ``xfail(strict=True)`` tests fail on the code of issue 36 (that is
their point); they become plain tests, and this file ``test_*.py`` again,
with the fix (the shrunk covariances and a combination rule chosen on
held-out normal images, docs/results.md).
"""

import numpy as np
import pytest

from cavga_jax import data
from cavga_jax import typed_config
from cavga_jax.data import dark_objects
from cavga_jax.maps import combined_maps
from cavga_jax.programs import evaluate as eval_lib
from cavga_jax.training import run_setup
from configs import tiny_efficientnet


@pytest.fixture(scope='module')
def evaluation(tmp_path_factory):
  """(test set, metrics) of the untrained CAVGA-E (``evaluate.py
  --untrained``)."""
  config = tiny_efficientnet.get_config()
  config.data.category = 'dark_objects'
  config.data.num_train = 48
  config.data.num_test_good = 20
  config.data.num_test_per_defect = 7
  config.eval.map = 'combined_features'
  config.eval.feature_stages = (1, 2, 3)
  config.eval.knn_stages = (1, 2)
  config.eval.num_panels = 0
  workdir = str(tmp_path_factory.mktemp('dark_objects'))
  result = eval_lib.evaluate(config, workdir, untrained=True)
  _, test_ds = run_setup.load_datasets(
      typed_config.from_config(config), workdir)  # generated above
  return test_ds, result


def _auroc(result, name):
  return result['maps'][name]['pixel_auroc']


def test_dark_objects_are_what_the_issue_describes(evaluation):
  test_ds, result = evaluation
  assert sorted(set(test_ds.defect_types)) == sorted(dark_objects.DEFECT_TYPES
                                                     + ('good',))
  # Mostly black background: the share of dark pixels in the normal images.
  normal = test_ds.images[test_ds.labels == 0].astype(np.float64)
  background = normal.mean(axis=-1) < 40
  assert 0.65 < background.mean() < 0.85
  # Position-free nearest neighbours find the defects: the data set is a fair
  # test of the Gaussian map, not an impossible one.
  assert _auroc(result, 'feature_knn') >= 0.85


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason='issue 36: feature_gaussian trails feature_knn on an unaligned '
    'object on a noisy dark background (0.810 against 0.902)')
def test_feature_gaussian_is_close_to_knn(evaluation):
  _, result = evaluation
  # A per-cell Gaussian cannot match the position-free kNN on an unaligned
  # object (every cell sees object, edge and background), so parity is not
  # asked; within 0.05 is what is left once the noise of the flat background
  # no longer reads as anomalous. It trails by 0.09 today.
  assert _auroc(result, 'feature_gaussian') >= (
      _auroc(result, 'feature_knn') - 0.05)


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason='issue 36: combined_features scores 0.866 against its part '
    'feature_knn 0.902')
def test_combined_maps_do_not_lose_to_their_best_part(evaluation):
  _, result = evaluation
  losses = {}
  for name, parts in combined_maps.COMBINATIONS.items():
    best = max(_auroc(result, part) for part in parts)
    losses[name] = round(best - _auroc(result, name), 3)
  assert max(losses.values()) <= 0.01, losses
