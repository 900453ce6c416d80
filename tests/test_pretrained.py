"""Tests for ImageNet initialisation: torch_weights, pretrained, the script.

No download and no torch: a random state dict with torchvision resnet18's
exact keys and shapes stands in for the real weights, and the PyTorch
forward pass (NCHW, OIHW, cross-correlation, eval-mode BN) is re-implemented
in numpy so that a wrong transpose or name mapping shows up as a numeric
difference.
"""

from __future__ import annotations

import math
import pathlib
from types import ModuleType

from flax import traverse_util
from flax.core import frozen_dict
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy

from cavga_jax import errors
from cavga_jax.models import backbones
from cavga_jax.models import cavga
from cavga_jax.weights import pretrained
from cavga_jax.weights import torch_weights
from conftest import load_script

_IMAGE_SIZE = 64
_BN_EPS = 1e-5

# ----------------------------------------------------------------------------
# torchvision resnet18 stand-in and numpy reference forward pass.
# ----------------------------------------------------------------------------


def _torchvision_resnet18_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
  """Random weights with torchvision resnet18's state_dict keys and shapes.

  Written out independently of cavga_jax.weights.torch_weights so that a
  mistake in its
  key table is not mirrored here. He-scaled convs and BN statistics near 1
  keep activations O(1) through all 8 blocks, so tolerances stay tight.

  Returns:
    torch key -> array: conv weights (O, I, kh, kw) float32, BN
    weight/bias/running_mean/running_var (C,) float32, num_batches_tracked
    () int64, fc.weight (1000, 512), fc.bias (1000,).
  """
  rng = np.random.default_rng(seed)
  sd = {}

  def conv(name: str, out_ch: int, in_ch: int, k: int) -> None:
    std = math.sqrt(2.0 / (in_ch * k * k))
    sd[f'{name}.weight'] = rng.normal(0, std,
                                      (out_ch, in_ch, k, k)).astype(np.float32)

  def bn(name: str, ch: int) -> None:
    sd[f'{name}.weight'] = rng.uniform(0.5, 1.5, ch).astype(np.float32)
    sd[f'{name}.bias'] = rng.normal(0, 0.1, ch).astype(np.float32)
    sd[f'{name}.running_mean'] = rng.normal(0, 0.1, ch).astype(np.float32)
    sd[f'{name}.running_var'] = rng.uniform(0.5, 1.5, ch).astype(np.float32)
    sd[f'{name}.num_batches_tracked'] = np.array(1000, np.int64)

  conv('conv1', 64, 3, 7)
  bn('bn1', 64)
  in_ch = 64
  for stage, width in enumerate((64, 128, 256, 512), start=1):
    for block in range(2):
      prefix = f'layer{stage}.{block}'
      conv(f'{prefix}.conv1', width, in_ch if block == 0 else width, 3)
      bn(f'{prefix}.bn1', width)
      conv(f'{prefix}.conv2', width, width, 3)
      bn(f'{prefix}.bn2', width)
      if stage > 1 and block == 0:
        conv(f'{prefix}.downsample.0', width, in_ch, 1)
        bn(f'{prefix}.downsample.1', width)
    in_ch = width
  sd['fc.weight'] = rng.normal(0, 0.01, (1000, 512)).astype(np.float32)
  sd['fc.bias'] = np.zeros(1000, np.float32)
  return sd


def _conv_nchw(x: np.ndarray, w: np.ndarray, stride: int,
               pad: int) -> np.ndarray:
  """torch.nn.functional.conv2d: x (N, C, H, W), w (O, C, kh, kw) -> NOHW.

  Cross-correlation (no kernel flip), symmetric zero padding.
  """
  kh, kw = w.shape[2:]
  xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  windows = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(2, 3))
  windows = windows[:, :, ::stride, ::stride]  # (N, C, Ho, Wo, kh, kw)
  return np.einsum('nchwij,ocij->nohw', windows, w, optimize=True)


