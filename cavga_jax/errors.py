"""Errors that the programs report as one line, without a traceback."""


class CavgaError(Exception):
  """Base class: a problem the user can fix (bad input, bad config, bad run)."""


class DataError(CavgaError, ValueError):
  """A dataset folder or file is missing, empty, unreadable or inconsistent.

  The message names the path and the problem, e.g.
  ``/data/mvtec/bottle/ground_truth/crack/003_mask.png: mask is missing``.
  """


class TrainingError(CavgaError, RuntimeError):
  """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""
