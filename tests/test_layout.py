"""The package's import graph: one-way, programs on top, config checks a
leaf, and the README's layer table true to it."""

import ast
import pathlib
import re

import cavga_jax
from conftest import REPO_ROOT

PACKAGE = pathlib.Path(cavga_jax.__file__).parent

# The programs: they take a run config; nothing below imports them.
PROGRAMS = {
    'programs.train', 'programs.evaluate', 'programs.predict',
    'programs.train_vae', 'programs.evaluate_vae', 'programs.one_class'
}
# Modules that train or evaluate; the config checks must import none of them.
PROGRAM_MODULES = PROGRAMS | {
    'programs.runtime', 'training.cavga_step', 'training.training_loop',
    'training.detector_training', 'evaluation.evaluator', 'evaluation.inference'
}


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE).with_suffix('').parts
  return '.'.join(p for p in parts if p != '__init__')


def _imports() -> dict[str, set[str]]:
  """Module -> the cavga_jax modules it imports at the top level."""
  graph = {}
  for path in PACKAGE.rglob('*.py'):
    name = _module_name(path)
    targets = set()
    for node in ast.parse(path.read_text()).body:  # top level only
      if isinstance(node, ast.ImportFrom) and node.module and (
          node.module == 'cavga_jax' or node.module.startswith('cavga_jax.')):
        base = node.module.removeprefix('cavga_jax').removeprefix('.')
        for alias in node.names:
          full = f'{base}.{alias.name}' if base else alias.name
          # 'from cavga_jax.x import Name' imports module x.
          targets.add(
              full if (PACKAGE
                       / full.replace('.', '/')).with_suffix('.py').exists() or
              (PACKAGE / full.replace('.', '/')).is_dir() else base)
    graph[name] = {t for t in targets if t and t != name}
  return graph


def test_package_imports_have_no_cycle():
  graph = _imports()
  state = {}

  def visit(node, path):
    if state.get(node) == 'done':
      return
    assert state.get(node) != 'active', f'import cycle: {path + [node]}'
    state[node] = 'active'
    for target in sorted(graph.get(node, ())):
      visit(target, path + [node])
    state[node] = 'done'

  for module in sorted(graph):
    visit(module, [])


def test_config_checks_imports_no_training_or_evaluation_module():
  graph = _imports()
  reachable, todo = set(), ['config_checks']
  while todo:
    for target in graph.get(todo.pop(), ()):
      if target not in reachable:
        reachable.add(target)
        todo.append(target)
  assert not reachable & PROGRAM_MODULES, sorted(reachable & PROGRAM_MODULES)


def test_long_modules_say_why():
  # A module over 400 lines holds one idea and says why it is long.
  unexplained = []
  for path in sorted(PACKAGE.rglob('*.py')):
    text = path.read_text()
    if len(text.splitlines()) > 400 and 'Over 400 lines:' not in (
        ast.get_docstring(ast.parse(text)) or ''):
      unexplained.append(str(path.relative_to(PACKAGE)))
  assert not unexplained, unexplained


def test_no_module_below_the_programs_imports_one():
  graph = _imports()
  offenders = {
      module: sorted(targets & PROGRAMS)
      for module, targets in graph.items()
      if module not in PROGRAMS and targets & PROGRAMS
  }
  assert not offenders, offenders


def _layer_table() -> dict[str, set[str]]:
  """README's package layout: layer -> the module names of its row."""
  text = (pathlib.Path(REPO_ROOT) / 'README.md').read_text()
  table = text[text.index('| layer | modules |'):].split('\n\n')[0]
  rows = {}
  for line in table.splitlines()[2:]:
    layer, modules = line.strip('|').split('|', 1)
    rows[layer.strip()] = {
        name for name in re.findall(r'`([a-z_][a-z_.0-9]*)`', modules)
        if not name.endswith('.py')
    }
  return rows


def test_readme_layer_table_names_every_module_and_the_programs():
  rows = _layer_table()
  named = set().union(*rows.values())
  missing = []
  for module in _imports():
    # Every module is named by its full path below the package (maps.x).
    if module not in named and not (PACKAGE / module).is_dir():
      missing.append(module)
  assert not missing, f'not in the README layer table: {missing}'
  assert rows['programs (take the config)'] == PROGRAMS
