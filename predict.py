"""Scores unlabelled images with a trained run.

  python predict.py --workdir=/tmp/cavga --input=new_parts/ [--output=OUT]
  python predict.py --workdir=/tmp/cavga --input='line3/*.tif' --export=cpu

The workdir must hold a checkpoint and the maps evaluate.py fitted for it
(<workdir>/fitted/), or with --untrained the maps `evaluate.py --untrained`
fitted. Writes OUT (default <workdir>/predict): scores.csv (per scored
file its image score, the decision at the held-out image threshold and the
maximum of its map), overlays/ and masks/ (one PNG each per image, at the
image's own size, or reduced for images over
cavga_jax.programs.predict.MAX_OUTPUT_PIXELS), predict.json, with --export the
serialized
scorer (scorer/, cavga_jax.deploy.export), and predict_manifest.json (every file
it writes, listed before they are written; --overwrite deletes only those).

Exit status: 0 when every file was scored; 2 when some were skipped (an
unreadable file, or a non-finite map or score: each is named in the log
and in predict.json, and has no row in scores.csv); 1 on an error that
stops the run (one line; nothing is written when it is found before
scoring: bad flags, no inputs, an output predict.py may not write, a run
that cannot be loaded).
"""

from absl import app
from absl import flags

from cavga_jax.programs import predict as predict_lib
from cavga_jax.programs import runtime

_WORKDIR = flags.DEFINE_string('workdir', None, 'The trained workdir.')
_INPUT = flags.DEFINE_string(
    'input', None, 'An image file, a folder of images (searched '
    "recursively) or a glob pattern such as 'dir/*.png' (quote it).")
_OUTPUT = flags.DEFINE_string(
    'output', None, 'The output folder (default <workdir>/predict); never '
    'inside or around the input, nor around the workdir.')
_OVERWRITE = flags.DEFINE_bool(
    'overwrite', False, 'Replace an earlier output in --output: delete the '
    'files its predict_manifest.json lists, nothing else.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 8, 'Images per call.')
_EXPORT = flags.DEFINE_list(
    'export', [], 'Also serialize the scorer with jax.export for these '
    'platforms (cpu, cuda, rocm, tpu; e.g. cpu,cuda) to <output>/scorer.')
_UNTRAINED = flags.DEFINE_bool(
    'untrained', False, 'Score with the networks training starts from and '
    'the maps `evaluate.py --untrained` fitted (e.g. configs/mvtec.py\'s '
    'ImageNet feature maps, which training does not change).')
_CACHE = runtime.define_compilation_cache_flag()
flags.mark_flags_as_required(['workdir', 'input'])

SKIPPED_STATUS = 2


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  summary = runtime.run_program(
      lambda _, workdir: predict_lib.predict(
          workdir, _INPUT.value, _OUTPUT.value, _OVERWRITE.value, _BATCH_SIZE.
          value, _EXPORT.value, _UNTRAINED.value), None, _WORKDIR.value,
      _CACHE.value)
  print(f'scored {summary.scored} images into {summary.output}'
        + (f'; skipped {len(summary.skipped)}:' if summary.skipped else ''))
  for _, reason in summary.skipped:
    print(f'  {reason}')
  return SKIPPED_STATUS if summary.skipped else 0


if __name__ == '__main__':
  app.run(main)
