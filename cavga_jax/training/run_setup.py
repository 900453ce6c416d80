"""One setup for a run's typed settings: mesh, data, networks and states.

``setup(run, workdir)`` is the prelude the evaluation, the scorer, the
scripts and the benchmarks share: the device mesh, the datasets, the
networks and the jitted state initialiser (``train_state.setup``), the state
the run started from (``train_state.initial_state``) when something needs
it, the newest checkpoint (or, ``untrained``, that initial state), and the
variables the feature maps read (``eval.feature_weights='initial'``: the
initial encoder's). It takes ``typed_config.RunSettings``; the programs read
the config into them once.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from cavga_jax import checkpointing
from cavga_jax import data
from cavga_jax import sharding
from cavga_jax import typed_config
from cavga_jax.models import backbones
from cavga_jax.models import cavga
from cavga_jax.training import train_state

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class RunSetup:
  """What ``setup`` made; None where it was not asked for.

  Attributes:
    run: the typed settings it was made from.
    mesh: the device mesh.
    train_ds, test_ds: the datasets (``data.get_datasets``).
    generator, discriminator: the networks.
    init_fn: the jitted state initialiser (key -> ``TrainState``).
    state_sharding: the state's (replicated) sharding.
    initial: the state the run started from (its initialisation key and
      ``model.pretrained``), when ``untrained`` or
      ``eval.feature_weights='initial'`` needs it.
    state, step: the newest checkpoint and its step (``restore``), or with
      ``untrained`` the initial state and step 0.
    feature_variables: the generator variables the feature maps read when
      they are not the evaluated ones (``eval.feature_weights='initial'``),
      else None.
  """
  run: typed_config.RunSettings
  mesh: jax.sharding.Mesh
  train_ds: data.AnomalyDataset | None
  test_ds: data.AnomalyDataset | None
  generator: cavga.CAVGAGenerator
  discriminator: backbones.Discriminator
  init_fn: Callable[[Array], train_state.TrainState]
  state_sharding: jax.sharding.Sharding
  initial: train_state.TrainState | None = None
  state: train_state.TrainState | None = None
  step: int | None = None
  feature_variables: Any = None

  def abstract_state(self) -> train_state.TrainState:
    """The allocation-free restore target (``train_state.abstract_state``)."""
    return train_state.abstract_state(self.init_fn, self.mesh)

  def initial_state(self) -> train_state.TrainState:
    """``initial``, or the initial state made now."""
    if self.initial is not None:
      return self.initial
    return train_state.initial_state(self.run.seed, self.run.model.pretrained,
                                     self.init_fn, self.state_sharding)


def load_datasets(
    run: typed_config.RunSettings,
    workdir: str) -> tuple[data.AnomalyDataset, data.AnomalyDataset]:
  """(train, test) of ``run`` (``data.get_datasets`` of its data section,
  seed and supervision)."""
  return data.get_datasets(run.data, workdir, run.seed, run.model.supervision)


def setup(
    run: typed_config.RunSettings,
    workdir: str,
    *,
    datasets: bool = True,
    restore: bool = False,
    untrained: bool = False,
    feature_variables: bool = True,
    mesh: jax.sharding.Mesh | None = None,
    check_test_set: Callable[[data.AnomalyDataset], None] | None = None
) -> RunSetup:
  """The mesh, datasets, networks and states of ``run``.

  Args:
    run: the checked typed settings (``config_checks.check_config``).
    workdir: the run folder (the generated dataset, the checkpoints).
    datasets: load the datasets (the scorer needs none).
    restore: restore the newest checkpoint of ``workdir`` into ``state``
      (or, with ``untrained``, take the initial state, step 0).
    untrained: see ``restore``.
    feature_variables: make ``feature_variables`` (and so the initial state)
      when ``eval.feature_weights='initial'``; training does not evaluate,
      and a resumed run reads no pretrained file.
    mesh: the device mesh; None makes one (``sharding.make_mesh``).
    check_test_set: called with the test set once it is loaded, before the
      networks are built (``eval_lib.check_test_set``).

  Raises:
    CavgaError: a bad dataset (``DataError``), no checkpoint to restore, a
      checkpoint that does not fit the networks, an unusable pretrained
      file.
  """
  mesh = mesh or sharding.make_mesh()
  train_ds = test_ds = None
  if datasets:
    train_ds, test_ds = load_datasets(run, workdir)
    if check_test_set is not None:
      check_test_set(test_ds)
  generator, discriminator, init_fn, state_sharding = train_state.setup(
      run, mesh)
  made = RunSetup(
      run=run,
      mesh=mesh,
      train_ds=train_ds,
      test_ds=test_ds,
      generator=generator,
      discriminator=discriminator,
      init_fn=init_fn,
      state_sharding=state_sharding)
  initial_features = (
      feature_variables and run.eval.feature_weights == 'initial')
  initial = None
  if untrained or initial_features:
    initial = made.initial_state()
  state = step = None
  if restore and untrained:
    state, step = initial, 0
  elif restore:
    state, step = checkpointing.restore_for_eval(workdir, made.abstract_state())
  return dataclasses.replace(
      made,
      initial=initial,
      state=state,
      step=step,
      feature_variables=(initial.generator_variables()
                         if initial_features else None))
