"""The package's layering, held by parsing every import (module-level and function-level alike).

  config <- model <- parallel <- {train, serve} <- rl <- CLIs (train.py, serve.py, jaxllm/cli.py)
  kernels and data are leaves: they import nothing of jaxllm above config; buckets (power-of-two
  sizes) imports nothing at all, so kernels and everything from train and serve up may use it.
  io imports only config, model and the leaf data (tokenizers).  train and serve never import each other.
  planner (the memory planner, `python -m jaxllm.planner`) sits above train: it builds the optimizer.

ALLOWED maps each layer to the jaxllm layers its modules may import (its own always allowed). Every
top-level module and package of jaxllm is a layer of its own and must be declared there: an undeclared
one (a new jaxllm/utils/, say) fails the test instead of importing anything unnoticed.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BELOW_TRAIN_SERVE = {"config", "buckets", "kernels", "data", "model", "io", "parallel"}
ALLOWED = {
  "buckets": set(),  # jaxllm/buckets.py: pure Python
  "config": set(),
  "kernels": {"config", "buckets"},
  "data": {"config"},
  "model": {"config", "kernels"},
  "io": {"config", "model", "data"},  # data is a leaf: io's load_model returns a model's tokenizer
  "parallel": {"config", "kernels", "model"},
  "train": BELOW_TRAIN_SERVE,
  "serve": BELOW_TRAIN_SERVE,
  "rl": BELOW_TRAIN_SERVE | {"train", "serve"},
  "planner": BELOW_TRAIN_SERVE | {"train"},  # jaxllm/planner/: train.optim's optimizer
  "cli": BELOW_TRAIN_SERVE | {"train", "serve", "rl", "planner"},  # train.py, serve.py, jaxllm/cli.py
  "package": set(),  # jaxllm/__init__.py: no imports
}


def layer_of(relpath: str) -> str:
  """Layer of a source file, from its path relative to the repo root: its top-level module or package
  under jaxllm/ (which may be undeclared: `violations` reports that), or cli outside jaxllm/."""
  parts = relpath.replace(os.sep, "/").split("/")
  if parts[0] != "jaxllm":
    return "cli"
  if parts[1] == "__init__.py":
    return "package"
  return parts[1].removesuffix(".py")


def imported_layers(source: str, relpath: str):
  """-> [(line, imported module, its jaxllm layer)] for every jaxllm import in `source`."""
  package = ".".join(relpath.removesuffix(".py").split("/")[:-1])
  out = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # relative import: resolve against the file's package
        base = package.split(".")[: len(package.split(".")) - node.level + 1]
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
        out.append((node.lineno, name, parts[1]))
  return out


def undeclared(relpath: str, name: str) -> str:
  return (
    f"{relpath}: jaxllm.{name} has no declared layer: declare it in ALLOWED (tests/test_layering.py) "
    "with the layers it may import"
  )


def violations(source: str, relpath: str) -> list[str]:
  """What is wrong with `source` at `relpath`: an undeclared layer, and each import its layer may not make."""
  layer = layer_of(relpath)
  found = [] if layer in ALLOWED else [undeclared(relpath, layer)]
  for line, name, target in imported_layers(source, relpath):
    if target not in ALLOWED:
      found.append(undeclared(f"{relpath}:{line}", target))
    elif target != layer and target not in ALLOWED.get(layer, set()):
      why = f"{target} is above it or beside it" if layer in ALLOWED else "an undeclared layer may import nothing"
      found.append(f"{relpath}:{line}: {layer} imports {name} ({why})")
  return found


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
  assert not found, "wrong-way imports or undeclared layers:\n" + "\n".join(found)


@pytest.mark.parametrize(
  "relpath,source",
  [
    ("jaxllm/parallel/pipeline.py", "def f():\n  from jaxllm.train.step import loss_sums\n"),
    ("jaxllm/serve/engine.py", "import jaxllm.train.checkpoint\n"),
    ("jaxllm/train/loop.py", "from jaxllm import serve\n"),
    ("jaxllm/kernels/tpu.py", "from jaxllm.model.layers import MASK_VALUE\n"),
    ("jaxllm/io/hf.py", "from jaxllm.parallel import param_shardings\n"),
    ("jaxllm/model/moe.py", "from ..parallel import moe\n"),
    ("jaxllm/config.py", "from jaxllm.model import hooks\n"),
    ("jaxllm/buckets.py", "from jaxllm.config import ModelConfig\n"),
    ("jaxllm/planner/__init__.py", "from jaxllm.serve import Engine\n"),
  ],
)
def test_a_wrong_way_import_is_caught_and_named(relpath, source):
  """The checker itself can fail: each of these inserted imports is reported with file and line."""
  found = violations(source, relpath)
  assert len(found) == 1 and found[0].startswith(f"{relpath}:"), found


def test_allowed_imports_pass():
  assert not violations("from jaxllm.parallel.sharding import param_shardings\nimport jax\n", "jaxllm/serve/engine.py")
  assert not violations("from jaxllm.kernels.reference import MASK_VALUE\n", "jaxllm/model/layers.py")
  assert not violations("from jaxllm.serve import complete_text\nfrom jaxllm.train.loop import train\n", "train.py")
  assert not violations("from jaxllm.buckets import pow2_bucket\n", "jaxllm/kernels/gpu.py")
  assert not violations("def f():\n  from jaxllm.train.optim import make_optimizer\n", "jaxllm/planner/__init__.py")


def test_an_undeclared_package_is_caught():
  """No free pass for a package ALLOWED does not list: a new jaxllm/utils/ importing jaxllm.rl is
  reported as undeclared (and so is its import), and so is importing from it."""
  found = violations("import jaxllm.rl\n", "jaxllm/utils/x.py")
  assert found == [
    "jaxllm/utils/x.py: jaxllm.utils has no declared layer: declare it in ALLOWED "
    "(tests/test_layering.py) with the layers it may import",
    "jaxllm/utils/x.py:1: utils imports jaxllm.rl (an undeclared layer may import nothing)",
  ], found
  found = violations("from jaxllm.utils.x import f\n", "jaxllm/serve/engine.py")
  assert len(found) == 1 and found[0].startswith("jaxllm/serve/engine.py:1: jaxllm.utils has no declared"), found
