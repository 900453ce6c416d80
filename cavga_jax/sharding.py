"""Data-parallel sharding with ``jax.sharding`` (no pmap).

One ``Mesh`` over all devices with a single ``'data'`` axis: batches are
sharded along their first dimension, the train state is replicated. Because
the step is one jitted program over the *global* batch, BatchNorm statistics
and loss means are taken over the global batch, so N devices with global
batch B compute the same update as one device with batch B.

Multi-host: call ``jax.distributed.initialize()`` first (``train.py`` does it
when ``--multihost`` is given); each host then passes its own slice of the
global batch to ``shard_batch``.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cavga_jax.errors import CavgaError


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh named 'data' over ``devices`` (default: all devices)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), ('data',))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Shards the leading (batch) dimension over the 'data' axis."""
  return NamedSharding(mesh, P('data'))


def replicated(mesh: Mesh) -> NamedSharding:
  """Replicates an array on every device of the mesh."""
  return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh, name: str) -> None:
  """Raises CavgaError unless ``batch_size`` splits evenly over the devices."""
  if batch_size % mesh.size:
    raise CavgaError(
        f'{name}={batch_size} is not divisible by the {mesh.size} devices of '
        'the mesh; choose a multiple of the device count')


def shard_batch(local_batch: np.ndarray, mesh: Mesh) -> jax.Array:
  """This host's slice of the global batch -> a global array sharded on 'data'."""
  return jax.make_array_from_process_local_data(batch_sharding(mesh),
                                                local_batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places every leaf of ``tree`` on all devices of ``mesh``."""
  return jax.device_put(tree, replicated(mesh))
