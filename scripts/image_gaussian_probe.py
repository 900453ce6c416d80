"""Issue 36's image-level probe: a Gaussian on globally pooled features.

Rippel et al. (ICPR 2020, "Modeling the distribution of normal data in
pre-trained deep features for anomaly detection"): each encoder stage's
features, averaged over the image, get one multivariate Gaussian fitted on
the normal training images (Ledoit-Wolf shrinkage, scikit-learn); an image's
score is the sum over stages of its Mahalanobis distances. Scored on the
same fit / held-out split as ``evaluate.py`` (``fitting.split_held_out``)
with CAVGA-E's ImageNet initialisation (``configs/mvtec.py`` untrained),
beside the headline's image score from ``scripts/image_score_variants.py``'s
cache (``<workdir>/image_score_maps.npz``, the same workdir), and their
fusion normalised on the held-out normal images only:
``(s - median) / (q90 - median)`` of each, averaged.

  PYTHONPATH=. python scripts/image_gaussian_probe.py --config=configs/mvtec.py \
      --config.data.root=../shared/data/bsdata_256 --config.data.category=bsdata \
      --workdir=/tmp/isv/bsdata --out=docs/raw/image_gaussian_bsdata.json
"""

from __future__ import annotations

import json
import os

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
from sklearn import covariance as sk_covariance
from sklearn import metrics

from cavga_jax import config_checks
from cavga_jax.evaluation import evaluator as evaluator_lib
from cavga_jax.evaluation import fitting
from cavga_jax.evaluation import registry
from cavga_jax.models import layers
from cavga_jax.training import run_setup
from cavga_jax.training import train_state

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/mvtec.py')
_WORKDIR = flags.DEFINE_string('workdir', None, 'workdir (with the maps cache)')
_OUT = flags.DEFINE_string('out', None, 'JSON file of the results')
STAGES = (1, 2, 3, 4)


def _tail(held, test):
  median = np.median(held)
  return (test - median) / (np.quantile(held, 0.9) - median)


def main(argv):
  del argv
  config = _CONFIG.value
  run = config_checks.check_config(config)
  made = run_setup.setup(run, _WORKDIR.value, restore=True, untrained=True)
  generator, variables = made.generator, made.state.generator_variables()

  def pooled(images):
    x = train_state.images_to_float(images)
    stages = generator.apply(
        variables, x, False, STAGES, method='encode_stages')
    return [jnp.mean(s.astype(jnp.float32), axis=(1, 2)) for s in stages]

  pooled = jax.jit(
      pooled, compiler_options=layers.compiler_options(generator.conv_impl))

  def features(images):
    batches = [pooled(images[i:i + 16]) for i in range(0, len(images), 16)]
    return [
        np.concatenate([np.asarray(b[s])
                        for b in batches])
        for s in range(len(STAGES))
    ]

  fit_images, held_images = fitting.split_held_out(
      evaluator_lib.normal_training_images(made.train_ds),
      run.eval.threshold_holdout)
  fit, held, test = (features(fit_images), features(held_images),
                     features(made.test_ds.images))
  labels = np.asarray(made.test_ds.labels)

  def score(stage_features):
    return sum(model.mahalanobis(f) for model, f in zip(models, stage_features))

  models = [sk_covariance.LedoitWolf().fit(f) for f in fit]
  results = {'num_fit': len(fit_images), 'num_held_out': len(held_images)}
  held_score, test_score = score(held), score(test)
  results['image_gaussian'] = float(metrics.roc_auc_score(labels, test_score))
  per_stage = {}
  for s, (model, f) in enumerate(zip(models, test)):
    per_stage[STAGES[s]] = float(
        metrics.roc_auc_score(labels, model.mahalanobis(f)))
  results['per_stage'] = per_stage
  cache = np.load(os.path.join(_WORKDIR.value, 'image_score_maps.npz'))
  name = config.eval.map
  spec = registry.spec(name)
  headline_held = np.asarray(spec.image_score(cache[f'held_{name}']))
  headline_test = np.asarray(spec.image_score(cache[f'test_{name}']))
  assert np.array_equal(cache['labels'], labels)
  results['headline'] = float(metrics.roc_auc_score(labels, headline_test))
  fused = (_tail(held_score, test_score)
           + _tail(headline_held, headline_test)) / 2
  results['fused_tail_mean'] = float(metrics.roc_auc_score(labels, fused))
  print(json.dumps(results, indent=1))
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  flags.mark_flag_as_required('workdir')
  app.run(main)
