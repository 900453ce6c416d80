"""The scorer serialized with ``jax.export``: runs where only jax is installed.

``export_scorer`` traces ``Scorer.score_fn`` with the run's weights, the
maps fitted on its normal images and nothing else closed over, so they
are constants of the serialized program. Its input is a uint8 batch
(b, S, S, C) with a symbolic batch size ``b >= 1``; its outputs are the
headline map (b, S, S) float32, the image score (b,) float32 and the
decision (b,) bool at the held-out image threshold (``scorer.decide``:
True also for a non-finite map or score, so a corrupted scorer never
passes an image as normal). ``save`` writes

* ``scorer.jax_exported``: ``jax.export.Exported.serialize()``;
* ``scorer.json``: the headline map, S and C, the held-out thresholds
  (pixel, image) and the median normal pixel, the checkpoint step, the
  platforms.

Running it needs jax and numpy alone (the README shows the lines)::

  exported = jax.export.deserialize(open('scorer.jax_exported', 'rb').read())
  maps, scores, anomalous = exported.call(images)  # (b, S, S, C) uint8

``Exported.call`` itself refuses another dtype, size, rank or an empty
batch (a ``ValueError`` naming the expected shape). Images of another size
are resized to S first with ``cavga_jax.data.images.model_input`` (Pillow's
antialiased bilinear ``Image.resize``), as ``predict.py`` does.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from cavga_jax.deploy.scorer import decide
from cavga_jax.deploy.scorer import Scorer
from cavga_jax.errors import CavgaError

PROGRAM_FILE = 'scorer.jax_exported'
METADATA_FILE = 'scorer.json'
# The platforms jax.export lowers for; it accepts any other name without a
# word and writes a program nothing can run.
PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')


def check_platforms(platforms: Sequence[str]) -> tuple[str, ...]:
  """``platforms`` lower-cased, each checked against ``PLATFORMS``.

  Raises:
    CavgaError: an unknown or empty platform name, or none at all.
  """
  names = tuple(str(p).strip().lower() for p in platforms)
  unknown = [p for p in names if p not in PLATFORMS]
  if unknown or not names:
    raise CavgaError(f'--export={",".join(platforms)}: unknown platform '
                     f'{", ".join(repr(p) for p in unknown) or "(none)"}; '
                     f'jax.export lowers for {", ".join(PLATFORMS)}')
  return names


def export_scorer(
    scorer: Scorer, platforms: Sequence[str] = ('cpu',)) -> jax.export.Exported:
  """``scorer`` as a ``jax.export.Exported`` for ``platforms``.

  ``images (b, S, S, C) uint8 -> (maps (b, S, S), scores (b,),
  anomalous (b,) bool)``.
  """
  platforms = check_platforms(platforms)
  (batch,) = jax.export.symbolic_shape('b')
  images = jax.ShapeDtypeStruct(
      (batch, scorer.image_size, scorer.image_size, scorer.channels), jnp.uint8)
  state, image_threshold = scorer.state, scorer.thresholds[1]

  def score(x):
    maps, scores = scorer.score_fn(state, x)
    return maps, scores, decide(maps, scores, image_threshold)[0]

  return jax.export.export(jax.jit(score), platforms=platforms)(images)


def metadata(scorer: Scorer, platforms: Sequence[str]) -> dict[str, Any]:
  """What a user of the serialized scorer needs besides the program."""
  pixel, image, median = scorer.thresholds
  return dict(
      headline=scorer.headline,
      image_size=scorer.image_size,
      channels=scorer.channels,
      pixel_threshold=pixel,
      image_threshold=image,
      median_normal_pixel=median,
      checkpoint_step=scorer.step,
      platforms=list(platforms),
      inputs='uint8 (b >= 1, image_size, image_size, channels)',
      outputs='(map (b, image_size, image_size) float32, '
      'image score (b,) float32, anomalous (b,) bool: not '
      'at or below image_threshold, or not finite)')


def save(directory: str, scorer: Scorer,
         platforms: Sequence[str] = ('cpu',)) -> str:
  """Writes ``PROGRAM_FILE`` and ``METADATA_FILE`` under ``directory``.

  Returns:
    The program's path.
  """
  platforms = check_platforms(platforms)
  exported = export_scorer(scorer, platforms)
  os.makedirs(directory, exist_ok=True)
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