def _bn_eval(x: np.ndarray, sd: dict[str, np.ndarray], name: str) -> np.ndarray:
  """Eval-mode BatchNorm2d on (N, C, H, W) with the running statistics."""
  c = lambda v: v[None, :, None, None].astype(np.float64)
  inv = 1.0 / np.sqrt(c(sd[f'{name}.running_var']) + _BN_EPS)
  return ((x - c(sd[f'{name}.running_mean'])) * inv * c(sd[f'{name}.weight'])
          + c(sd[f'{name}.bias']))


def _max_pool_3x3_s2_p1(x: np.ndarray) -> np.ndarray:
  """nn.MaxPool2d(3, 2, 1) on (N, C, H, W); padding never wins the max."""
  xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
  windows = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3))
  return windows[:, :, ::2, ::2].max(axis=(-2, -1))


def _torch_stem(x: np.ndarray, sd: dict[str, np.ndarray]) -> np.ndarray:
  """conv1-bn1-relu-maxpool of torchvision resnet18, NCHW float64."""
  y = _conv_nchw(x, sd['conv1.weight'].astype(np.float64), 2, 3)
  return _max_pool_3x3_s2_p1(np.maximum(_bn_eval(y, sd, 'bn1'), 0))


def _torch_resnet18_features(x: np.ndarray, sd: dict[str,
                                                     np.ndarray]) -> np.ndarray:
  """torchvision resnet18 up to layer4 (no avgpool/fc), eval mode, NCHW."""
  w = lambda name: sd[f'{name}.weight'].astype(np.float64)
  x = _torch_stem(x, sd)
  for stage in range(1, 5):
    for block in range(2):
      p = f'layer{stage}.{block}'
      stride = 2 if stage > 1 and block == 0 else 1
      y = np.maximum(
          _bn_eval(_conv_nchw(x, w(f'{p}.conv1'), stride, 1), sd, f'{p}.bn1'),
          0)
      y = _bn_eval(_conv_nchw(y, w(f'{p}.conv2'), 1, 1), sd, f'{p}.bn2')
      if f'{p}.downsample.0.weight' in sd:
        x = _bn_eval(
            _conv_nchw(x, w(f'{p}.downsample.0'), stride, 0), sd,
            f'{p}.downsample.1')
      x = np.maximum(x + y, 0)
  return x


def _assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
  """float32 network vs float64 reference, relative to the output's scale."""
  expected = np.asarray(expected)
  scale = float(np.max(np.abs(expected)))
  assert scale > 0
  np.testing.assert_allclose(
      np.asarray(actual, np.float64), expected, rtol=1e-4, atol=1e-5 * scale)


# ----------------------------------------------------------------------------
# Fixtures.
# ----------------------------------------------------------------------------


def _load_script() -> ModuleType:
  return load_script('scripts/convert_torchvision_resnet18.py')


@pytest.fixture(scope='module')
def state_dict() -> dict[str, np.ndarray]:
  return _torchvision_resnet18_state_dict()


@pytest.fixture(scope='module')
def converted_npz(tmp_path_factory, state_dict) -> tuple[pathlib.Path, dict]:
  """Runs the script on a .safetensors file; (npz path, its arrays)."""
  tmp = tmp_path_factory.mktemp('weights')
  src, out = tmp / 'model.safetensors', tmp / 'resnet18_imagenet.npz'
  safetensors_numpy.save_file(state_dict, str(src))
  assert _load_script().main(['--input', str(src), '--output', str(out)]) == 0
  with np.load(out) as npz:
    arrays = {k: npz[k] for k in npz.files}
  return out, arrays


@pytest.fixture(scope='module')
def generator() -> cavga.CAVGAGenerator:
  return cavga.CAVGAGenerator(variant='R', image_size=_IMAGE_SIZE)


