"""Force an 8-device CPU platform before jax is imported, so every parallel config runs here."""
import os

from jaxllm import cli

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# The suite is compile-bound on a fresh clone (small shapes, empty compile cache): LLVM at -O0 instead
# of -O3 changes no float semantics (no fast-math either way) and measured 113 s -> 81 s on three
# pipeline tests from a cold cache on 2 cores. Set the flag yourself to override it.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
CACHE = os.path.join(os.path.dirname(__file__), "..", ".jax_cache")


def pytest_configure(config):
  # pytest first re-runs itself once with glibc malloc keeping freed memory (jaxllm.cli.tune_malloc, as
  # train.py does; measured tests/test_train.py 135 s -> 63 s on 2 cores, the same tests and results).
  # Its output capture is stopped first, so the re-run writes to the terminal, not to a capture file.
  capture = config.pluginmanager.getplugin("capturemanager")
  cli.tune_malloc(before_exec=capture.stop_global_capturing if capture else None)
  import jax
  jax.config.update("jax_default_matmul_precision", "highest")
  # Identical programs compiled again in later tests (and later runs) load from disk instead.
  jax.config.update("jax_compilation_cache_dir", CACHE)
  os.environ["JAXLLM_COMPILE_CACHE"] = CACHE        # serve.py's own cache setting, when a test runs it
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
