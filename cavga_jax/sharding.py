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
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

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
  return jax.make_array_from_process_local_data(
      batch_sharding(mesh), local_batch)


def host_batch_slice(batch_size: int) -> slice:
  """This host's contiguous slice of a global batch (all of it on one host).

  Every host draws the same global batch indices (a function of
  ``(seed, step)``; cheap, the images are in memory) and loads its slice.
  """
  per_host = batch_size // jax.process_count()
  return slice(jax.process_index() * per_host,
               (jax.process_index() + 1) * per_host)


def shard_global_batch(global_batch: np.ndarray, mesh: Mesh) -> jax.Array:
  """A global batch that every host holds -> the global array (this host's
  slice of it placed on its devices)."""
  return shard_batch(global_batch[host_batch_slice(global_batch.shape[0])],
                     mesh)


def to_host(tree: Any) -> Any:
  """Every (sharded) array of ``tree`` as a whole numpy array, on every host.

  One process: ``jax.device_get``. Several: an all-gather, since a host
  cannot read the shards on other hosts' devices.
  """
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def is_primary_process() -> bool:
  """Whether this process writes the run's shared files (process 0).

  Under multi-host training every process computes, but only one writes the
  files of a shared workdir (config, logs, splits, evaluation outputs); the
  checkpoint manager coordinates its own writes.
  """
  return jax.process_index() == 0


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places every leaf of ``tree`` on all devices of ``mesh``."""
  return jax.device_put(tree, replicated(mesh))
