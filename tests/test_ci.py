"""CI runs the README's test command, with a time limit."""

import pathlib
import re

from conftest import REPO_ROOT


def test_ci_runs_the_readme_test_command_under_a_time_limit():
  readme = (pathlib.Path(REPO_ROOT) / 'README.md').read_text()
  command = re.search(r"pip install -e '\.\[test\]' && (python -m pytest.*)",
                      readme).group(1).strip()
  ci = (pathlib.Path(REPO_ROOT) / '.ci' / 'run').read_text()
  # Joined continuation lines: the command as bash runs it.
  ci = re.sub(r'\\\n\s*', '', ci)
  assert re.search(r'^timeout [^\n]*' + re.escape(command) + r'( |$)', ci,
                   re.MULTILINE), command
  assert '-rs' in command.split() and '--durations=15' in command.split()
