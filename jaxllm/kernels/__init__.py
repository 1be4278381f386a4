"""Paged attention for serving: Pallas kernels (TPU, GPU) and the pure-jnp reference, behind one switch.

Interface: jaxllm/kernels/reference.py. `get_attention_backend(name)` returns a namespace with
`paged_decode_attention` and `ragged_paged_attention`; the engine calls only those two.
Shapes: the package legend in jaxllm/__init__.py (R, Q, N, K, G, H, P, Z, M; used in reference.py).
"""

from __future__ import annotations

import functools
import types

import jax

BACKENDS = ("auto", "reference", "pallas")


def get_attention_backend(name: str, platform: str | None = None) -> types.SimpleNamespace:
  """name: "reference" (pure jnp), "pallas" (TPU kernels on TPU, Triton kernels on GPU, and on CPU
  the TPU kernels under TPU interpret mode -- correct but slow, for tests) or "auto" (pallas on TPU
  and GPU, reference on CPU). platform defaults to jax.default_backend()."""
  if name not in BACKENDS:
    raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
  platform = platform or jax.default_backend()
  if name == "auto":
    name = "pallas" if platform in ("tpu", "gpu", "cuda", "rocm") else "reference"
  if name == "reference":
    from jaxllm.kernels import reference as mod

    return types.SimpleNamespace(
      name="reference",
      platform=platform,
      paged_decode_attention=mod.paged_decode_attention,
      ragged_paged_attention=mod.ragged_paged_attention,
    )
  if platform in ("gpu", "cuda", "rocm"):
    from jaxllm.kernels import gpu as mod

    kw = {}
  elif platform == "tpu":
    from jaxllm.kernels import tpu as mod

    kw = {}
  elif platform == "cpu":
    from jax.experimental.pallas import tpu as pltpu

    from jaxllm.kernels import tpu as mod

    kw = {"interpret": pltpu.InterpretParams()}
  else:
    raise ValueError(f"no pallas attention kernels for platform {platform!r}; use 'reference'")
  return types.SimpleNamespace(
    name="pallas",
    platform=platform,
    paged_decode_attention=functools.partial(mod.paged_decode_attention, **kw),
    ragged_paged_attention=functools.partial(mod.ragged_paged_attention, **kw),
  )
