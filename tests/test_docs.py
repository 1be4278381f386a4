"""The project's documentation stands alone and agrees with the code's one shape legend.

- docs/architecture.md's `## Shape legend` block is the legend of `jaxllm.__doc__` (the one legend of
  the package), line for line after normalising whitespace, and no letter is defined twice;
- `import jaxllm` stays cheap (no jax);
- no project text file (*.py, *.md, *.toml, .ci/run; tracked, or new and not ignored by git, so a
  virtual environment or cache inside the checkout is not ours) points outside the repository: not to
  the internal design notes beside the checkout, not through parent-directory paths that climb out of
  the repo;
- every relative Markdown link in those files names a file or directory that exists;
- the README links docs/architecture.md, and that file exists, and its test command is the one CI runs.
Pure Python (git and the standard library); no jax needed.
"""

from __future__ import annotations

import fnmatch
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH = os.path.join(ROOT, "docs", "architecture.md")
LEGEND_TITLE = "Shape legend"
LEGEND_END = "In code,"

# Spelled in pieces so this file does not match its own patterns.
OUTSIDE = [re.compile(re.escape("shared" + "/")), re.compile(re.escape("DESIGN" + ".md"), re.IGNORECASE)]
UP = "." + "./"


def _read(path: str) -> str:
  with open(path, encoding="utf-8") as f:
    return f.read()


def _normalise(lines) -> list[str]:
  return [" ".join(line.split()) for line in lines if line.strip()]


def docstring_legend() -> list[str]:
  """Lines of the legend in jaxllm.__doc__: from its 'Shape legend' line through its 'In code,' line."""
  import jaxllm

  lines = (jaxllm.__doc__ or "").splitlines()
  start = next((i for i, l in enumerate(lines) if l.startswith(LEGEND_TITLE)), None)
  assert start is not None, "jaxllm/__init__.py's docstring has no 'Shape legend' block"
  end = next((i for i in range(start, len(lines)) if lines[i].strip().startswith(LEGEND_END)), None)
  assert end is not None, "the legend in jaxllm.__doc__ must end with its 'In code, `P` ...' line"
  return [l for l in lines[start : end + 1] if l.strip()]


def docs_legend() -> list[str]:
  """Lines of the fenced block right under the `## Shape legend` heading of docs/architecture.md."""
  m = re.search(r"^## Shape legend[ \t]*$(.*?)^```[^\n]*\n(.*?)^```[ \t]*$", _read(ARCH), re.M | re.S)
  assert m, "docs/architecture.md needs a fenced block under a '## Shape legend' heading"
  assert not re.search(r"^#", m.group(1), re.M), "the legend must be the first block under its heading"
  return [l for l in m.group(2).splitlines() if l.strip()]


def legend_entries(lines: list[str]) -> list[tuple[str, str]]:
  """(letter, meaning) pairs of raw legend lines: entries on one line are separated by 3+ spaces,
  a letter from its meaning by 2+."""
  out = []
  for line in lines:
    for chunk in re.split(r"\s{3,}", line.strip()):
      m = re.fullmatch(r"([A-Za-z])\s{2,}(.+)", chunk)
      if m:
        out.append((m.group(1), " ".join(m.group(2).split())))
  return out


def test_docs_legend_is_the_package_legend():
  ours, docs = legend_entries(docstring_legend()), legend_entries(docs_legend())
  assert len(ours) >= 20, f"parsed only {len(ours)} legend entries from jaxllm.__doc__"
  assert dict(docs) == dict(ours), (
    f"letter -> meaning differs between docs/architecture.md and jaxllm/__init__.py: {sorted(set(docs) ^ set(ours))}"
  )
  assert _normalise(docs_legend()) == _normalise(docstring_legend()), (
    "the legend block in docs/architecture.md must be the text of the one in jaxllm/__init__.py"
  )


def test_legend_defines_each_letter_once():
  letters = [letter for letter, _ in legend_entries(docstring_legend())]
  twice = sorted({x for x in letters if letters.count(x) > 1})
  assert not twice, f"letters defined twice in the shape legend: {twice}"


def test_import_jaxllm_is_cheap():
  code = "import sys, jaxllm; sys.exit(1 if 'jax' in sys.modules else 0)"
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
  assert r.returncode == 0, "`import jaxllm` imported jax; keep jaxllm/__init__.py free of imports"


def _gitignore_patterns() -> list[str]:
  try:
    lines = _read(os.path.join(ROOT, ".gitignore")).splitlines()
  except OSError:
    return []
  return [l.strip() for l in lines if l.strip() and not l.startswith(("#", "!"))]


def _ignored(rel: str, is_dir: bool, patterns: list[str]) -> bool:
  """A rough .gitignore match (no negation, no '**'): 'dir/' matches directories only, a leading '/'
  anchors at the root, a pattern with no '/' matches the base name at any depth."""
  for pat in patterns:
    if pat.endswith("/"):
      if not is_dir:
        continue
      pat = pat[:-1]
    if pat.startswith("/") or "/" in pat:
      if fnmatch.fnmatch(rel, pat.lstrip("/")):
        return True
    elif fnmatch.fnmatch(os.path.basename(rel), pat):
      return True
  return False


