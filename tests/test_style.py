"""The tree is clean under the project's ruff configuration (pyproject.toml: lint and format), as a
contributor's `ruff check . && ruff format --check .` would say."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff_is_clean(command):
  try:
    import ruff  # noqa: F401  (the package ships the binary; dev extra)
  except ImportError:
    pytest.fail('ruff is not installed: pip install -e ".[dev]"')
  out = subprocess.run([sys.executable, "-m", "ruff", *command, "."], cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 0, f"ruff {' '.join(command)} . found:\n{out.stdout[-4000:]}{out.stderr[-2000:]}"
