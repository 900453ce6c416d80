"""mSTC and LAG converters on tiny fake downloads built in tmp_path."""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
from PIL import Image
import pytest

from cavga_jax.data import folder
from cavga_jax.data.converters import lag
from cavga_jax.data.converters import mstc
from cavga_jax.errors import DataError
from conftest import load_script

_H, _W = 32, 48  # STC frames are wider than tall, like the real 480x856.


def _script(name: str):
  """Imports scripts/<name>.py (not a package) as a module."""
  return load_script(f'scripts/{name}.py')


def _frame(value: int) -> np.ndarray:
  image = np.zeros((_H, _W, 3), np.uint8)
  image[:, :, 0] = value
  image[:, :_W // 2, 1] = 255 - value
  return image


def _write_video(path: pathlib.Path, num_frames: int) -> None:
  av = pytest.importorskip('av')
  path.parent.mkdir(parents=True, exist_ok=True)
  with av.open(os.fspath(path), 'w') as container:
    stream = container.add_stream('mjpeg', rate=24)
    stream.width, stream.height, stream.pix_fmt = _W, _H, 'yuvj420p'
    for i in range(num_frames):
      frame = av.VideoFrame.from_ndarray(_frame(20 * i), format='rgb24')
      for packet in stream.encode(frame):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


# Frame labels of the fake test clip; with frame_step 2 frames 0, 2, 4, 6
# are kept: labels 0, 1, 1, 1 (frame 4's pixel mask is empty).
_LABELS = np.array([0, 0, 1, 1, 1, 0, 1], np.uint8)


def _pixel_masks() -> np.ndarray:
  masks = np.zeros((len(_LABELS), _H, _W), np.uint8)
  for i in (2, 3, 6):
    masks[i, 4 + i:12 + i, 10:20 + i] = 1
  return masks


def _make_stc(root: pathlib.Path) -> pathlib.Path:
  """Scene 01: 2 training videos of 7 frames + 1 test clip; scene 02: video only."""
  for name in ('01_001', '01_002', '02_001'):
    _write_video(root / 'training' / 'videos' / f'{name}.avi', 7)
  clip = root / 'testing' / 'frames' / '01_0014'
  clip.mkdir(parents=True)
  for i in range(len(_LABELS)):
    Image.fromarray(_frame(30 * i)).save(clip / f'{i:03d}.jpg', quality=95)
  for sub, array in (('test_frame_mask', _LABELS), ('test_pixel_mask',
                                                    _pixel_masks())):
    (root / 'testing' / sub).mkdir(parents=True)
    np.save(root / 'testing' / sub / '01_0014.npy', array)
  return root


@pytest.fixture
def stc(tmp_path) -> pathlib.Path:
  return _make_stc(tmp_path / 'shanghaitech')


def _files(path: pathlib.Path) -> list[str]:
  return sorted(p.name for p in path.iterdir())


def _no_leftovers(parent: pathlib.Path) -> bool:
  return not any(p.name.startswith('.') for p in parent.iterdir())


def test_mstc_layout_counts_and_masks(stc, tmp_path):
  out = tmp_path / 'mstc'
  summary = mstc.convert_mstc(stc, out, frame_step=2, num_workers=2)
  assert _files(out) == ['01', 'mstc_conversion.json']
  assert summary['skipped_scenes'] == ['02']
  # Frame 4 is labelled anomalous but has no defect pixel: left out.
  assert summary['scenes']['01'] == dict(
      train=8, test_good=1, test_anomaly=2, anomaly_without_pixels=1)
  cat = out / '01'
  assert _files(cat / 'train' / 'good') == [
      f'01_00{v}_{i:04d}.jpg' for v in (1, 2) for i in (0, 2, 4, 6)
  ]
  assert _files(cat / 'test' / 'good') == ['01_0014_0000.jpg']
  assert _files(cat / 'test'
                / 'anomaly') == [f'01_0014_{i:04d}.jpg' for i in (2, 6)]
  masks = _pixel_masks()
  for i in (2, 6):
    mask = np.asarray(
        Image.open(cat / 'ground_truth' / 'anomaly'
                   / f'01_0014_{i:04d}_mask.png'))
    assert mask.shape == (_H, _W) and set(np.unique(mask)) <= {0, 255}
    np.testing.assert_array_equal(mask == 255, masks[i] == 1)
  # Training frames are the decoded video frames (JPEG round trips twice).
  frame = np.asarray(Image.open(cat / 'train' / 'good' / '01_001_0004.jpg'))
  assert frame.shape == (_H, _W, 3)
  assert np.abs(frame.astype(int) - _frame(80)).mean() < 6
  with open(out / 'mstc_conversion.json') as f:
    assert json.load(f)['frame_step'] == 2
  # The project's MVTec loader reads the result.
  test = folder.load_split(str(out), '01', 'test', 32, 3, num_workers=1)
  assert test.labels.tolist() == [1, 1, 0]
  assert folder.load_split(str(out), '01', 'train', 32, 3).num_examples == 8
  assert _no_leftovers(tmp_path)


def test_mstc_png_resize_and_scene_choice(stc, tmp_path):
  out = tmp_path / 'mstc'
  mstc.convert_mstc(
      stc,
      out,
      frame_step=3,
      scenes=['01'],
      image_format='png',
      resize=16,
      num_workers=1)
  anomalies = _files(out / '01' / 'test' / 'anomaly')
  assert anomalies == ['01_0014_0003.png', '01_0014_0006.png']
  image = Image.open(out / '01' / 'test' / 'anomaly' / anomalies[0])
  mask = Image.open(out / '01' / 'ground_truth' / 'anomaly'
                    / '01_0014_0003_mask.png')
  assert image.size == mask.size == (16, 16)
  assert len(_files(out / '01' / 'train' / 'good')) == 6


def _break_missing_pixel_mask(root):
  (root / 'testing' / 'test_pixel_mask' / '01_0014.npy').unlink()


def _break_short_labels(root):
  np.save(root / 'testing' / 'test_frame_mask' / '01_0014.npy', _LABELS[:5])


def _break_video(root):
  (root / 'training' / 'videos' / '01_002.avi').write_bytes(b'not a video' * 9)


def _break_frame(root):
  (root / 'testing' / 'frames' / '01_0014' / '004.jpg').write_bytes(b'\xff\xd8')


def _break_training(root):
  (root / 'training' / 'videos').rename(root / 'training' / 'movies')


def _break_mask_size(root):
  np.save(root / 'testing' / 'test_pixel_mask' / '01_0014.npy',
          np.zeros((len(_LABELS), _H, _H), np.uint8))


@pytest.mark.parametrize('breaker,message', [
    (_break_missing_pixel_mask, 'pixel masks are missing for the frames'),
    (_break_short_labels, r'expected \(7,\) for the 7 frames'),
    (_break_video, 'cannot decode video'),
    (_break_frame, 'cannot decode frame'),
    (_break_training, 'training videos folder does not exist'),
    (_break_mask_size, 'pixel mask 0 is 32x32, but frame'),
])
def test_mstc_bad_download_is_one_clear_error(stc, tmp_path, breaker, message):
  breaker(stc)
  out = tmp_path / 'mstc'
  with pytest.raises(DataError, match=message) as info:
    mstc.convert_mstc(stc, out, frame_step=2, num_workers=2)
  assert '\n' not in str(info.value)
  # Nothing half-converted is left behind.
  assert not out.exists() and _no_leftovers(tmp_path)


def test_mstc_refuses_existing_output_unless_overwrite(stc, tmp_path):
  out = tmp_path / 'mstc'
  (out / 'old').mkdir(parents=True)
  with pytest.raises(DataError, match='--overwrite'):
    mstc.convert_mstc(stc, out, frame_step=4, scenes=['01'])
  mstc.convert_mstc(stc, out, frame_step=4, scenes=['01'], overwrite=True)
  assert _files(out) == ['01', 'mstc_conversion.json']
  with pytest.raises(DataError, match='scene.* 07 have no training videos'):
    mstc.convert_mstc(stc, tmp_path / 'x', scenes=['07'])


def test_convert_mstc_script(stc, tmp_path, capsys):
  script = _script('convert_mstc')
  out = tmp_path / 'mstc'
  assert script.main([
      '--source',
      str(stc), '--output',
      str(out), '--frame_step', '2', '--num_workers', '1'
  ]) == 0
  assert 'train 8, test good 1, test anomaly 2 (1 left out' in capsys.readouterr(
  ).out
  _break_missing_pixel_mask(stc)
  assert script.main(
      ['--source', str(stc), '--output',
       str(tmp_path / 'other')]) == 1
  err = capsys.readouterr().err
  assert err.startswith('error: ') and err.count('\n') == 1


# ---------------------------------------------------------------------------
# LAG.


def _make_lag(root: pathlib.Path,
              num_normal: int = 5,
              num_glaucoma: int = 3) -> pathlib.Path:
  rng = np.random.default_rng(0)
  for kind, count in (('non_glaucoma', num_normal), ('suspicious_glaucoma',
                                                     num_glaucoma)):
    (root / kind / 'image').mkdir(parents=True)
    for i in range(count):
      image = rng.integers(0, 255, (24, 24, 3), np.uint8)
      Image.fromarray(image).save(root / kind / 'image' / f'{kind[:3]}{i}.jpg')
  (root / 'suspicious_glaucoma' / 'attention_map').mkdir()
  for i in range(num_glaucoma):
    # A bright blob on the left, dim on the right: the mask is the left part.
    attention = np.zeros((12, 12), np.uint8)  # Half size: gets resized.
    attention[2:10, 1:5] = 200
    attention[2:10, 8:11] = 60
    Image.fromarray(attention).save(root / 'suspicious_glaucoma'
                                    / 'attention_map' / f'sus{i}.jpg')
  return root


@pytest.fixture
def lag_source(tmp_path) -> pathlib.Path:
  return _make_lag(tmp_path / 'LAG')


def test_lag_layout_counts_and_masks(lag_source, tmp_path):
  out = tmp_path / 'lag'
  summary = lag.convert_lag(lag_source, out, num_test_normal=2, seed=1)
  cat = out / 'lag'
  assert (summary['train'], summary['test_good'], summary['test_glaucoma'],
          summary['empty_masks']) == (3, 2, 3, 0)
  assert len(_files(cat / 'train' / 'good')) == 3
  assert _files(cat / 'test'
                / 'good') == [f'{s}.jpg' for s in summary['test_good_stems']]
  assert _files(cat / 'test'
                / 'glaucoma') == ['sus0.jpg', 'sus1.jpg', 'sus2.jpg']
  # Images are copied byte for byte.
  assert ((cat / 'test' / 'glaucoma'
           / 'sus1.jpg').read_bytes() == (lag_source / 'suspicious_glaucoma'
                                          / 'image' / 'sus1.jpg').read_bytes())
  mask = np.asarray(
      Image.open(cat / 'ground_truth' / 'glaucoma' / 'sus0_mask.png'))
  assert mask.shape == (24, 24) and set(np.unique(mask)) == {0, 255}
  assert mask[6:18, 3:9].all() and not mask[:, 14:].any()
  test = folder.load_split(str(out), 'lag', 'test', 32, 3, num_workers=1)
  assert test.labels.tolist() == [1, 1, 1, 0, 0]
  assert _no_leftovers(tmp_path)


def test_lag_split_is_deterministic_from_the_seed(lag_source, tmp_path):
  stems = [
      lag.convert_lag(
          lag_source, tmp_path / f'out{i}', num_test_normal=2,
          seed=seed)['test_good_stems'] for i, seed in enumerate((7, 7, 8, 9))
  ]
  assert stems[0] == stems[1]
  assert any(s != stems[0] for s in stems[2:])


def test_attention_mask_threshold_is_relative_to_the_maximum():
  attention = Image.fromarray(np.array([[0, 40, 41, 80]], np.uint8))
  np.testing.assert_array_equal(
      lag.attention_mask(attention, (4, 1), 0.5), [[False, False, True, True]])
  assert not lag.attention_mask(Image.new('L', (3, 3)), (3, 3), 0.5).any()


def _lag_missing_map(root):
  (root / 'suspicious_glaucoma' / 'attention_map' / 'sus2.jpg').unlink()


def _lag_missing_normal(root):
  (root / 'non_glaucoma' / 'image').rename(root / 'non_glaucoma' / 'images')


def _lag_bad_image(root):
  (root / 'non_glaucoma' / 'image' / 'non3.jpg').write_bytes(b'')


def _lag_bad_map(root):
  (root / 'suspicious_glaucoma' / 'attention_map'
   / 'sus1.jpg').write_bytes(b'\xff\xd8\xff')


@pytest.mark.parametrize('breaker,message', [
    (_lag_missing_map, 'sus2.jpg: attention map is missing for glaucoma'),
    (_lag_missing_normal, 'non_glaucoma/image: LAG folder does not exist'),
    (_lag_bad_image, 'non3.jpg: image file is empty'),
    (_lag_bad_map, 'sus1.jpg: cannot decode attention map'),
])
def test_lag_bad_download_is_one_clear_error(lag_source, tmp_path, breaker,
                                             message):
  breaker(lag_source)
  out = tmp_path / 'lag'
  with pytest.raises(DataError, match=message):
    lag.convert_lag(lag_source, out, num_test_normal=2)
  assert not out.exists() and _no_leftovers(tmp_path)


def test_lag_bad_options(lag_source, tmp_path):
  with pytest.raises(
      DataError, match=r'num_test_normal must be an integer in '
      r'\[0, 5\)'):
    lag.convert_lag(lag_source, tmp_path / 'a', num_test_normal=5)
  with pytest.raises(DataError, match='threshold must be in'):
    lag.convert_lag(
        lag_source, tmp_path / 'b', num_test_normal=1, threshold=1.5)


def test_convert_lag_script(lag_source, tmp_path, capsys):
  script = _script('convert_lag')
  out = tmp_path / 'lag'
  assert script.main([
      '--source',
      str(lag_source), '--output',
      str(out), '--num_test_normal', '1'
  ]) == 0
  assert 'train 4, test good 1, test glaucoma 3' in capsys.readouterr().out
  assert script.main(
      ['--source',
       str(tmp_path / 'nowhere'), '--output',
       str(tmp_path / 'x')]) == 1
  err = capsys.readouterr().err
  assert err == f'error: {tmp_path / "nowhere"}: LAG source folder does not exist\n'
