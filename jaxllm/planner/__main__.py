"""`python -m jaxllm.planner`: the memory planner's command line (see jaxllm/planner/__init__.py)."""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # shapes only: never claim an accelerator

from jaxllm.planner import main  # noqa: E402

sys.exit(main())
