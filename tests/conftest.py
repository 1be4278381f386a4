"""Force an 8-device CPU platform before jax is imported, so every parallel config runs here."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Identical programs compiled again in later tests (and later runs) load from disk instead.
CACHE = os.path.join(os.path.dirname(__file__), "..", ".jax_cache")
jax.config.update("jax_compilation_cache_dir", CACHE)
os.environ["JAXLLM_COMPILE_CACHE"] = CACHE        # serve.py's own cache setting, when a test runs it
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