@pytest.fixture(scope='module')
def variables(generator) -> dict:
  """Real ``generator.init`` variables with jax.random.key(0)."""
  key = jax.random.key(0)
  lowered = jax.jit(lambda k: generator.init(
      k, jnp.zeros((1, _IMAGE_SIZE, _IMAGE_SIZE, 3)), None, False)).lower(key)
  # Eager init compiles every op separately and optimised XLA spends ~10 s on
  # this one-off program on CPU; unoptimised code runs it in ~1 s instead.
  try:
    compiled = lowered.compile(
        compiler_options={'xla_backend_optimization_level': 0})
  except RuntimeError:  # An XLA without this option: only slower.
    compiled = lowered.compile()
  return compiled(key)


@pytest.fixture(scope='module')
def loaded(variables, converted_npz) -> dict:
  return pretrained.load_pretrained_encoder(variables, str(converted_npz[0]))


def _abstract_variables(**generator_kwargs) -> dict:
  """Zero variables of a generator variant, shapes only (no slow init)."""
  channels = generator_kwargs.pop('input_channels', 3)
  model = cavga.CAVGAGenerator(image_size=_IMAGE_SIZE, **generator_kwargs)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros(
          (1, _IMAGE_SIZE, _IMAGE_SIZE, channels)), None, False))
  return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def _flat(tree) -> dict[str, object]:
  return traverse_util.flatten_dict(frozen_dict.unfreeze(tree), sep='/')


# ----------------------------------------------------------------------------
# Conversion.
# ----------------------------------------------------------------------------


