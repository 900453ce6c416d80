"""Fitted maps saved beside the checkpoint they were fitted for (Orbax).

``<workdir>/fitted/step_<N>/`` (or ``untrained/``) holds ``state/`` (the
``FittedMaps`` pytree, Orbax), the run's ``config.json`` and ``fit.json``:
``{"key": ..., "state_sha256": ...}``. The key is what the state was fitted
under (``fit_key``: the checkpoint's step and the SHA-256 of the
generator's parameters and BatchNorm statistics, the evaluation fields that
change the fit, the image size and the number of normal images);
``state_sha256`` is the SHA-256 of the state's arrays (``tree_sha256``).
``load`` returns the state only when the key is equal, so a retrained
checkpoint, another map setting or other training images refit;
``evaluate.py --refit`` refits regardless. A fit that is unreadable, of an
older format or whose arrays no longer hash to ``state_sha256`` (damaged or
edited files: Orbax reads flipped bytes back without a word) raises
``FitError``: ``evaluate.py`` refits, saying why, ``predict.py`` stops.

The state is ``FittedMaps.to_tree()``: {'maps': {name: that map's state},
'normalisers', 'thresholds'}, whatever maps are registered
(``fitted_map``). A fit saved before the maps were units (top-level
'pixel', 'feature', 'knn_bank') is of an older format: its checksum holds,
``FittedMaps.from_tree`` refuses it, and ``evaluate.py`` refits.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from cavga_jax import sharding
from cavga_jax import typed_config
from cavga_jax import workdirs
from cavga_jax.errors import CavgaError
from cavga_jax.evaluation.fitting import FittedMaps

FITTED_DIR = 'fitted'
KEY_FILE = 'fit.json'
CONFIG_FILE = 'config.json'
# The config.eval fields that change what is fitted (the others: batch
# size, panels and the headline, which only picks among fitted maps).
FIT_FIELDS = ('calibrate', 'residual_sigma', 'ssim_window', 'ssim_scale',
              'feature_stages', 'feature_dims', 'feature_grid_divisor',
              'feature_shrinkage', 'feature_weights', 'knn_stages',
              'knn_grid_divisor', 'knn_bank_size', 'threshold_holdout',
              'threshold_quantile')
# fit_key's fields and their JSON types (a fit.json without them is not one).
_KEY_TYPES = dict(
    step=int,
    variables_sha256=str,
    image_size=int,
    num_normal_images=int,
    eval=dict)


class FitError(CavgaError):
  """A saved fit cannot be used: unreadable, of an older format, or its
  arrays fail their checksum.

  ``problem`` names the file and what is wrong; the message adds what to
  do. ``evaluate.py`` refits (logging ``problem``), ``predict.py`` stops.
  """

  def __init__(self, problem: str):
    self.problem = problem
    super().__init__(f'{problem}; run evaluate.py on this workdir to fit the '
                     'maps again')


def fitted_dir(workdir: str, step: int, untrained: bool = False) -> str:
  """Where the maps fitted for checkpoint ``step`` (or the untrained
  networks) live."""
  return os.path.join(
      os.path.abspath(workdir), FITTED_DIR,
      'untrained' if untrained else f'step_{step}')


def tree_sha256(tree: Any) -> str:
  """SHA-256 (hex) of a pytree's leaves: each leaf's key path, dtype, shape
  and bytes, in ``jax.tree`` order (sorted dict keys).

  A bit flip anywhere changes it, unlike a sum (about 1 GB/s: 0.12 s for
  150 MB on a 2-core CPU). Device arrays are copied to the host first.
  """
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    array = np.asarray(leaf)
    digest.update(f'{jax.tree_util.keystr(path)}|{array.dtype.name}|'
                  f'{array.shape}\n'.encode())
    digest.update(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
  return digest.hexdigest()


# The config.detector fields a fit depends on (the detector map's shape).
DETECTOR_FIELDS = ('aggregate', 'hidden')


def fit_key(eval_settings: Any,
            step: int,
            state: Any,
            image_size: int,
            num_normal: int,
            trained: dict[str, Any] | None = None,
            detector_settings: Any = None) -> dict[str, Any]:
  """The JSON-able identity of a fit (module docstring).

  ``eval_settings``: the typed ``config.eval`` (``typed_config.EvalSettings``).
  ``state``: the train state the maps are fitted for; the key holds the
  SHA-256 of its ``gen_params`` and ``gen_batch_stats``. ``trained``:
  {name: state} of maps trained by ``train.py`` (the detector); with any,
  the key adds ``trained_sha256`` (a retrained detector refits).
  """
  detector_settings = detector_settings or typed_config.DetectorSettings()
  fields = {}
  for name in FIT_FIELDS:
    value = getattr(eval_settings, name)
    fields[name] = list(value) if isinstance(value, tuple) else value
  key = dict(
      step=int(step),
      variables_sha256=tree_sha256(state.generator_variables()),
      image_size=int(image_size),
      num_normal_images=int(num_normal),
      eval=fields,
      detector={
          name: int(getattr(detector_settings, name)) for name in DETECTOR_FIELDS
      })
  if trained:
    key['trained_sha256'] = tree_sha256(trained)
  return key


def save(directory: str,
         fitted: FittedMaps,
         key: dict[str, Any],
         config_json: str | None = None) -> None:
  """Writes ``fitted`` and its key under ``directory`` (replacing both).

  Every process calls it (Orbax coordinates the write); ``fit.json`` is
  written last, so a killed save leaves no key and the next evaluation
  refits. ``config_json``: the run config the maps were fitted with,
  written as ``config.json`` beside them (``predict.py --untrained`` reads
  it: an untrained workdir has no other).
  """
  key_path = os.path.join(directory, KEY_FILE)
  state_path = os.path.join(directory, 'state')
  tree = fitted.to_tree()
  if sharding.is_primary_process():
    if os.path.lexists(key_path):
      os.remove(key_path)
    if os.path.isdir(state_path) and not os.path.islink(state_path):
      shutil.rmtree(state_path)
    elif os.path.lexists(state_path):
      os.remove(state_path)
  os.makedirs(directory, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(state_path, tree)
    checkpointer.wait_until_finished()
  if sharding.is_primary_process():
    if config_json is not None:
      with open(os.path.join(directory, CONFIG_FILE), 'w') as f:
        f.write(config_json)
    with open(key_path, 'w') as f:
      json.dump(
          dict(key=key, state_sha256=tree_sha256(tree)),
          f,
          indent=2,
          sort_keys=True)
  logging.info('saved the fitted maps to %s', directory)


def load(directory: str,
         key: dict[str, Any] | None = None) -> FittedMaps | None:
  """The fitted maps under ``directory`` if their key equals ``key``.

  ``key`` None loads whatever is there (``predict.py``). Returns None when
  nothing was saved or the key differs (the differing fields are logged).

  Raises:
    FitError: ``fit.json`` or the state is unreadable, or the state's
      arrays do not hash to the ``state_sha256`` saved with them.
  """
  record = _record(directory)
  if record is None:
    return None
  changed = differing_fields(record['key'], key) if key is not None else []
  if changed:
    logging.info('refitting the maps: %s changed since %s', ', '.join(changed),
                 directory)
    return None
  state_path = os.path.join(directory, 'state')
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      tree = checkpointer.restore(state_path)
  except Exception as e:  # pylint: disable=broad-except
    # Orbax and TensorStore raise many types for damaged files.
    raise FitError(f'{state_path}: unreadable fitted maps '
                   f'({workdirs.one_line(e)})') from None
  if tree_sha256(tree) != record['state_sha256']:
    raise FitError(f'{state_path}: the fitted maps fail their checksum in '
                   f'{os.path.join(directory, KEY_FILE)} (damaged or edited '
                   'since evaluate.py saved them)')
  try:
    fitted = FittedMaps.from_tree(tree)
  except (KeyError, TypeError, ValueError, AttributeError) as e:
    raise FitError(f'{state_path}: not fitted maps '
                   f'({workdirs.one_line(e)})') from None
  logging.info('reusing the maps fitted in %s', directory)
  return fitted


def differing_fields(saved: dict[str, Any], key: dict[str, Any]) -> list[str]:
  """The fields (``eval.<name>``, ``detector.<name>`` for the config's)
  where two keys differ."""
  saved, key = json.loads(json.dumps(saved)), json.loads(json.dumps(key))
  sections = ('eval', 'detector')
  flat = lambda k: {
      f'{s}.{n}': v for s in sections for n, v in k.get(s, {}).items()
  } | {n: v for n, v in k.items() if n not in sections}
  saved, key = flat(saved), flat(key)
  return sorted(n for n in set(saved) | set(key) if saved.get(n) != key.get(n))


def saved_key(directory: str) -> dict[str, Any] | None:
  """The key saved under ``directory`` (None: nothing saved).

  Raises:
    FitError: ``fit.json`` is unreadable or not one of this version.
  """
  record = _record(directory)
  return None if record is None else record['key']


def _record(directory: str) -> dict[str, Any] | None:
  """``fit.json`` checked: {'key': fit_key's fields, 'state_sha256': hex}."""
  path = os.path.join(directory, KEY_FILE)
  if not os.path.lexists(path):
    return None
  try:
    record = workdirs.read_json_object(path)
  except CavgaError as e:
    raise FitError(str(e)) from None
  key = record.get('key')
  if (not isinstance(key, dict)
      or not isinstance(record.get('state_sha256'), str) or any(
          type(key.get(name)) is not kind  # pylint: disable=unidiomatic-typecheck
          for name, kind in _KEY_TYPES.items())):
    raise FitError(f'{path}: not a fit.json of this version (it needs a key '
                   f'with {", ".join(_KEY_TYPES)} and a state_sha256)')
  return record
