"""Does the detector's synthetic validation predict its test metrics?

  python scripts/detector_curve.py --config=configs/mvtec.py --workdir=runs/bottle \
      --config.data.root=... --config.data.category=bottle

For every detector checkpoint kept in ``<workdir>/detector/checkpoints``
(``config.train.keep_checkpoints``' newest three) prints the synthetic
validation that training logged (``<workdir>/detector/eval_curve.jsonl``)
beside the ``feature_detector`` map's test metrics (pixel AUROC, AU-PRO,
image AUROC), and writes them to ``<workdir>/detector/test_curve.jsonl``.
A measurement for docs/results.md: nothing here selects a checkpoint.
"""

import json
import os

from absl import app
from absl import flags
import jax
import numpy as np

from cavga_jax import config_checks
from cavga_jax.evaluation import evaluator as evaluator_lib
from cavga_jax.evaluation import inference
from cavga_jax.maps import detector
from cavga_jax.metrics import image_metrics
from cavga_jax.metrics import pixel_metrics
from cavga_jax.programs import runtime
from cavga_jax.training import detector_training
from cavga_jax.training import run_setup

_CONFIG = runtime.define_config_flag('The run configuration.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'The trained workdir.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  config, workdir = _CONFIG.value, _WORKDIR.value
  runtime.enable_compilation_cache()
  run = config_checks.check_config(config)
  settings = detector_training.settings_from_run(run)
  made = run_setup.setup(run, workdir, feature_variables=False)
  mesh, generator, test_ds = made.mesh, made.generator, made.test_ds
  variables = made.initial_state().generator_variables()
  image_size = test_ds.images.shape[1]
  maps_settings = evaluator_lib.map_settings(run.eval, image_size)
  features = detector_training.compute_features(generator, variables,
                                                test_ds.images, settings.map,
                                                maps_settings,
                                                settings.eval_batch_size, mesh,
                                                'test images')
  context = inference.map_context(generator, maps_settings, image_size)
  apply = jax.jit(lambda state, f: detector.MAP.apply(context, None, state, f))
  validation = detector_training.validation_scores(workdir)
  records = []
  for step in detector_training.checkpoint_steps(workdir):
    state, _ = detector_training.trained_state(workdir, step)
    maps = np.concatenate([
        np.asarray(apply(state, features[i:i + 16]))
        for i in range(0, len(features), 16)
    ])
    scores = np.asarray(detector.MAP.image_score(maps))
    test = dict(
        pixel_auroc=pixel_metrics.pixel_auroc(maps, test_ds.masks),
        aupro=pixel_metrics.aupro(maps, test_ds.masks),
        image_auroc=image_metrics.image_auroc(scores, test_ds.labels))
    records.append(dict(step=step, validation=validation.get(step), test=test))
    print(json.dumps(records[-1]), flush=True)
  with open(
      os.path.join(detector_training.detector_dir(workdir), 'test_curve.jsonl'),
      'w',
  ) as f:
    f.writelines(json.dumps(r) + '\n' for r in records)


if __name__ == '__main__':
  app.run(main)
