"""The scorer serialized with ``jax.export``: runs where only jax is installed.

``export_scorer`` traces ``Scorer.score_fn`` with the run's weights, the
maps fitted on its normal images and nothing else closed over, so they
are constants of the serialized program. Its input is a uint8 batch
(b, S, S, C) with a symbolic batch size ``b``; its outputs are the headline
map (b, S, S) float32 and the image score (b,) float32. ``save`` writes

* ``scorer.jax_exported``: ``jax.export.Exported.serialize()``;
* ``scorer.json``: the headline map, S and C, the held-out thresholds
  (pixel, image) and the median normal pixel, the checkpoint step, the
  platforms.

Running it needs jax and numpy alone (the README shows the lines)::

  exported = jax.export.deserialize(open('scorer.jax_exported', 'rb').read())
  maps, scores = exported.call(images)   # images: (b, S, S, C) uint8

Images of another size are resized to S first (``predict.py`` does it with
Pillow's bilinear filter and resizes the map back).
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from cavga_jax.scorer import Scorer

PROGRAM_FILE = 'scorer.jax_exported'
METADATA_FILE = 'scorer.json'


def export_scorer(scorer: Scorer, platforms: Sequence[str] = ('cpu',)
                  ) -> jax.export.Exported:
  """``scorer`` as a ``jax.export.Exported`` for ``platforms``."""
  (batch,) = jax.export.symbolic_shape('b')
  images = jax.ShapeDtypeStruct(
      (batch, scorer.image_size, scorer.image_size, scorer.channels),
      jnp.uint8)
  state = scorer.state
  return jax.export.export(
      jax.jit(lambda x: scorer.score_fn(state, x)),
      platforms=tuple(platforms))(images)


def metadata(scorer: Scorer, platforms: Sequence[str]) -> dict[str, Any]:
  """What a user of the serialized scorer needs besides the program."""
  pixel, image, median = scorer.thresholds
  return dict(headline=scorer.headline, image_size=scorer.image_size,
              channels=scorer.channels, pixel_threshold=pixel,
              image_threshold=image, median_normal_pixel=median,
              checkpoint_step=scorer.step, platforms=list(platforms),
              inputs='uint8 (b, image_size, image_size, channels)',
              outputs='(map (b, image_size, image_size) float32, '
                      'image score (b,) float32)')


def save(directory: str, scorer: Scorer,
         platforms: Sequence[str] = ('cpu',)) -> str:
  """Writes ``PROGRAM_FILE`` and ``METADATA_FILE`` under ``directory``.

  Returns:
    The program's path.
  """
  os.makedirs(directory, exist_ok=True)
  exported = export_scorer(scorer, platforms)
  path = os.path.join(directory, PROGRAM_FILE)
  with open(path, 'wb') as f:
    f.write(exported.serialize())
  with open(os.path.join(directory, METADATA_FILE), 'w') as f:
    json.dump(metadata(scorer, platforms), f, indent=2, sort_keys=True)
  return path


def load(directory: str) -> tuple[jax.export.Exported, dict[str, Any]]:
  """(the deserialized program, its metadata) from ``save``'s directory."""
  with open(os.path.join(directory, PROGRAM_FILE), 'rb') as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  with open(os.path.join(directory, METADATA_FILE)) as f:
    return exported, json.load(f)
