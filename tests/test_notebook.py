"""notebooks/colab_tpu.ipynb stays in sync with the CLIs it drives.

- the notebook is valid nbformat-4 JSON (checked with nbformat when it is installed), saved without outputs;
- every code cell is Python once its IPython lines (`!shell`, `%magic`, `x = !cmd`) are blanked out;
- every `python train.py ...` / `python serve.py ...` command, in a `!` line or a command string the
  notebook builds in Python (the background server), with the notebook's own `{VAR}` / `$VAR` values
  filled in (MESH: each preset the notebook can pick), is parsed by the real
  argparse parser of that script and subcommand (so a renamed or removed `--flag` fails here), and its
  `section.key=value` overrides resolve through `jaxllm.config.load_config` exactly as the CLI feeds them
  (so a renamed key, a wrong type or an impossible combination fails here), with the real meshes/*.toml;
- what serve.py / `train.py rl` read is what an earlier train.py command in the notebook wrote.
No TPU and no training: the scripts' parsers run in this process and stop right after parsing.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.util
import io
import json
import os
import re
import shlex

import pytest

from jaxllm import cli
from jaxllm.config import Config, ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "colab_tpu.ipynb")
SCRIPTS = ("train.py", "serve.py")
SHELL_OPS = set("();<>|&")


def load_notebook() -> dict:
  with open(NOTEBOOK, encoding="utf-8") as f:
    return json.load(f)


def cell_text(cell) -> str:
  src = cell["source"]
  return src if isinstance(src, str) else "".join(src)


def code_cells(nb) -> list[str]:
  return [cell_text(c) for c in nb["cells"] if c["cell_type"] == "code"]


def logical_lines(text: str) -> list[str]:
  """Lines with IPython's backslash continuations of `!` / `%` lines joined."""
  out, pending = [], None
  for line in text.splitlines():
    if pending is not None:
      line, pending = pending + " " + line.strip(), None
    if line.lstrip().startswith(("!", "%")) and line.endswith("\\"):
      pending = line[:-1]
      continue
    out.append(line)
  if pending is not None:
    out.append(pending)
  return out


def as_python(text: str) -> str:
  """The cell with every IPython-only line replaced by plain Python of the same indentation."""
  if text.lstrip().startswith("%%"):
    return ""  # a cell magic: not Python at all
  out = []
  for line in logical_lines(text):
    indent = line[: len(line) - len(line.lstrip())]
    if line.lstrip().startswith(("!", "%")):
      out.append(indent + "pass")
    elif re.match(r"\s*[A-Za-z_]\w*\s*=\s*[!%]", line):
      out.append(indent + line.split("=", 1)[0].strip() + " = None")
    else:
      out.append(line)
  return "\n".join(out)


def notebook_values(cells: list[str]) -> tuple[dict, dict]:
  """(NAME -> value of every top-level `NAME = <literal>` in the notebook, the PRESETS dict)."""
  values = {}
  for text in cells:
    for node in ast.parse(as_python(text)).body:
      if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
        try:
          values[node.targets[0].id] = ast.literal_eval(node.value)
        except ValueError:
          pass  # computed at run time (e.g. MESH)
  presets = values.pop("PRESETS", None)
  assert isinstance(presets, dict) and presets, "the notebook should define PRESETS = {device kind: mesh preset}"
  return values, presets


def expand(line: str, values: dict) -> str:
  """IPython's `{NAME}` and `$NAME` expansion in `!` lines (and f-string fields), for plain names only."""
  assert "{?}" not in line, f"{line!r}: keep f-string fields of commands plain NAMEs"

  def sub(m):
    name = m.group(1) or m.group(2)
    assert name in values, f"{line!r}: {name} has no value the test can see (keep placeholders plain NAMEs)"
    return str(values[name])

  return re.sub(r"\{([A-Za-z_]\w*)\}|\$([A-Za-z_]\w*)", sub, line)