def test_stand_in_matches_torchvision_resnet18(state_dict):
  # torchvision: len(resnet18().state_dict()) == 122, 11,689,512 parameters.
  assert len(state_dict) == 122
  n_params = sum(
      v.size
      for k, v in state_dict.items()
      if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked')))
  assert n_params == 11_689_512


def test_script_writes_flax_paths(converted_npz, state_dict):
  path, arrays = converted_npz
  assert path.is_file()
  assert len(arrays) == 100
  assert all(a.dtype == np.float32 for a in arrays.values())
  np.testing.assert_array_equal(
      arrays['params/encoder/conv1/kernel'],
      state_dict['conv1.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(
      arrays['params/encoder/layer3_0/downsample_conv/kernel'],
      state_dict['layer3.0.downsample.0.weight'].transpose(2, 3, 1, 0))
  bn_pairs = {'scale': 'weight', 'bias': 'bias'}
  for ours, theirs in bn_pairs.items():
    np.testing.assert_array_equal(arrays[f'params/encoder/layer4_1/bn2/{ours}'],
                                  state_dict[f'layer4.1.bn2.{theirs}'])
  np.testing.assert_array_equal(
      arrays['batch_stats/encoder/layer2_0/downsample_bn/mean'],
      state_dict['layer2.0.downsample.1.running_mean'])
  np.testing.assert_array_equal(arrays['batch_stats/encoder/bn1/var'],
                                state_dict['bn1.running_var'])
  n_params = sum(a.size for k, a in arrays.items() if k.startswith('params/'))
  assert n_params == 11_689_512 - 512 * 1000 - 1000  # Without fc.


def test_script_reports_what_it_wrote(tmp_path, state_dict, capsys):
  src, out = tmp_path / 'model.safetensors', tmp_path / 'sub' / 'w.npz'
  safetensors_numpy.save_file(state_dict, str(src))
  assert _load_script().main(['--input', str(src), '--output', str(out)]) == 0
  printed = capsys.readouterr().out
  assert '100 tensors' in printed and '11,176,512 parameters' in printed
  assert out.is_file()


def test_script_fails_in_one_line(tmp_path, capsys):
  missing = tmp_path / 'nope.safetensors'
  assert _load_script().main(
      ['--input', str(missing), '--output',
       str(tmp_path / 'o.npz')]) == 1
  err = capsys.readouterr().err
  assert str(missing) in err and len(err.strip().splitlines()) == 1
  assert not (tmp_path / 'o.npz').exists()


def test_unreadable_pth_is_one_line_naming_the_file(tmp_path):
  # .pth files are read without torch (torch_pickle); garbage is refused.
  pth = tmp_path / 'resnet18-f37072fd.pth'
  pth.write_bytes(b'not read')
  with pytest.raises(
      errors.DataError,
      match='resnet18-f37072fd.pth: cannot read PyTorch') as e:
    torch_weights.read_state_dict(str(pth))
  assert len(str(e.value).splitlines()) == 1


def test_convert_strips_data_parallel_prefix(state_dict):
  wrapped = {f'module.{k}': v for k, v in state_dict.items()}
  assert (torch_weights.convert_resnet18_state_dict(wrapped).keys() ==
          torch_weights.convert_resnet18_state_dict(state_dict).keys())


@pytest.mark.parametrize('change, message', [
    (lambda sd: sd.pop('layer3.1.bn2.running_var'), 'layer3.1.bn2.running_var'),
    (lambda sd: sd.update({'layer5.0.conv1.weight': np.zeros(
        (1,))}), 'unexpected keys layer5.0.conv1.weight'),
    (lambda sd: sd.update({'conv1.weight': np.zeros((64, 3, 3, 3))}),
     r'conv1.weight is \(64, 3, 3, 3\), expected \(64, 3, 7, 7\)'),
    (lambda sd: sd.update({'bn1.bias': np.full(64, np.nan)}), 'non-finite'),
])
def test_convert_rejects_bad_state_dicts(state_dict, change, message):
  broken = dict(state_dict)
  change(broken)
  with pytest.raises(errors.DataError, match=message):
    torch_weights.convert_resnet18_state_dict(broken, source='x.safetensors')


# ----------------------------------------------------------------------------
# Loading into the generator.
# ----------------------------------------------------------------------------


def test_load_replaces_exactly_the_encoder(variables, loaded, converted_npz):
  _, arrays = converted_npz
  assert (jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(
      variables))
  before, after = _flat(variables), _flat(loaded)
  encoder_keys = {k for k in before if k.split('/')[1] == 'encoder'}
  assert encoder_keys == set(arrays)
  for key, old in before.items():
    new = after[key]
    assert new.shape == old.shape and new.dtype == old.dtype, key
    if key in encoder_keys:
      assert isinstance(new, jax.Array), key
      np.testing.assert_array_equal(np.asarray(new), arrays[key], err_msg=key)
    else:
      assert new is old, key  # Untouched, not even copied.
  # The input was not modified in place.
  assert not np.array_equal(
      np.asarray(before['params/encoder/conv1/kernel']),
      arrays['params/encoder/conv1/kernel'])


def test_load_keeps_frozen_dict(variables, converted_npz):
  frozen = frozen_dict.freeze(variables)
  out = pretrained.load_pretrained_encoder(frozen, str(converted_npz[0]))
  assert isinstance(out, frozen_dict.FrozenDict)
  assert (jax.tree_util.tree_structure(
      frozen_dict.unfreeze(out)) == jax.tree_util.tree_structure(variables))


def test_conv1_kernel_is_torch_cross_correlation(state_dict, converted_npz):
  # Odd size: stride-2 windows then end short of the padded border.
  x = np.random.default_rng(1).uniform(-1, 1, (2, 37, 37, 3)).astype(np.float32)
  conv = nn.Conv(64, (7, 7), (2, 2), ((3, 3), (3, 3)), use_bias=False)
  kernel = converted_npz[1]['params/encoder/conv1/kernel']
  with jax.default_matmul_precision('highest'):  # No TF32 on GPUs.
    ours = conv.apply({'params': {'kernel': kernel}}, x)
  theirs = _conv_nchw(
      x.transpose(0, 3, 1, 2).astype(np.float64),
      state_dict['conv1.weight'].astype(np.float64), 2, 3)
  _assert_close(ours, theirs.transpose(0, 2, 3, 1))


def test_encoder_matches_torch_forward(state_dict, generator, loaded):
  x = np.random.default_rng(2).uniform(
      -1, 1, (1, _IMAGE_SIZE, _IMAGE_SIZE, 3)).astype(np.float32)
  x_nchw = x.transpose(0, 3, 1, 2).astype(np.float64)
  encoder_vars = {c: loaded[c]['encoder'] for c in ('params', 'batch_stats')}
  with jax.default_matmul_precision('highest'):
    # Stem alone, through the real conv1/bn1 submodules' variables.
    stem = nn.Sequential([
        nn.Conv(64, (7, 7), (2, 2), ((3, 3), (3, 3)), use_bias=False),
        nn.BatchNorm(use_running_average=True, momentum=0.9, epsilon=_BN_EPS),
        nn.relu,
        lambda y: nn.max_pool(y, (3, 3), (2, 2), ((1, 1), (1, 1))),
    ])
    stem_vars = {
        'params': {
            'layers_0': encoder_vars['params']['conv1'],
            'layers_1': encoder_vars['params']['bn1']
        },
        'batch_stats': {'layers_1': encoder_vars['batch_stats']['bn1']},
    }
    stem_out = stem.apply(stem_vars, x)
    features = backbones.ResNet18Encoder().apply(encoder_vars, x, False)
    encoded = generator.apply(loaded, x, False, method='encode')
  _assert_close(stem_out, _torch_stem(x_nchw, state_dict).transpose(0, 2, 3, 1))
  expected = _torch_resnet18_features(x_nchw, state_dict).transpose(0, 2, 3, 1)
  assert features.shape == (1, _IMAGE_SIZE // 32, _IMAGE_SIZE // 32, 512)
  _assert_close(features, expected)
  _assert_close(encoded, expected)


def test_grayscale_model_sums_rgb_kernel(converted_npz):
  abstract = _abstract_variables(input_channels=1)
  out = pretrained.load_pretrained_encoder(abstract, str(converted_npz[0]))
  rgb = converted_npz[1]['params/encoder/conv1/kernel']
  gray = out['params']['encoder']['conv1']['kernel']
  assert gray.shape == (7, 7, 1, 64)
  np.testing.assert_allclose(gray, rgb.sum(axis=2, keepdims=True), rtol=1e-6)


@pytest.mark.parametrize('kwargs, message', [
    (dict(encoder_widths=(32, 64, 128, 256)), 'encoder_widths'),
    (dict(input_channels=2), r'conv1/kernel is \(7, 7, 3, 64\) in the file, '
     r'\(7, 7, 2, 64\) in the model'),
    (dict(variant='D'), "variant='R'"),
])
def test_load_rejects_models_that_do_not_fit(converted_npz, kwargs, message):
  path = str(converted_npz[0])
  with pytest.raises(errors.DataError, match=message) as info:
    pretrained.load_pretrained_encoder(_abstract_variables(**kwargs), path)
  assert str(info.value).startswith(path)
  assert '\n' not in str(info.value)


def test_load_rejects_missing_entry(tmp_path, converted_npz, variables):
  arrays = dict(converted_npz[1])
  del arrays['batch_stats/encoder/layer2_1/bn1/mean']
  path = tmp_path / 'partial.npz'
  np.savez(path, **arrays)
  with pytest.raises(
      errors.DataError, match='lacks .*batch_stats/encoder/layer2_1/bn1/mean'):
    pretrained.load_pretrained_encoder(variables, str(path))


def test_load_rejects_wrong_shape(tmp_path, converted_npz, variables):
  arrays = dict(converted_npz[1])
  arrays['params/encoder/layer2_0/conv1/kernel'] = np.zeros((3, 3, 64, 64),
                                                            np.float32)
  path = tmp_path / 'wrong.npz'
  np.savez(path, **arrays)
  with pytest.raises(
      errors.DataError, match=r'layer2_0/conv1/kernel is \(3, 3, 64, 64\)'):
    pretrained.load_pretrained_encoder(variables, str(path))


def test_load_rejects_missing_or_unreadable_file(tmp_path, variables):
  missing = tmp_path / 'missing.npz'
  with pytest.raises(errors.DataError, match='not found') as info:
    pretrained.load_pretrained_encoder(variables, str(missing))
  assert str(info.value).startswith(str(missing))
  garbage = tmp_path / 'garbage.npz'
  garbage.write_bytes(b'\x00' * 10)
  with pytest.raises(errors.DataError, match='cannot read'):
    pretrained.load_pretrained_encoder(variables, str(garbage))


# ----------------------------------------------------------------------------
# Training and evaluation with config.model.pretrained.
# ----------------------------------------------------------------------------


def _pretrained_tiny_config(config, npz_path: pathlib.Path):
  """configs/tiny.py as CAVGA-R with the ImageNet encoder widths, 32 px."""
  config.model.variant = 'R'
  config.model.encoder_widths = torch_weights.RESNET18_WIDTHS
  config.model.decoder_widths = (16, 16, 8, 8, 8)
  config.model.pretrained = str(npz_path)
  config.model.input_norm = 'imagenet'
  config.data.num_train = 4
  config.train.batch_size = 2
  config.train.log_every = 1
  config.train.checkpoint_every = 1
  # Adam's update is lr * m / (sqrt(v) + eps): exactly 0, so a trained step
  # keeps the loaded parameters bit for bit.
  config.optimizer.learning_rate = 0.0
  config.eval.batch_size = 4
  config.eval.num_panels = 1
  return config


def test_train_loads_encoder_and_evaluate_needs_no_file(tmp_path, tiny_config,
                                                        converted_npz):
  # Imported here: eval_lib and train_lib are not needed by the tests above.
  from cavga_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from cavga_jax import sharding  # pylint: disable=g-import-not-at-top
  from cavga_jax.programs import evaluate as eval_lib  # pylint: disable=g-import-not-at-top
  from cavga_jax.programs import train as train_lib  # pylint: disable=g-import-not-at-top

  arrays = converted_npz[1]
  npz_path = tmp_path / 'resnet18_imagenet.npz'
  torch_weights.write_npz(arrays, str(npz_path))
  workdir = str(tmp_path / 'run')
  config = _pretrained_tiny_config(tiny_config, npz_path)

  def encoder_of(state, collections=('params', 'batch_stats')):
    variables = {
        'params': state.gen_params, 'batch_stats': state.gen_batch_stats
    }
    return {
        k: np.asarray(v)
        for k, v in _flat(variables).items()
        if k.split('/')[:2] in [[c, 'encoder'] for c in collections]
    }

  # num_steps=0: the state train returns is the initial one, encoder and BN
  # statistics exactly the file's, replicated like the rest of the state.
  config.train.num_steps = 0
  state = train_lib.train(config, workdir)
  initial = encoder_of(state)
  assert initial.keys() == arrays.keys()
  for key, value in arrays.items():
    np.testing.assert_array_equal(initial[key], value, err_msg=key)
  replicated = sharding.replicated(sharding.make_mesh())
  for leaf in jax.tree.leaves(state):
    assert leaf.sharding.is_equivalent_to(replicated, leaf.ndim)
  # The generator's Adam state belongs to the loaded parameters: zeros.
  assert all(not np.any(np.asarray(leaf))
             for leaf in jax.tree.leaves(state.gen_opt_state))
  assert (jax.tree.structure(state.gen_opt_state) == jax.tree.structure(
      state.gen_tx.init(state.gen_params)))

  # One real step (lr 0) through the jitted train step and a checkpoint.
  config.train.num_steps = 1
  state = train_lib.train(config, workdir)
  assert int(state.step) == 1
  trained = encoder_of(state, ('params',))
  for key, value in trained.items():
    np.testing.assert_array_equal(value, arrays[key], err_msg=key)

  # Without the file: resuming restores the checkpoint, evaluation too.
  npz_path.unlink()
  resumed = train_lib.train(config, workdir)
  assert int(resumed.step) == 1
  for key, value in encoder_of(resumed).items():
    np.testing.assert_array_equal(value, encoder_of(state)[key], err_msg=key)
  # The headline and its parts only: every map's Grad-CAM through the
  # ResNet-18 widths would add a minute of compilation to what this checks.
  config.eval.maps = 'headline'
  result = eval_lib.evaluate(config, workdir)
  assert result['checkpoint_step'] == 1
  assert np.isfinite(result['image_auroc'])
  assert checkpointing.make_manager(workdir).latest_step() == 1


def test_train_reports_missing_pretrained_file(tmp_path, tiny_config):
  from cavga_jax.programs import train as train_lib  # pylint: disable=g-import-not-at-top
  missing = tmp_path / 'missing.npz'
  config = _pretrained_tiny_config(tiny_config, missing)
  config.train.num_steps = 0
  with pytest.raises(errors.DataError, match='not found'):
    train_lib.train(config, str(tmp_path / 'run'))


# ----------------------------------------------------------------------------
# Input normalisation (config.model.input_norm).
# ----------------------------------------------------------------------------


def test_imagenet_input_norm_by_hand():
  x = np.zeros((1, 2, 2, 3), np.float32)
  x[..., 0], x[..., 1], x[..., 2] = 1.0, 0.0, -1.0  # u = 1, 0.5, 0 in [0, 1]
  out = np.asarray(cavga.normalize_input(jnp.asarray(x), 'imagenet'))
  # (u - mean) / std: (1 - 0.485) / 0.229, (0.5 - 0.456) / 0.224,
  # (0 - 0.406) / 0.225.
  np.testing.assert_allclose(
      out[0, 0, 0], [2.2489083, 0.19642857, -1.8044444], rtol=1e-6)
  assert out.shape == x.shape and out.dtype == np.float32
  # 1 channel: mean 0.449 and std 0.226 of the RGB values; u = 0.5 and 1.
  gray = np.array([0.0, 1.0], np.float32).reshape(1, 1, 2, 1)
  np.testing.assert_allclose(
      np.asarray(cavga.normalize_input(jnp.asarray(gray), 'imagenet')).ravel(),
      [0.22566372, 2.4380531],
      rtol=1e-6)
  assert cavga.normalize_input(x, 'none') is x
  with pytest.raises(ValueError, match='input_norm'):
    cavga.normalize_input(x, 'imagnet')


def test_input_norm_applies_to_the_encoder_input_only():
  kwargs = dict(
      variant='D',
      image_size=16,
      encoder_widths=(4, 4, 4, 4),
      decoder_widths=(4, 4, 4, 4),
      latent_channels=2)
  plain = cavga.CAVGAGenerator(**kwargs)
  imagenet = cavga.CAVGAGenerator(input_norm='imagenet', **kwargs)
  x = jnp.asarray(
      np.random.default_rng(3).uniform(-1, 1,
                                       (2, 16, 16, 3)).astype(np.float32))
  # The normalisation has no parameters: both share these variables.
  variables = jax.jit(lambda k: plain.init(k, x, None, False))(
      jax.random.key(0))
  normalized = cavga.normalize_input(x, 'imagenet')
  out = imagenet.apply(variables, x, None, False)
  expected = plain.apply(variables, normalized, None, False)
  # The encoder sees exactly the normalised images ...
  np.testing.assert_allclose(
      out['features'], expected['features'], rtol=1e-6, atol=1e-6)
  assert not np.allclose(out['features'],
                         plain.apply(variables, x, False, method='encode'))
  # ... and the decoder is unchanged: its output is still a tanh in [-1, 1].
  np.testing.assert_allclose(
      out['reconstruction'], expected['reconstruction'], rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(
      imagenet.apply(variables, out['z'], False, method='decode'),
      plain.apply(variables, out['z'], False, method='decode'))


def test_config_input_norm(tiny_config):
  from cavga_jax import config_checks  # pylint: disable=g-import-not-at-top
  from cavga_jax.programs import train as train_lib  # pylint: disable=g-import-not-at-top
  tiny_config.model.input_norm = 'imagenet'
  config_checks.check_config(tiny_config)
  assert train_lib.build_models(tiny_config)[0].input_norm == 'imagenet'
  tiny_config.model.input_norm = 'imagenet_rgb'
  with pytest.raises(
      errors.CavgaError, match=r"config.model.input_norm='imagenet_rgb'"):
    config_checks.check_config(tiny_config)
