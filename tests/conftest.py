"""Force an 8-device CPU platform before jax is imported, so every parallel config runs here.

tests/ mirrors the package (tests/model/, tests/serve/, ...; project-wide checks at the top). Every
folder is on sys.path, so a test module imports another's helpers by name (`from test_serve import
DENSE`), and test module names are unique across folders. QUICK names the contributor tier,
`python -m pytest -m quick`: one or more fast modules of each layer, about 2 minutes on 2 cores.
"""

import os
import sys

import pytest

from jaxllm import cli

HERE = os.path.dirname(os.path.abspath(__file__))
for _d in sorted(os.listdir(HERE)):
  if os.path.isdir(os.path.join(HERE, _d)) and not _d.startswith((".", "_")):
    sys.path.insert(0, os.path.join(HERE, _d))

QUICK = {
  "test_config.py",
  "test_docs.py",
  "test_layering.py",
  "test_style.py",
  "test_notebook.py",
  "data/test_data.py",
  "data/test_tasks.py",
  "model/test_loss.py",
  "parallel/test_manual.py",
  "io/test_hf.py",
  "io/test_load_model.py",
  "train/test_runner.py",
  "train/test_optim.py",
  "serve/test_detok.py",
  "serve/test_radix.py",
  "serve/test_sampling.py",
  "serve/test_serve_overlap.py",
  "serve/test_serve_hooks.py",
  "serve/test_serve_multistep.py",
  "serve/test_serve_cli.py",
  "serve/test_http.py",
  "rl/test_rl_losses.py",
}

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# The suite is compile-bound on a fresh clone (small shapes, empty compile cache): LLVM at -O0 instead
# of -O3 changes no float semantics (no fast-math either way) and measured 113 s -> 81 s on three
# pipeline tests from a cold cache on 2 cores. Set the flag yourself to override it.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
CACHE = os.path.join(HERE, "..", ".jax_cache")


def pytest_configure(config):
  # pytest first re-runs itself once with glibc malloc keeping freed memory (jaxllm.cli.tune_malloc, as
  # train.py does; measured tests/train/test_train.py 135 s -> 63 s on 2 cores, the same tests and results).
  # Its output capture is stopped first, so the re-run writes to the terminal, not to a capture file.
  capture = config.pluginmanager.getplugin("capturemanager")
  cli.tune_malloc(before_exec=capture.stop_global_capturing if capture else None)
  import jax

  jax.config.update("jax_default_matmul_precision", "highest")
  # Identical programs compiled again in later tests (and later runs) load from disk instead.
  jax.config.update("jax_compilation_cache_dir", CACHE)
  os.environ["JAXLLM_COMPILE_CACHE"] = CACHE  # serve.py's own cache setting, when a test runs it
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def pytest_collection_modifyitems(items):
  for item in items:
    if os.path.relpath(str(item.path), HERE).replace(os.sep, "/") in QUICK and not item.get_closest_marker("slow"):
      item.add_marker(pytest.mark.quick)
