"""predict.py's output folder: where it may write and what it may delete.

predict.py never deletes or overwrites a file it did not write. Before it
writes anything into the output folder it writes ``MANIFEST_FILE`` there:
every file the run will write (paths relative to the folder) and every
folder it will create. The manifest is replaced atomically (written to a
temporary file, then renamed), and ``finish`` rewrites it at the end of the
run with the files actually written, each with its size and modification
time, and ``complete: true``. A run killed before ``finish`` leaves its
manifest listing everything it might have written; a later ``--overwrite``
deletes those of them that exist (it cannot tell a file the user put at
one of those paths since from one the killed run wrote).

``--overwrite`` deletes exactly what an earlier manifest lists: its regular
files (not a link, not a folder, not a file changed since ``finish``
recorded it), then its folders if they are empty. Anything else in the
folder stays, byte for byte. A file of the new run's plan that exists and
is not deletable stops the run before anything is deleted.

Where the output may be (``check_location``, before the scorer is loaded
or anything is written): a folder (or nothing yet), not the input folder,
not inside it and not around any input file; not the workdir and not
around it; not a run's workdir itself; and inside a workdir only below a
folder of its own (the default ``<workdir>/predict``), not in the run's
checkpoints/, fitted/, eval/ or other outputs.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Sequence

from cavga_jax import workdirs
from cavga_jax.errors import CavgaError
from cavga_jax.evaluation import store

MANIFEST_FILE = 'predict_manifest.json'
_TEMPORARY = f'.{MANIFEST_FILE}.tmp'
_FORMAT = 'cavga_jax predict.py output manifest'
_VERSION = 1
# A workdir's own outputs: an output folder there would mix with them.
_RUN_FOLDERS = frozenset(workdirs.RUN_OUTPUTS) | {store.FITTED_DIR, 'data'}


def is_workdir(folder: pathlib.Path) -> bool:
  """Whether ``folder`` holds a run: checkpoints/ or fitted/ (train.py,
  evaluate.py), or a run's config.json (a JSON object with 'model' and
  'train' sections; any other config.json is not a run's)."""
  if (folder / 'checkpoints').is_dir() or (folder / store.FITTED_DIR).is_dir():
    return True
  config = folder / workdirs.CONFIG_FILE
  try:
    if not config.is_file() or config.stat().st_size > 1 << 20:
      return False
    with open(config) as f:
      tree = json.load(f)
  except (OSError, ValueError):
    return False
  return isinstance(tree, dict) and 'model' in tree and 'train' in tree


def _within(path: pathlib.Path, folder: pathlib.Path) -> bool:
  return path == folder or folder in path.parents


def check_location(output: str, inputs: Sequence[pathlib.Path],
                   input_root: pathlib.Path, workdir: str | None) -> None:
  """Raises CavgaError (one line) where predict.py may not write ``output``.

  Reads nothing but the folders' names and, for ``is_workdir``, the
  folders around ``output``; writes nothing.
  """
  out = pathlib.Path(output).resolve()
  if out.exists() and not out.is_dir():
    raise CavgaError(f'--output={output} is a file, not a folder; predict.py '
                     'writes a folder of files there')
  for root in {input_root.resolve()} | {p.parent.resolve() for p in inputs}:
    if _within(out, root):
      raise CavgaError(f'--output={output} is inside the input folder '
                       f'{root}; predict.py never writes there')
  for path in [input_root, *inputs]:
    if _within(path.resolve(), out):
      raise CavgaError(f'--output={output} contains the input {path}; '
                       'choose an output folder apart from the input')
  if workdir is not None:
    run = pathlib.Path(workdir).resolve()
    if _within(run, out):
      raise CavgaError(f'--output={output} contains the workdir {workdir}; '
                       'choose a new folder (default <workdir>/predict)')
  if out.is_dir() and is_workdir(out):
    raise CavgaError(f'--output={output} is a run\'s workdir (it holds '
                     'checkpoints/, fitted/ or a run\'s config.json); '
                     'choose a new folder such as <workdir>/predict')
  for folder in out.parents:
    if is_workdir(folder):
      first = out.relative_to(folder).parts[0]
      if first in _RUN_FOLDERS:
        raise CavgaError(f'--output={output} lies inside {folder / first}, '
                         f'an output of the run in {folder}; choose a new '
                         'folder such as <workdir>/predict')


def _relative(entry: Any, manifest: pathlib.Path) -> str:
  """A manifest entry checked to be a plain relative path inside the folder."""
  parts = entry.split('/') if isinstance(entry, str) else None
  if (not parts or any(p in ('', '.', '..') for p in parts)
      or entry == MANIFEST_FILE or '\0' in entry):
    raise CavgaError(f'{manifest}: lists {entry!r}, not a path inside the '
                     'output folder; not a manifest predict.py wrote (delete '
                     'the folder yourself or choose another --output)')
  return entry


def read_manifest(output: str) -> dict[str, Any] | None:
  """The checked manifest of ``output`` (None when there is none).

  Returns:
    {'files': [relative path], 'dirs': [relative path], 'complete': bool,
     'written': {relative path: [size, mtime_ns]}}.

  Raises:
    CavgaError: the manifest is unreadable or lists a path outside the
      folder; nothing is deleted then.
  """
  path = pathlib.Path(output) / MANIFEST_FILE
  if not path.exists() and not path.is_symlink():
    return None
  try:
    if path.is_symlink() or not path.is_file():
      raise ValueError('not a regular file')
    with open(path) as f:
      tree = json.load(f)
    if not isinstance(tree, dict) or tree.get('format') != _FORMAT:
      raise ValueError('not predict.py\'s manifest format')
    files, dirs = tree['files'], tree['dirs']
    written = tree.get('written', {})
    if not (isinstance(files, list) and isinstance(dirs, list)
            and isinstance(written, dict)):
      raise ValueError('files, dirs or written of the wrong type')
  except (OSError, ValueError, KeyError) as e:
    raise CavgaError(
        f'{path}: unreadable ({" ".join(str(e).split())}); '
        'predict.py deletes nothing it cannot account for: '
        'delete the folder yourself or choose another --output') from None
  return dict(
      files=[_relative(e, path) for e in files],
      dirs=[_relative(e, path) for e in dirs],
      complete=tree.get('complete') is True,
      written={_relative(k, path): v for k, v in written.items()})


