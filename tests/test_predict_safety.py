"""The deployed path with hostile but fair inputs (issue 37): predict.py
deletes only what it wrote, never reports a non-finite score as normal,
names every output uniquely, decodes large and rotated images safely, and
the scorer and its export check their input.

Most tests score with a small stand-in ``Scorer`` (a jitted mean of the
pixels) so they need no trained run (tests/test_predict.py corrupts a
trained run's fit)."""

import csv
import hashlib
import json
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from cavga_jax.data import folder
from cavga_jax.data import images as images_lib
from cavga_jax.deploy import export
from cavga_jax.deploy import predict_output
from cavga_jax.deploy import scorer as scorer_lib
from cavga_jax.errors import CavgaError
from cavga_jax.programs import predict as predict_lib
from conftest import REPO_ROOT

SIZE = 16
_LOAD_SCORER = scorer_lib.load_scorer  # the real one (fixtures replace it)


def _mean_score(state, images):
  maps = images.astype(jnp.float32).mean(-1) / 255 * state['w']
  return maps, maps.max(axis=(1, 2))


def _stand_in() -> scorer_lib.Scorer:
  return scorer_lib.Scorer(
      headline='mean',
      image_size=SIZE,
      channels=3,
      thresholds=(0.5, 0.5, 0.2),
      state={'w': jnp.float32(1)},
      score_fn=_mean_score,
      step=0)


@pytest.fixture
def stand_in(monkeypatch):
  """The stand-in scorer, returned by ``load_scorer`` whatever the workdir."""
  scorer = _stand_in()
  monkeypatch.setattr(scorer_lib, 'load_scorer', lambda *a, **k: scorer)
  return scorer


def _save(path: pathlib.Path, size=(20, 12), value=0, **kwargs):
  path.parent.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(value)
  Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3),
                               np.uint8)).save(path, **kwargs)


def _snapshot(root: pathlib.Path, skip=()) -> dict[str, str]:
  return {
      p.relative_to(root).as_posix():
          hashlib.sha256(p.read_bytes()).hexdigest()
      for p in sorted(root.rglob('*'))
      if p.is_file() and not any(
          p.relative_to(root).as_posix().startswith(s) for s in skip)
  }


def _rows(out: pathlib.Path) -> list[dict]:
  with open(out / predict_lib.SCORES_FILE) as f:
    return list(csv.DictReader(f))


class _Killed(Exception):
  """Stands for a SIGKILL after the first batch."""


