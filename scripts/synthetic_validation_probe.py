"""Can synthetic anomalies in held-out normal images rank maps? (issue 36)

  PYTHONPATH=. python scripts/synthetic_validation_probe.py --config=configs/mvtec.py \
      --config.data.root=../shared/data/bsdata_256 --config.data.category=bsdata \
      --workdir=/tmp/exp/tr40_bsdata [--untrained] --out=docs/raw/<name>.json

The evaluation's held-out normal training images (``eval.threshold_holdout``,
never fitted on), each with one synthetic anomaly of ``synthesis.py``'s
default kinds (``detector_training.synthetic_validation_images``: the
detector's validation set, fixed key), are scored by the headline map
``config.eval.map`` and its parts, with the fit ``evaluate.py`` saved for the
workdir's newest checkpoint (or ``--untrained``'s; fitted and saved first if
missing). Pixel AUROC and AU-PRO on the synthetic masks, image AUROC of the
synthetic images against the same images clean, per map: the validation
that could choose between maps without test data, to set beside their test
metrics in docs/results.md. A measurement: nothing here selects a map.
"""

from __future__ import annotations

import json

from absl import app
from absl import flags
import jax
import numpy as np

from cavga_jax.evaluation import inference
from cavga_jax.evaluation import registry
from cavga_jax.metrics import image_metrics
from cavga_jax.metrics import pixel_metrics
from cavga_jax.programs import evaluate as eval_lib
from cavga_jax.programs import runtime
from cavga_jax.training import detector_training

_CONFIG = runtime.define_config_flag('The run configuration.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'The run workdir.')
_UNTRAINED = flags.DEFINE_bool(
    'untrained', False,
    'Score the initial networks, as evaluate.py --untrained.')
_OUT = flags.DEFINE_string('out', None, 'Where to write the JSON record.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  config, workdir, untrained = _CONFIG.value, _WORKDIR.value, _UNTRAINED.value
  runtime.enable_compilation_cache()
  made, evaluator = eval_lib.evaluation_setup(config, workdir, untrained)
  if evaluator.held_out is None:
    raise SystemExit('eval.threshold_holdout is 0: no held-out images')
  state = made.state
  fitted = eval_lib.fitted_maps(config, made.run.eval, workdir, evaluator,
                                state, made.step, untrained)
  clean = evaluator.held_out
  synthetic, masks = detector_training.synthetic_validation_images(clean)

  def maps_of(images, what):
    step = lambda batch: evaluator.outputs_with_fitted_maps(
        evaluator.eval_step(state.gen_params, state.gen_batch_stats, batch,
                            evaluator.feature_variables), fitted)
    return inference.predict(step, images, evaluator.batch_size, evaluator.mesh,
                             what)['maps']

  clean_maps = maps_of(clean, 'held-out images')
  synthetic_maps = maps_of(synthetic, 'synthetic validation images')
  names = registry.closure((config.eval.map,))
  labels = np.r_[np.zeros(len(clean)), np.ones(len(synthetic))]
  record = dict(
      map=config.eval.map,
      category=config.data.category,
      step=int(made.step),
      untrained=untrained,
      num_images=len(clean),
      synthetic={})
  for name in names:
    maps = np.asarray(synthetic_maps[name])
    scores = np.concatenate([
        np.asarray(registry.spec(name).image_score(jax.numpy.asarray(m)))
        for m in (clean_maps[name], maps)
    ])
    record['synthetic'][name] = dict(
        pixel_auroc=pixel_metrics.pixel_auroc(maps, masks),
        aupro=pixel_metrics.aupro(maps, masks),
        image_auroc=image_metrics.image_auroc(scores, labels))
    print(name, json.dumps(record['synthetic'][name]), flush=True)
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump(record, f, indent=1)


if __name__ == '__main__':
  app.run(main)
