"""The package's layering, held by parsing every import (module-level and function-level alike).

  config <- model <- parallel <- {train, serve} <- rl <- CLIs (train.py, serve.py, jaxllm/cli.py)
  kernels and data are leaves: they import nothing of jaxllm above config.
  io imports only config and model.  train and serve never import each other.

ALLOWED maps each layer to the jaxllm layers its modules may import (its own always allowed).
"""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BELOW_TRAIN_SERVE = {"config", "kernels", "data", "model", "io", "parallel"}
ALLOWED = {
  "config": set(),
  "kernels": {"config"},
  "data": {"config"},
  "model": {"config", "kernels"},
  "io": {"config", "model"},
  "parallel": {"config", "kernels", "model"},
  "train": BELOW_TRAIN_SERVE,
  "serve": BELOW_TRAIN_SERVE,
  "rl": BELOW_TRAIN_SERVE | {"train", "serve"},
  "cli": BELOW_TRAIN_SERVE | {"train", "serve", "rl"},   # train.py, serve.py, jaxllm/cli.py
  "package": set(),                                      # jaxllm/__init__.py: no imports
}


def layer_of(relpath: str) -> str:
  """Layer of a source file, from its path relative to the repo root."""
  parts = relpath.replace(os.sep, "/").split("/")
  if parts[0] != "jaxllm":
    return "cli"
  if parts[1] == "__init__.py":
    return "package"
  name = parts[1].removesuffix(".py")
  return name if name in ALLOWED else "cli"


def imported_layers(source: str, relpath: str):
  """-> [(line, imported module, its jaxllm layer)] for every jaxllm import in `source`."""
  package = ".".join(relpath.removesuffix(".py").split("/")[:-1])
  out = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:   # relative import: resolve against the file's package
        base = package.split(".")[:len(package.split(".")) - node.level + 1]
        names = [".".join(base + ([node.module] if node.module else []))]
      else:
        names = [node.module or ""]
      # `from jaxllm import x` names a subpackage/module x
      if names == ["jaxllm"]:
        names = [f"jaxllm.{a.name}" for a in node.names]
    else:
      continue
    for name in names:
      parts = name.split(".")
      if parts[0] == "jaxllm" and len(parts) > 1:
        out.append((node.lineno, name, parts[1] if parts[1] in ALLOWED else "cli"))
  return out


def violations(source: str, relpath: str) -> list[str]:
  layer = layer_of(relpath)
  return [f"{relpath}:{line}: {layer} imports {name} ({target} is above it or beside it)"
          for line, name, target in imported_layers(source, relpath)
          if target != layer and target not in ALLOWED[layer]]


def project_sources():
  files = ["train.py", "serve.py"]
  for base, _, names in os.walk(os.path.join(ROOT, "jaxllm")):
    files += [os.path.relpath(os.path.join(base, n), ROOT) for n in names if n.endswith(".py")]
  return sorted(files)


def test_every_import_follows_the_layering():
  found = []
  for rel in project_sources():
    with open(os.path.join(ROOT, rel)) as f:
      found += violations(f.read(), rel)
  assert not found, "wrong-way imports:\n" + "\n".join(found)


@pytest.mark.parametrize("relpath,source", [
  ("jaxllm/parallel/pipeline.py", "def f():\n  from jaxllm.train.step import loss_sums\n"),
  ("jaxllm/serve/engine.py", "import jaxllm.train.checkpoint\n"),
  ("jaxllm/train/loop.py", "from jaxllm import serve\n"),
  ("jaxllm/kernels/tpu.py", "from jaxllm.model.layers import MASK_VALUE\n"),
  ("jaxllm/io/hf.py", "from jaxllm.parallel import param_shardings\n"),
  ("jaxllm/model/moe.py", "from ..parallel import moe\n"),
  ("jaxllm/config.py", "from jaxllm.model import hooks\n"),
])
def test_a_wrong_way_import_is_caught_and_named(relpath, source):
  """The checker itself can fail: each of these inserted imports is reported with file and line."""
  found = violations(source, relpath)
  assert len(found) == 1 and found[0].startswith(f"{relpath}:"), found


def test_allowed_imports_pass():
  assert not violations("from jaxllm.parallel.sharding import param_shardings\nimport jax\n", "jaxllm/serve/engine.py")
  assert not violations("from jaxllm.kernels.reference import MASK_VALUE\n", "jaxllm/model/layers.py")
  assert not violations("from jaxllm.serve import complete_text\nfrom jaxllm.train.loop import train\n", "train.py")
