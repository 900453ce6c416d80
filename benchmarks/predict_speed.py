"""The deployed path's speed: the scorer against the full evaluation step.

  python benchmarks/predict_speed.py --config=mvtec \\
      --root=../shared/data/mvtec_bottle_256 --category=bottle --rounds=5
  # another headline or setting: --set eval.map=combined_features --set eval.ssim_scale=1

For one config at its image size, on the networks training starts from
(``evaluate.py --untrained``: for configs/mvtec.py CAVGA-E's ImageNet
encoder; speed does not depend on training):

* ``fit_s``: the fit of the maps on the category's normal training images
  (``Evaluator.fit``: calibration, feature Gaussians, kNN coreset, held-out
  thresholds), once, the first call's compilation included;
* per round, alternating on the same batch of real test images: the
  scorer of ``config.eval.map`` (``Scorer.score``, what ``predict.py`` runs
  per batch), the full evaluation step (``evaluate.py``'s: every batch map
  with Grad-CAM, the decoder and ``s_a``, the encoder features, then every
  fitted map) and ``benchmarks/benchmark.py --maps all``'s step (every
  batch map, no features, no fitted maps); images/s of each from the median
  over rounds, and the scorer's ratios to the two others;
* ``predict_py_images_per_s``: ``predict.py``'s whole loop over the test
  folder once (decoding, resizing, the overlays and masks written as PNG),
  the scorer already compiled.

Prints one JSON line. anomalib's PaDiM on the same images:
``benchmarks/anomalib_padim_predict.py``.
"""

import argparse
import ast
import importlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from cavga_jax.deploy import scorer as scorer_lib  # pylint: disable=wrong-import-position
from cavga_jax.evaluation import inference  # pylint: disable=wrong-import-position
from cavga_jax.programs import evaluate as eval_lib  # pylint: disable=wrong-import-position
from cavga_jax.programs import predict as predict_lib  # pylint: disable=wrong-import-position


def _median_seconds(fn, repeats: int) -> float:
  """Median wall time of ``repeats`` calls of ``fn``."""
  times = []
  for _ in range(repeats):
    tic = time.perf_counter()
    fn()
    times.append(time.perf_counter() - tic)
  return statistics.median(times)


def _setting(text: str) -> tuple[str, object]:
  """'eval.ssim_scale=1' -> ('eval.ssim_scale', 1.0 or 1); a value that is
  not a Python literal stays a string."""
  key, sep, value = text.partition('=')
  if not sep:
    raise SystemExit(f'--set {text}: expected KEY=VALUE')
  try:
    return key, ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return key, value


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='mvtec', help='a module of configs/')
  parser.add_argument('--root', required=True)
  parser.add_argument('--category', required=True)
  parser.add_argument(
      '--image-size', type=int, default=None, help="default: the config's")
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument(
      '--repeats',
      type=int,
      default=2,
      help='calls of each step per round (median)')
  parser.add_argument(
      '--set',
      action='append',
      default=[],
      metavar='KEY=VALUE',
      help="a config field, e.g. eval.map=combined_features (repeatable; the "
      'value is a Python literal, or else a string)')
  args = parser.parse_args()

  config = importlib.import_module(f'configs.{args.config}').get_config()
  config.update_from_flattened_dict(dict(_setting(s) for s in args.set))
  config.data.root, config.data.category = args.root, args.category
  config.eval.batch_size = args.batch
  if args.image_size:
    config.data.image_size = args.image_size
  workdir = tempfile.mkdtemp(prefix='predict_speed_')
  made, evaluator = eval_lib.evaluation_setup(config, workdir, untrained=True)
  test_ds, state = made.test_ds, made.state
  params, batch_stats = state.gen_params, state.gen_batch_stats
  tic = time.perf_counter()
  fitted = evaluator.fit(params, batch_stats)
  fit_s = time.perf_counter() - tic

  variables = state.generator_variables()
  scorer = scorer_lib.build_scorer(made.run, evaluator.generator, variables,
                                   made.feature_variables or variables, fitted,
                                   0)
  images = test_ds.images[:args.batch]

  # benchmarks/benchmark.py --maps all's step on this model: every batch
  # map, no encoder features and no fitted maps.
  all_maps_step = jax.jit(
      inference.make_eval_step(evaluator.generator),
      compiler_options=scorer.compiler_options)

  # All to host arrays, as predict.py and evaluate.py use them.
  def all_maps():
    return jax.tree.map(np.asarray, all_maps_step(params, batch_stats, images))

  def full_step():
    out = evaluator.eval_step(params, batch_stats, images,
                              evaluator.feature_variables)
    return jax.tree.map(np.asarray,
                        evaluator.outputs_with_fitted_maps(out, fitted))

  def score():
    return scorer.score(images)

  compile_s = {}
  steps = (('scorer', score), ('full_eval_step', full_step), ('all_maps_step',
                                                              all_maps))
  for name, fn in steps:
    tic = time.perf_counter()
    jax.block_until_ready(fn())
    compile_s[name] = time.perf_counter() - tic
  rounds = {name: [] for name, _ in steps}
  for _ in range(args.rounds):
    for name, fn in steps:
      rounds[name].append(_median_seconds(fn, args.repeats))
  per_s = {
      name: args.batch / statistics.median(times)
      for name, times in rounds.items()
  }

  # predict.py's whole loop over the test images' files.
  files, root = predict_lib.list_inputs(
      os.path.join(args.root, args.category, 'test'))
  output = os.path.join(workdir, 'predict')
  predict_lib.prepare_output(output, files, root, False)
  tic = time.perf_counter()
  rows, _ = predict_lib.score_files(scorer, files, root, output, args.batch)
  predict_s = time.perf_counter() - tic
  device = jax.devices()[0]
  print(
      json.dumps(
          dict(
              config=args.config,
              category=args.category,
              map=scorer.headline,
              settings=args.set,
              image_size=scorer.image_size,
              batch=args.batch,
              num_normal_images=evaluator.num_normal_images,
              fit_s=round(fit_s, 2),
              scorer_images_per_s=round(per_s['scorer'], 3),
              full_eval_step_images_per_s=round(per_s['full_eval_step'], 3),
              all_maps_step_images_per_s=round(per_s['all_maps_step'], 3),
              ratio=round(per_s['scorer'] / per_s['full_eval_step'], 2),
              ratio_all_maps_step=round(
                  per_s['scorer'] / per_s['all_maps_step'], 2),
              round_s={k: [round(t, 3) for t in v] for k, v in rounds.items()},
              first_call_s={k: round(v, 2) for k, v in compile_s.items()},
              predict_py_images=len(rows),
              predict_py_images_per_s=round(len(rows) / predict_s, 3),
              platform=device.platform,
              device_kind=device.device_kind,
              cpu_threads=len(os.sched_getaffinity(0)),
              jax=jax.__version__,
              python=platform.python_version())))


if __name__ == '__main__':
  main()