def _inside(out: pathlib.Path, relative: str) -> pathlib.Path | None:
  """``out / relative`` if no folder on the way is a link (else None)."""
  path = out / relative
  parent = os.path.realpath(path.parent)
  expected = os.path.join(
      os.path.realpath(out),
      *pathlib.PurePosixPath(relative).parent.parts)
  return path if os.path.normpath(parent) == os.path.normpath(expected) \
      else None


def _deletable(out: pathlib.Path, relative: str, written: dict[str,
                                                               Any]) -> bool:
  """Whether the listed file is still the one predict.py wrote."""
  path = _inside(out, relative)
  if path is None or path.is_symlink() or not path.is_file():
    return False
  record = written.get(relative)
  if record is None:  # listed by a run that was killed before finish
    return True
  stat = path.stat()
  return list(record) == [stat.st_size, stat.st_mtime_ns]


def _write_manifest(out: pathlib.Path, tree: dict[str, Any]) -> None:
  temporary = out / _TEMPORARY
  with open(temporary, 'w') as f:
    json.dump(dict(format=_FORMAT, version=_VERSION, **tree), f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  os.replace(temporary, out / MANIFEST_FILE)


def check_earlier(output: str, planned: Sequence[str],
                  overwrite: bool) -> tuple[dict[str, Any] | None, set[str]]:
  """What ``prepare`` will delete: (the earlier manifest, its deletable files).

  Reads, writes nothing.

  Raises:
    CavgaError: the folder holds files predict.py did not write (no
      manifest), or an earlier output and ``overwrite`` is off, or a file of
      ``planned`` (relative paths) exists that no manifest accounts for.
  """
  out = pathlib.Path(output)
  earlier = read_manifest(output)
  others = sorted(p.name
                  for p in out.iterdir()
                  if p.name != _TEMPORARY) if out.is_dir() else []
  if others and earlier is None:
    raise CavgaError(f'--output={output} is not empty and holds no '
                     f'{MANIFEST_FILE}, so predict.py did not write it '
                     f'(it holds {", ".join(others[:3])}'
                     f'{", ..." if len(others) > 3 else ""}); predict.py '
                     'never deletes files it did not write: choose another '
                     'folder')
  if earlier is not None and not overwrite:
    what = ('an earlier output of predict.py' if earlier['complete'] else
            'the files of an unfinished predict.py run (killed before it '
            'ended)')
    raise CavgaError(f'--output={output} holds {what}; pass --overwrite to '
                     f'replace it (only the files its {MANIFEST_FILE} lists '
                     'are deleted)')
  deletable = {
      f for f in (earlier['files'] if earlier else [])
      if _deletable(out, f, earlier['written'])
  }
  for relative in planned:
    path = out / relative
    if _inside(out, relative) is None:
      raise CavgaError(f'--output={output}: a folder on the way to {relative} '
                       'is a link; predict.py writes only inside the output '
                       'folder')
    if relative not in deletable and (path.exists() or path.is_symlink()):
      raise CavgaError(f'--output={output}: {relative} exists and predict.py '
                       'did not write it (or it changed since); nothing was '
                       'deleted: move it away or choose another folder')
  return earlier, deletable


def prepare(output: str, planned: Sequence[str], overwrite: bool) -> None:
  """Makes ``output`` ready for the files ``planned`` (relative paths).

  Deletes an earlier output's files with ``overwrite`` (``check_earlier``
  says which; the module docstring why), then writes the manifest of
  ``planned`` before any of them exists. Call ``check_location`` first.

  Raises:
    CavgaError: as ``check_earlier``, before anything is deleted.
  """
  out = pathlib.Path(output)
  earlier, deletable = check_earlier(output, planned, overwrite)
  if earlier is not None:
    for relative in sorted(deletable):
      (out / relative).unlink()
    for relative in sorted(earlier['dirs'], key=lambda d: -d.count('/')):
      path = _inside(out, relative)
      if path is not None and path.is_dir() and not path.is_symlink():
        try:
          path.rmdir()
        except OSError:
          pass  # not empty: something else lives there
  out.mkdir(parents=True, exist_ok=True)
  dirs = sorted({
      str(parent)
      for relative in planned
      for parent in pathlib.PurePosixPath(relative).parents
      if str(parent) != '.' and not (out / parent).exists()
  })
  _write_manifest(
      out, dict(complete=False, files=list(planned), dirs=dirs, written={}))


def finish(output: str) -> None:
  """Marks the manifest complete: the planned files that exist, each with
  (size, mtime_ns), so a later ``--overwrite`` leaves a changed one alone."""
  out = pathlib.Path(output)
  manifest = read_manifest(output)
  written = {}
  for relative in manifest['files']:
    path = out / relative
    if path.is_file() and not path.is_symlink():
      stat = path.stat()
      written[relative] = [stat.st_size, stat.st_mtime_ns]
  _write_manifest(
      out,
      dict(
          complete=True,
          files=sorted(written),
          dirs=manifest['dirs'],
          written=written))
