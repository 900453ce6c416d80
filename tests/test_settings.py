"""The library's defaults (cavga_jax.typed_config) are configs/default.py's."""

import ml_collections
import pytest

from cavga_jax import config_checks
from cavga_jax import typed_config
from cavga_jax.data import weak
from cavga_jax.errors import CavgaError
from cavga_jax.evaluation import evaluator as evaluator_lib
from cavga_jax.maps import anomaly_maps
from cavga_jax.maps import feature_gaussian
from cavga_jax.maps import feature_knn
from cavga_jax.models import cavga
from cavga_jax.programs import runtime
from cavga_jax.programs import train as train_lib
from cavga_jax.training import training_loop
from configs import default
from configs import dsprites

# Sections whose fields are one value each (a dict of named weights, the
# synthesis settings), not fields of their own.
_ATOMIC = ('loss_weights', 'data.synthetic')


def _fields(config, prefix=''):
  """{dotted field: value} of every leaf of ``config`` (lists as tuples)."""
  out = {}
  for name, value in config.items():
    path = prefix + name
    if isinstance(value, ml_collections.ConfigDict) and path not in _ATOMIC:
      out.update(_fields(value, path + '.'))
    else:
      out[path] = tuple(value) if isinstance(value, list) else value
  return out


def test_every_field_of_default_py_is_the_library_default():
  fields = _fields(default.get_config())
  for field, value in fields.items():
    if field in typed_config.REQUIRED:
      continue
    if field == 'data.synthetic':
      # Off by default; its other fields are SynthesisSettings's.
      value = dict(value)
      assert value.pop('fraction') == typed_config.default(
          'data.synthetic.fraction')
      expected = typed_config.SynthesisSettings()
      for name, v in value.items():
        v = tuple(v) if isinstance(v, (list, tuple)) else v
        assert v == getattr(expected, name), f'data.synthetic.{name}'
      continue
    assert typed_config.has_default(field), (
        f'configs/default.py sets {field}, the library has no default for it')
    assert typed_config.default(field) == value, field
  # Every required field is in the documented config too.
  assert typed_config.REQUIRED <= set(fields)
  # The three the issue found differing.
  assert typed_config.default('eval.map') == 'feature_gaussian'
  assert typed_config.default('model.latent_dim') == 512
  assert typed_config.default('data.num_workers') == 8
  # The defaults are the dataclasses' (written once).
  assert typed_config.EvalSettings(
      batch_size=1, num_panels=0).map == ('feature_gaussian')


def test_typed_settings_hold_every_field_of_default_py():
  config = default.get_config()
  run = typed_config.from_config(config)
  for field, value in _fields(config).items():
    if field == 'data.synthetic':
      assert run.data.synthetic is None  # fraction 0: off
      continue
    node = run
    for part in field.split('.'):
      node = node[part] if isinstance(node, dict) else getattr(node, part)
    assert node == (dict(value) if field == 'loss_weights' else value), field


def test_library_defaults_of_cavga_task_appear_in_default_py():
  """A default only the library knows about would be undocumented."""
  fields = set(_fields(default.get_config())) | {'data.synthetic.fraction'}
  # Fields of other configs (CAVGA_w, one-class TFDS data, a fixed
  # generated dataset); each is documented where it is used.
  elsewhere = {
      'data.weak_anomalies_per_batch', 'data.weak_fraction',
      'data.weak_min_per_defect', 'data.weak_seed', 'data.generated_seed',
      'data.normal_class', 'data.download'
  }
  assert set(typed_config.DEFAULTS) - fields == elsewhere


def test_vae_defaults_are_configs_dsprites_values():
  fields = _fields(dsprites.get_config())
  for field, value in typed_config.VAE_DEFAULTS.items():
    assert fields[field] == value, field
  assert typed_config.VAE_REQUIRED <= set(fields)
  assert typed_config.default('eval.map', 'vae') == 'mean'