def test_overwrite_removes_only_the_files_predict_wrote(stand_in, monkeypatch,
                                                        tmp_path):
  inputs, out, work = tmp_path / 'in', tmp_path / 'out', tmp_path / 'work'
  for name in ('a.png', 'b.png', 'old.png'):
    _save(inputs / name, value=len(name))
  work.mkdir()

  # A run killed after its first image: a manifest, no predict.json.
  calls = []

  def killed(images):
    if calls:
      raise _Killed()
    calls.append(1)
    return scorer_lib.Scorer.score(stand_in, images)

  stand_in.score = killed
  with pytest.raises(_Killed):
    predict_lib.predict(str(work), str(inputs), str(out), batch_size=1)
  del stand_in.score
  assert (out / 'overlays' / 'a.png.png').exists()
  assert not (out / predict_lib.SUMMARY_FILE).exists()

  # Foreign files next to it: the user's, a workdir, evaluate.py's eval/,
  # one inside a folder predict.py writes to.
  foreign = {
      'notes.txt': b'mine', 'overlays/by_hand.png': b'drawn',
      'run/config.json': json.dumps({'model': {}, 'train': {}}).encode(),
      'run/checkpoints/2/state.bin': b'weights', 'eval/metrics.json': b'{}',
      'photos/c.png': b'not an input'
  }
  for name, data in foreign.items():
    (out / name).parent.mkdir(parents=True, exist_ok=True)
    (out / name).write_bytes(data)
  before = _snapshot(out)

  with pytest.raises(CavgaError, match='unfinished.*--overwrite'):
    predict_lib.predict(str(work), str(inputs), str(out))
  (inputs / 'old.png').unlink()  # the next run does not plan its outputs
  # A workdir without a run: the real loader stops before anything is
  # deleted.
  monkeypatch.setattr(scorer_lib, 'load_scorer', _LOAD_SCORER)
  with pytest.raises(CavgaError, match='not found'):
    predict_lib.predict(str(work), str(inputs), str(out), overwrite=True)
  monkeypatch.setattr(scorer_lib, 'load_scorer', lambda *a, **k: stand_in)
  assert _snapshot(out) == before

  summary = predict_lib.predict(
      str(work), str(inputs), str(out), overwrite=True)
  assert summary.scored == 2 and not summary.skipped
  after = _snapshot(out)
  for name in foreign:
    assert after[name] == before[name], name  # byte-identical
  assert not (out / 'overlays' / 'old.png.png').exists()
  assert sorted(r['overlay'] for r in _rows(out)) == [
      'overlays/a.png.png', 'overlays/b.png.png'
  ]
  manifest = predict_output.read_manifest(str(out))
  assert manifest['complete']
  assert set(manifest['files']
            ) == set(after) - set(foreign) - {predict_output.MANIFEST_FILE}

  # A file predict.py wrote and the user changed since is not its any more.
  (out / 'masks' / 'a.png.png').write_bytes(b'edited')
  with pytest.raises(CavgaError, match='masks/a.png.png exists'):
    predict_lib.predict(str(work), str(inputs), str(out), overwrite=True)
  assert (out / 'masks' / 'a.png.png').read_bytes() == b'edited'
  assert (out / 'overlays' / 'a.png.png').exists()  # nothing was deleted


def test_output_must_not_hold_or_lie_in_the_input_or_a_workdir(
    stand_in, tmp_path):
  inputs = tmp_path / 'in'
  _save(inputs / 'a.png')
  run = tmp_path / 'run'
  (run / 'checkpoints').mkdir(parents=True)
  other = tmp_path / 'other_run'
  (other / 'fitted').mkdir(parents=True)
  cases = {
      tmp_path: 'contains the input', inputs / 'x': 'inside the input',
      run: 'contains the workdir', run / 'checkpoints' / 'p': 'lies inside',
      run / 'eval': 'lies inside', other: "run's workdir"
  }
  before = _snapshot(tmp_path)
  for output, message in cases.items():
    with pytest.raises(CavgaError, match=message):
      predict_lib.predict(str(run), str(inputs), str(output))
  assert _snapshot(tmp_path) == before
  # The default, <workdir>/predict, and a folder below it are fine.
  predict_lib.predict(str(run), str(inputs))
  predict_lib.predict(str(run), str(inputs), str(run / 'predict' / 'line3'))
  assert (run / 'predict' / 'line3' / 'masks' / 'a.png.png').exists()


def test_a_corrupted_state_never_yields_a_normal_row(stand_in, tmp_path):
  # One NaN in the state the scorer reads (tests/test_predict.py corrupts a
  # trained run's fitted Gaussian the same way).
  stand_in.state = {'w': jnp.float32(np.nan)}
  inputs, out = tmp_path / 'in', tmp_path / 'out'
  for name in ('a.png', 'b.jpg'):
    _save(inputs / name, size=(40, 30))
  summary = predict_lib.predict(
      str(tmp_path), str(inputs), str(out), export_platforms=['cpu'])
  assert summary.scored == 0
  assert [p for p, _ in summary.skipped
         ] == [str(inputs / 'a.png'),
               str(inputs / 'b.jpg')]
  assert all('not finite' in reason for _, reason in summary.skipped)
  assert _rows(out) == []  # no row, so none says normal
  assert not (out / 'overlays').exists()
  written = json.loads((out / predict_lib.SUMMARY_FILE).read_text())
  assert written['scored'] == 0 and len(written['skipped']) == 2

  images = np.zeros((2, SIZE, SIZE, 3), np.uint8)
  exported, _ = export.load(str(out / predict_lib.SCORER_DIR))
  _, scores, anomalous = exported.call(images)
  assert np.isnan(np.asarray(scores)).all()
  assert np.asarray(anomalous).all()  # never normal