def python_command_strings(text: str) -> list[str]:
  """Command lines a cell builds in Python (e.g. for subprocess.Popen): string literals and f-strings that
  start with `python train.py` / `python serve.py`, f-string fields written back as `{NAME}`."""
  tree = ast.parse(as_python(text))
  parts = {id(v) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for v in node.values}
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in parts:
      s = node.value
    elif isinstance(node, ast.JoinedStr):
      s = "".join(
        v.value
        if isinstance(v, ast.Constant)
        else "{%s}"
        % (v.value.id if isinstance(v.value, ast.Name) and v.conversion == -1 and v.format_spec is None else "?")
        for v in node.values
      )
    else:
      continue
    if re.match(r"\s*python3? (%s)\b" % "|".join(map(re.escape, SCRIPTS)), s):
      out.append(s)
  return out


def cli_commands(cells: list[str], values: dict) -> list[tuple[str, list[str], str]]:
  """(script, argv, source line) of every `python train.py|serve.py ...` the notebook runs: in `!` lines,
  and in command strings built in Python."""
  found = []
  for text in cells:
    shell_lines = [
      re.sub(r"^\s*(?:[A-Za-z_]\w*\s*=\s*)?!", "", line)
      for line in logical_lines(text)
      if re.match(r"\s*(?:[A-Za-z_]\w*\s*=\s*)?!", line)
    ]
    for shell in shell_lines + python_command_strings(text):
      if not any(s in shell for s in SCRIPTS):
        continue
      lex = shlex.shlex(expand(shell, values), posix=True, punctuation_chars=True)
      lex.whitespace_split = True
      tokens = list(lex)
      for i, tok in enumerate(tokens[:-1]):
        if os.path.basename(tok) in ("python", "python3") and tokens[i + 1] in SCRIPTS:
          args = []
          for t in tokens[i + 2 :]:
            if set(t) <= SHELL_OPS:  # end of this command: redirect, &, &&, ;, |
              break
            args.append(t)
          found.append((tokens[i + 1], args, shell.strip()))
  return found


def load_script(name: str):
  spec = importlib.util.spec_from_file_location(f"_notebook_check_{name[:-3]}", os.path.join(ROOT, name))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


class Parsed(Exception):
  def __init__(self, parser, args):
    super().__init__(parser.prog)
    self.parser, self.namespace = parser, args


def parse_like_cli(script: str, argv: list[str]) -> tuple[str, argparse.Namespace]:
  """Run the script's own main() on argv up to its argparse parse, and stop there:
  -> (the parser's prog, e.g. 'train.py rl' or 'serve.py generate', the parsed namespace)."""
  main = load_script(script).main
  original = argparse.ArgumentParser.parse_intermixed_args

  def stop_after_parse(self, args=None, namespace=None):
    raise Parsed(self, original(self, args, namespace))

  err = io.StringIO()
  with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err):
    mp.setattr(argparse.ArgumentParser, "parse_intermixed_args", stop_after_parse)
    try:
      main(list(argv))
    except Parsed as p:  # a top-level parser's prog is the running program's name: call it the script's
      return (p.parser.prog if p.parser.prog.startswith(script) else script), p.namespace
    except SystemExit as e:
      pytest.fail(f"{script} {shlex.join(argv)}: the CLI rejects it (exit {e.code}):\n{err.getvalue()}")
  pytest.fail(f"{script} {shlex.join(argv)}: main() returned without parsing its arguments")


def check_config(script: str, prog: str, a: argparse.Namespace) -> Config:
  """Resolve the overrides the way the CLI does, so renamed keys and bad values fail here."""
  try:
    if script == "train.py":
      defaults = list(load_script("train.py").RL_DEFAULTS) if prog == "train.py rl" else []
      assert prog in ("train.py", "train.py rl"), f"no config check written for {prog!r}"
      return load_config(a.config, defaults + cli.mesh_overrides(a.mesh) + a.overrides)
    if a.mesh:
      mc = load_config([], [f"mesh={a.mesh}"]).mesh  # serve.py's _mesh
      assert mc.pp == 1, f"{prog} --mesh {a.mesh}: serving needs pp=1"
    if prog == "serve.py":  # the HTTP server takes serve.* overrides only
      bad = [o for o in a.overrides if not o.split("=", 1)[0].strip().lstrip("-").startswith("serve.")]
      assert not bad, f"serve.py accepts only serve.key=value overrides, not {bad}"
    return load_config(a.config, a.overrides)
  except ConfigError as e:
    pytest.fail(f"{prog}: {e}")