def _walk_project() -> list[str]:
  """Without git: every file under the root, minus what .gitignore names, hidden directories (.git,
  .venv, caches) and virtual environments (a pyvenv.cfg inside)."""
  patterns, out = _gitignore_patterns(), []
  for base, dirs, names in os.walk(ROOT):
    rel_base = os.path.relpath(base, ROOT)
    rel_base = "" if rel_base == "." else rel_base + "/"
    dirs[:] = [
      d
      for d in dirs
      if not (d.startswith(".") and rel_base + d != ".ci")
      and not _ignored(rel_base + d, True, patterns)
      and not os.path.isfile(os.path.join(base, d, "pyvenv.cfg"))
    ]
    out += [rel_base + n for n in names if not _ignored(rel_base + n, False, patterns)]
  return out


def project_text_files() -> list[str]:
  """Tracked files plus new ones git does not ignore (without git: a walk that skips what .gitignore
  names): *.py, *.md, *.toml and .ci/run. Virtual environments, caches and run outputs are not ours."""
  try:
    out = subprocess.run(
      ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
      cwd=ROOT,
      capture_output=True,
      text=True,
      check=True,
    ).stdout.splitlines()
  except (OSError, subprocess.CalledProcessError):
    out = _walk_project()
  files = sorted({f for f in out if f.endswith((".py", ".md", ".toml")) or f == ".ci/run"})
  return [f for f in files if os.path.isfile(os.path.join(ROOT, f))]


def _escapes_repo(rel_file: str, text: str, pos: int) -> bool:
  """Does the run of parent-directory steps at `pos` climb above the repository root from the file's
  own directory? Only Markdown links are relative to the file; elsewhere such a path has no fixed
  base, so any occurrence counts."""
  if not rel_file.endswith(".md"):
    return True
  ups = 0
  while text.startswith(UP, pos + ups * len(UP)):
    ups += 1
  depth = len(os.path.dirname(rel_file).split("/")) if os.path.dirname(rel_file) else 0
  return ups > depth


def test_no_paths_outside_the_repo():
  files = project_text_files()
  assert "README.md" in files and "jaxllm/__init__.py" in files, f"unexpected file list: {files[:10]}"
  bad = []
  for rel in files:
    text = _read(os.path.join(ROOT, rel))
    for n, line in enumerate(text.splitlines(), 1):
      if any(p.search(line) for p in OUTSIDE):
        bad.append(f"{rel}:{n}: {line.strip()}")
    for m in re.finditer(r"(?<!\.)" + re.escape(UP), text):
      if _escapes_repo(rel, text, m.start()):
        n = text.count("\n", 0, m.start()) + 1
        bad.append(f"{rel}:{n}: {text.splitlines()[n - 1].strip()}")
  assert not bad, (
    "the project must stand alone: these lines point outside the repository "
    "(describe the thing here, or link a file inside the repo):\n" + "\n".join(bad)
  )


def test_readme_links_architecture():
  readme = _read(os.path.join(ROOT, "README.md"))
  assert re.search(r"\]\(docs/architecture\.md\)", readme), "README.md must link [..](docs/architecture.md)"
  assert os.path.isfile(ARCH), "docs/architecture.md is linked from the README but missing"
  assert "docs/" in readme.split("## Layout", 1)[-1], "README's Layout block should list docs/"


def test_readme_test_command_is_cis():
  """The README's quick start runs the tests exactly as .ci/run does (less pip's -q)."""
  readme = _read(os.path.join(ROOT, "README.md"))
  ci = [l.strip() for l in _read(os.path.join(ROOT, ".ci", "run")).splitlines()]
  install = next(l for l in ci if l.startswith("python -m pip install") and "-e" in l).replace(" -q", "")
  test = next(l for l in ci if l.startswith("python -m pytest"))
  assert install in readme and test in readme, f"README.md must show CI's commands: {install!r}, {test!r}"


def test_relative_links_resolve():
  bad = []
  for rel in project_text_files():
    if not rel.endswith(".md"):
      continue
    text = _read(os.path.join(ROOT, rel))
    for m in re.finditer(r"\]\(([^)\s]+)\)", text):
      target = m.group(1).split("#", 1)[0]
      if not target or re.match(r"[a-z]+:", target):
        continue
      if not os.path.exists(os.path.normpath(os.path.join(ROOT, os.path.dirname(rel), target))):
        bad.append(f"{rel}: {m.group(1)}")
  assert not bad, "links to missing files:\n" + "\n".join(bad)


def test_without_git_the_walk_skips_ignored_and_hidden_paths():
  assert _ignored(".venv", True, [".venv/"]) and not _ignored(".venv", False, [".venv/"])
  assert _ignored("jaxllm/__pycache__", True, ["__pycache__/"]) and _ignored("a/b.pyc", False, ["*.py[cod]"])
  assert _ignored("runs", True, ["runs/"]) and not _ignored("docs/runs.md", False, ["runs/"])
  assert _ignored(".whl", True, ["/.whl/"]) and not _ignored("x/.whl", True, ["/.whl/"])
  files = _walk_project()
  assert "README.md" in files and "jaxllm/__init__.py" in files and ".ci/run" in files
  assert not [f for f in files if f.startswith((".git/", ".venv/", "runs/")) or "__pycache__" in f]
