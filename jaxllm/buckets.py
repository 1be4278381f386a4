"""Power-of-two size buckets. A jitted function compiles once per shape, so a size that varies from
call to call (sequences or tokens in an engine step, a penalty history, a sequence length) is padded
up to its bucket and a few compiled shapes cover every size. A leaf: imports nothing of jaxllm, so
kernels, serve, rl and the CLIs all share this one definition.
"""


def pow2_bucket(n: int, lo: int = 1) -> int:
  """The smallest power of two >= n, and at least lo; n is a power of two iff pow2_bucket(n) == n (n >= 1)."""
  return max(lo, 1 << max(0, n - 1).bit_length())