def test_nan_scores_are_anomalous_and_not_finite():
  maps = np.zeros((3, 2, 2), np.float32)
  maps[2, 1, 1] = np.inf
  anomalous, finite = scorer_lib.decide(
      maps, np.array([0.1, np.nan, 0.1], np.float32), 0.5)
  assert np.asarray(anomalous).tolist() == [False, True, True]
  assert np.asarray(finite).tolist() == [True, False, False]


def test_every_input_gets_its_own_overlay_and_mask(stand_in, tmp_path):
  elsewhere, inputs = tmp_path / 'elsewhere', tmp_path / 'in'
  _save(elsewhere / 'one' / 'x.png', value=1)
  _save(elsewhere / 'two' / 'x.png', value=2)
  for sub, target in (('a', 'one'), ('b', 'two')):
    (inputs / sub).mkdir(parents=True)
    (inputs / sub / 'x.png').symlink_to(elsewhere / target / 'x.png')
  out = tmp_path / 'out'
  predict_lib.predict(str(tmp_path), str(inputs), str(out))
  rows = _rows(out)
  assert sorted(r['overlay'] for r in rows) == [
      'overlays/a/x.png.png', 'overlays/b/x.png.png'
  ]
  overlays = {(out / r['overlay']).read_bytes() for r in rows}
  assert len(overlays) == 2  # two files, each of its own image
  assert predict_lib.output_names(
      [inputs / 'X.png', inputs / 'x.png', inputs / 'x.png~2'],
      inputs) == ['X.png', 'x.png~2', 'x.png~2~2']


def test_an_existing_file_is_the_input_even_with_brackets(stand_in, tmp_path):
  _save(tmp_path / 'in' / 'part[1].png')
  _save(tmp_path / 'in' / 'part1.png', value=5)  # what the glob would match
  out = tmp_path / 'out'
  predict_lib.predict(
      str(tmp_path), str(tmp_path / 'in' / 'part[1].png'), str(out))
  assert [r['path'] for r in _rows(out)
         ] == [str(tmp_path / 'in' / 'part[1].png')]
  files, _ = predict_lib.list_inputs(str(tmp_path / 'in' / 'part[1-2].png'))
  assert files == [tmp_path / 'in' / 'part1.png']  # a glob when no such file


def test_bad_output_and_platform_stop_before_anything_is_written(
    stand_in, tmp_path):
  _save(tmp_path / 'in' / 'a.png')
  target = tmp_path / 'out.txt'
  target.write_text('a file')
  with pytest.raises(CavgaError, match='is a file'):
    predict_lib.predict(str(tmp_path), str(tmp_path / 'in'), str(target))
  assert target.read_text() == 'a file'
  with pytest.raises(CavgaError, match="unknown platform 'gpu'"):
    predict_lib.predict(
        str(tmp_path),
        str(tmp_path / 'in'),
        str(tmp_path / 'out'),
        export_platforms=['cpu', 'gpu'])
  assert not (tmp_path / 'out').exists()
  with pytest.raises(CavgaError, match='unknown platform'):
    export.save(str(tmp_path / 'scorer'), stand_in, ['bogus'])
  assert not (tmp_path / 'scorer').exists()
  # The program: one line, status 1, before the workdir is even read.
  run = subprocess.run([
      sys.executable, 'predict.py', f'--workdir={tmp_path / "none"}',
      f'--input={tmp_path / "in"}', f'--output={tmp_path / "out"}',
      '--export=bogus', '--compilation_cache='
  ],
                       cwd=REPO_ROOT,
                       capture_output=True,
                       text=True,
                       timeout=120)
  assert run.returncode == 1
  assert "error: --export=bogus: unknown platform 'bogus'" in run.stderr
  assert 'Traceback' not in run.stderr
  assert not (tmp_path / 'out').exists()