@pytest.fixture(scope="module")
def nb():
  return load_notebook()


@pytest.fixture(scope="module")
def commands(nb):
  """[(MESH, script, argv, line)] for every mesh preset the notebook can pick."""
  cells = code_cells(nb)
  values, presets = notebook_values(cells)
  out = [(mesh, *cmd) for mesh in presets.values() for cmd in cli_commands(cells, {**values, "MESH": mesh})]
  assert out, "found no `python train.py|serve.py ...` commands in the notebook"
  return out


def test_notebook_is_valid_nbformat_without_outputs(nb):
  assert nb["nbformat"] == 4 and isinstance(nb["cells"], list) and nb["cells"]
  try:
    import nbformat
  except ImportError:
    nbformat = None
  if nbformat is not None:
    nbformat.validate(nbformat.reads(json.dumps(nb), as_version=4))
  for i, c in enumerate(nb["cells"]):
    assert c["cell_type"] in ("markdown", "code"), f"cell {i}: {c['cell_type']}"
    assert isinstance(c["source"], (str, list)), f"cell {i}: source must be a string or a list of strings"
    if c["cell_type"] == "code":
      assert c.get("outputs") == [] and c.get("execution_count") is None, f"cell {i}: save it without outputs"
  assert nb["cells"][0]["cell_type"] == "markdown" and "TPU" in cell_text(nb["cells"][0])


def test_code_cells_are_python(nb):
  for i, text in enumerate(code_cells(nb)):
    try:
      ast.parse(as_python(text))
    except SyntaxError as e:
      pytest.fail(f"code cell {i} is not valid Python (IPython lines blanked): {e}\n{text}")


def test_mesh_presets_exist_and_are_single_tpu_chips(nb):
  _, presets = notebook_values(code_cells(nb))
  assert {"meshes/tpu-v5e-1.toml", "meshes/tpu-v6e-1.toml"} <= set(presets.values())
  for path in presets.values():
    assert os.path.isfile(os.path.join(ROOT, path)), f"{path} is not in meshes/"
    mesh = load_config([], [f"mesh={os.path.join(ROOT, path)}"]).mesh
    assert mesh.device == "tpu" and mesh.num_devices == 1, f"{path}: not a single-chip TPU preset"


def test_every_cli_command_parses_and_validates(commands, monkeypatch):
  monkeypatch.chdir(ROOT)  # the notebook runs from the repository root
  progs = set()
  for mesh, script, argv, line in commands:
    assert os.path.isfile(os.path.join(ROOT, script)), f"{line}: {script} does not exist"
    prog, a = parse_like_cli(script, argv)
    assert getattr(a, "mesh", None) == mesh, f"{line}: should run on the preset the notebook picked (--mesh {{MESH}})"
    check_config(script, prog, a)
    progs.add(prog)
  # What the notebook promises: it trains, samples offline, runs the HTTP server, and RL-tunes.
  assert {"train.py", "serve.py generate", "serve.py", "train.py rl"} <= progs, progs


def test_readers_use_what_the_notebook_trained(commands, monkeypatch):
  monkeypatch.chdir(ROOT)
  written, read = set(), []
  for _, script, argv, line in commands:
    prog, a = parse_like_cli(script, argv)
    cfg = check_config(script, prog, a)
    if prog == "train.py":
      written.add(os.path.normpath(os.path.join(cfg.train.out_dir, "checkpoints")))
    elif prog == "train.py rl":
      read.append((cfg.rl.init_from, line))
    elif prog.startswith("serve.py"):
      read.append((a.checkpoint, line))
  assert read
  for path, line in read:
    assert path and os.path.normpath(path) in written, f"{line}: reads {path!r}, which no train.py command above writes"
