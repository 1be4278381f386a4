"""The serving engine: paged KV cache, radix prefix cache, cache-aware scheduler, jitted steps.

What other layers (RL, the CLIs) use, and all they should need: `Engine` (requests in, token ids
out), `SamplingParams`, `Result`, and `complete_text` / `serving_mesh` for one-shot generation.
"""

from jaxllm.serve.engine import Engine, Result
from jaxllm.serve.offline import complete_text, serving_mesh
from jaxllm.serve.sampling import SamplingParams

__all__ = ["Engine", "Result", "SamplingParams", "complete_text", "serving_mesh"]
