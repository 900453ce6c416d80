"""Fitted maps saved beside the checkpoint they were fitted for (Orbax).

``<workdir>/fitted/step_<N>/`` (or ``untrained/``) holds ``state/`` (the
``FittedMaps`` pytree, Orbax), the run's ``config.json`` and ``fit.json``:
the key the state was
fitted under (``fit_key``: the checkpoint's step and a checksum of its
parameters, the evaluation fields that change the fit, the image size and
the number of normal images). ``load`` returns the state only when the
key is equal, so a retrained checkpoint, another map setting or other
training images refit; ``evaluate.py --refit`` refits regardless.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from cavga_jax import sharding
from cavga_jax.evaluation.fitting import FittedMaps

FITTED_DIR = 'fitted'
KEY_FILE = 'fit.json'
CONFIG_FILE = 'config.json'
# The config.eval fields that change what is fitted (the others: batch
# size, panels and the headline, which only picks among fitted maps).
FIT_FIELDS = ('calibrate', 'residual_sigma', 'ssim_window', 'feature_stages',
              'feature_dims', 'feature_grid_divisor', 'feature_weights',
              'knn_stages', 'knn_grid_divisor', 'knn_bank_size',
              'threshold_holdout', 'threshold_quantile')


def fitted_dir(workdir: str, step: int, untrained: bool = False) -> str:
  """Where the maps fitted for checkpoint ``step`` (or the untrained
  networks) live."""
  return os.path.join(os.path.abspath(workdir), FITTED_DIR,
                      'untrained' if untrained else f'step_{step}')


def checksum(tree: Any) -> float:
  """A float64 sum of |x| over a pytree's leaves: changes with the weights."""
  return float(sum(np.abs(np.asarray(x, np.float64)).sum()
                   for x in jax.tree.leaves(tree)))


def fit_key(eval_config: ml_collections.ConfigDict, step: int,
            params: Any, image_size: int, num_normal: int) -> dict[str, Any]:
  """The JSON-able identity of a fit (module docstring)."""
  fields = {}
  for name in FIT_FIELDS:
    value = eval_config.get(name)
    fields[name] = list(value) if isinstance(value, tuple) else value
  return dict(step=int(step), params_checksum=round(checksum(params), 3),
              image_size=int(image_size), num_normal_images=int(num_normal),
              eval=fields)


def save(directory: str, fitted: FittedMaps, key: dict[str, Any],
         config_json: str | None = None) -> None:
  """Writes ``fitted`` and its key under ``directory`` (replacing both).

  Every process calls it (Orbax coordinates the write); the key is written
  last, so a killed save leaves no key and the next evaluation refits.
  ``config_json``: the run config the maps were fitted with, written as
  ``config.json`` beside them (``predict.py --untrained`` reads it: an
  untrained workdir has no other).
  """
  key_path = os.path.join(directory, KEY_FILE)
  state_path = os.path.join(directory, 'state')
  if sharding.is_primary_process():
    if os.path.exists(key_path):
      os.remove(key_path)
    if os.path.exists(state_path):
      shutil.rmtree(state_path)
  os.makedirs(directory, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(state_path, fitted.to_tree())
    checkpointer.wait_until_finished()
  if sharding.is_primary_process():
    if config_json is not None:
      with open(os.path.join(directory, CONFIG_FILE), 'w') as f:
        f.write(config_json)
    with open(key_path, 'w') as f:
      json.dump(key, f, indent=2, sort_keys=True)
  logging.info('saved the fitted maps to %s', directory)


def load(directory: str, key: dict[str, Any] | None = None
         ) -> FittedMaps | None:
  """The fitted maps under ``directory`` if their key equals ``key``.

  ``key`` None loads whatever is there (``predict.py``). Returns None when
  nothing was saved or the key differs (the differing fields are logged).
  """
  saved = saved_key(directory)
  if saved is None:
    return None
  changed = differing_fields(saved, key) if key is not None else []
  if changed:
    logging.info('refitting the maps: %s changed since %s',
                 ', '.join(changed), directory)
    return None
  with ocp.StandardCheckpointer() as checkpointer:
    tree = checkpointer.restore(os.path.join(directory, 'state'))
  logging.info('reusing the maps fitted in %s', directory)
  return FittedMaps.from_tree(tree)


def differing_fields(saved: dict[str, Any], key: dict[str, Any]
                     ) -> list[str]:
  """The fields (``eval.<name>`` for the evaluation's) where two keys differ."""
  saved, key = json.loads(json.dumps(saved)), json.loads(json.dumps(key))
  flat = lambda k: {f'eval.{n}': v for n, v in k.get('eval', {}).items()} | {
      n: v for n, v in k.items() if n != 'eval'}
  saved, key = flat(saved), flat(key)
  return sorted(n for n in set(saved) | set(key) if saved.get(n) != key.get(n))


def saved_key(directory: str) -> dict[str, Any] | None:
  """The key saved under ``directory`` (None: nothing saved)."""
  key_path = os.path.join(directory, KEY_FILE)
  if not os.path.exists(key_path):
    return None
  with open(key_path) as f:
    return json.load(f)