def test_module_dataclass_defaults_agree_with_the_table():
  features = feature_gaussian.FeatureSettings()
  assert features.stages == typed_config.default('eval.feature_stages')
  assert features.dims == typed_config.default('eval.feature_dims')
  assert (features.grid_divisor == typed_config.default(
      'eval.feature_grid_divisor'))
  assert (feature_gaussian.SHRINKAGE == typed_config.default(
      'eval.feature_shrinkage'))
  knn = feature_knn.KnnSettings()
  for name in ('stages', 'grid_divisor', 'bank_size', 'chunk'):
    assert getattr(knn, name) == typed_config.default(f'eval.knn_{name}'), name
  assert (anomaly_maps.MapSettings().ssim_window == typed_config.default(
      'eval.ssim_window'))
  assert cavga.NUM_ENCODER_STAGES == typed_config.default(
      'model.attention_stage')
  assert weak.DEFAULT_FRACTION == typed_config.default('data.weak_fraction')
  assert (weak.DEFAULT_MIN_PER_DEFECT == typed_config.default(
      'data.weak_min_per_defect'))
  assert weak.DEFAULT_SEED == typed_config.default('data.weak_seed')
  loop = training_loop.LoopSettings(num_steps=1, batch_size=1)
  for name in ('keep_checkpoints', 'prefetch', 'nonfinite',
               'max_consecutive_skips', 'eval_every'):
    assert getattr(loop, name) == typed_config.default(f'train.{name}'), name


def _required_only(config):
  """``config`` with only its required fields (and sections)."""
  out = ml_collections.ConfigDict()
  for field in sorted(typed_config.REQUIRED):
    *parents, name = field.split('.')
    node = out
    for parent in parents:
      if parent not in node:
        node[parent] = ml_collections.ConfigDict()
      node = node[parent]
    value = config
    for part in field.split('.'):
      value = value[part]
    node[name] = value
  return out


def test_a_config_built_in_python_gets_the_library_defaults():
  """Only the required fields given: the same models, loop and checks."""
  full = default.get_config()
  minimal = _required_only(full)
  assert 'map' not in minimal.eval and 'latent_dim' not in minimal.model
  config_checks.check_config(minimal)
  assert typed_config.from_config(minimal) == typed_config.from_config(full)
  assert train_lib.build_models(minimal) == train_lib.build_models(full)
  loop = training_loop.LoopSettings.from_settings
  assert (loop(minimal.seed,
               typed_config.from_config(minimal).train) == loop(
                   full.seed,
                   typed_config.from_config(full).train))
  assert evaluator_lib.map_settings(typed_config.from_config(minimal).eval,
                                    64) == evaluator_lib.map_settings(
                                        typed_config.from_config(full).eval, 64)
  assert evaluator_lib.feature_settings(
      typed_config.from_config(minimal).eval) == evaluator_lib.feature_settings(
          typed_config.from_config(full).eval)


def test_checking_a_config_builds_no_network(monkeypatch):

  def no_networks(*args, **kwargs):
    raise AssertionError('config_checks built a network')

  monkeypatch.setattr(cavga, 'build_models', no_networks)
  monkeypatch.setattr(cavga.CAVGAGenerator, '__init__', no_networks)
  for get_config in (default.get_config, dsprites.get_config):
    config_checks.check_config(get_config())
  config = default.get_config()
  config.data.image_size = 60  # not a multiple of CAVGA-D's stride
  with pytest.raises(CavgaError, match='multiple of 16 for CAVGA-D'):
    config_checks.check_config(config)


def test_a_missing_required_field_is_reported():
  config = _required_only(default.get_config())
  del config.model['latent_channels']
  with pytest.raises(
      CavgaError, match='config.model.latent_channels is '
      'missing'):
    config_checks.check_config(config)
  with pytest.raises(KeyError):
    typed_config.default('model.latent_channels')
  with pytest.raises(
      CavgaError, match='config.model.latent_channels is '
      'missing'):
    typed_config.from_config(config)


def test_a_run_checks_its_config_once(tiny_config, tmp_path, monkeypatch):
  calls = []
  check = config_checks.check_config
  monkeypatch.setattr(config_checks, 'check_config',
                      lambda config: calls.append(1) or check(config))
  tiny_config.train.num_steps = 0  # Set up the run, train nothing.
  runtime.run_program(
      runtime.task_program({'cavga': train_lib.train}), tiny_config,
      str(tmp_path / 'run'), '')
  assert len(calls) == 1