def test_large_images_are_reduced_while_decoded(stand_in, monkeypatch,
                                                tmp_path):
  big = tmp_path / 'in' / 'big.png'
  _save(big, size=(300, 200))
  image = images_lib.read_image(big, 3, max_pixels=10_000)
  assert image.size == (100, 67)  # the smallest factor (3) that fits
  full = np.asarray(Image.open(big), np.float64)
  np.testing.assert_allclose(
      np.asarray(image)[:66, :100],
      full[:198].reshape(66, 3, 100, 3, 3).mean((1, 3)),
      atol=1)
  # JPEG decodes at 1/4 scale (Image.draft), then a box filter halves it:
  # (100, 75), not the (115, 86) of a factor 7 from the full decode.
  photo = tmp_path / 'in' / 'big.jpg'
  _save(photo, size=(800, 600), quality=90)
  assert images_lib.read_image(photo, 3, max_pixels=10_000).size == (100, 75)
  assert images_lib.read_image(photo, 3).size == (800, 600)
  # predict.py reads at most MAX_OUTPUT_PIXELS; its mask has that size.
  monkeypatch.setattr(predict_lib, 'MAX_OUTPUT_PIXELS', 10_000)
  predict_lib.predict(str(tmp_path), str(big), str(tmp_path / 'out'))
  assert Image.open(tmp_path / 'out' / 'masks' / 'big.png.png').size == (100,
                                                                         67)


def test_exif_orientation_is_applied_by_the_loader_and_predict(
    stand_in, tmp_path):
  stored = np.zeros((20, 40, 3), np.uint8)
  stored[:, :20] = 255  # left half white as stored
  exif = Image.Exif()
  exif[0x0112] = 6  # shown rotated 90 degrees clockwise
  path = tmp_path / 'mvtec' / 'part' / 'train' / 'good' / '000.jpg'
  path.parent.mkdir(parents=True)
  Image.fromarray(stored).save(path, exif=exif, quality=95)
  upright = Image.open(path).transpose(Image.Transpose.ROTATE_270)
  assert upright.size == (20, 40)

  image = images_lib.read_image(path, 3)
  assert image.size == (20, 40)
  np.testing.assert_array_equal(np.asarray(image), np.asarray(upright))
  loaded = folder.load_split(
      str(tmp_path / 'mvtec'), 'part', 'train', SIZE, 3, num_workers=1)
  np.testing.assert_array_equal(loaded.images[0],
                                images_lib.model_input(upright, SIZE, 3))
  assert loaded.images[0, :SIZE // 2 - 1].min() > 200  # white on top now
  predict_lib.predict(str(tmp_path), str(path), str(tmp_path / 'out'))
  assert Image.open(tmp_path / 'out' / 'masks' / '000.jpg.png').size == (20, 40)


def test_scorer_and_export_refuse_images_they_cannot_score(tmp_path):
  scorer = _stand_in()
  good = np.zeros((2, SIZE, SIZE, 3), np.uint8)
  scorer.score(good)
  bad = {
      'uint8': good.astype(np.float32), 'model\'s size': np.zeros(
          (2, SIZE + 1, SIZE, 3), np.uint8), 'B >= 1': good[:0],
      'batch': good[0]
  }
  for message, images in bad.items():
    with pytest.raises(CavgaError, match=message):
      scorer.score(images)
  path = export.save(str(tmp_path / 'scorer'), scorer)
  exported = export.load(str(tmp_path / 'scorer'))[0]
  assert path.endswith(export.PROGRAM_FILE)
  _, scores, anomalous = exported.call(good)
  assert not np.asarray(anomalous).any()
  # jax.export itself refuses what the function was not exported for.
  for images in bad.values():
    with pytest.raises(ValueError, match='mismatch|>= 1'):
      exported.call(images)
