"""`python -m jaxllm.plan`: the memory planner's command line (see jaxllm/plan/__init__.py)."""
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")   # shapes only: never claim an accelerator

from jaxllm.plan import main  # noqa: E402

sys.exit(main())
