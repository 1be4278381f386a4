"""Training (full-sequence, causal) self-attention behind one switch, `ModelConfig.attention`:

  xla     the naive reference: fp32 scores [B, K, G, T, T] and a [B, T, T] mask (memory quadratic in T)
  flash   blockwise attention in plain XLA: an online softmax over key blocks (FlashAttention, Dao et
          al. 2022), key blocks past the causal diagonal skipped, and a custom_vjp whose backward
          recomputes each block from the saved log-sum-exp: forward and backward memory linear in T
  cudnn   GPU: jax.nn.dot_product_attention(implementation="cudnn") (bf16/fp16 inputs only)
  splash  TPU: the Pallas splash-attention kernel (causal, segment ids), vmapped over batch and kv heads
  auto    cudnn on GPU (bf16, no document mask), splash on TPU (T a multiple of 128), flash otherwise

Every path takes `segment_ids` [B, T] int32 (document index within a packed row, or None): a query
attends to keys at or before it AND in the same document. GQA never repeats K/V: q is viewed as
[B, T, K, G, H]. Scores and softmax in fp32, output in q's dtype. Serving attention (the caches'
`attend`) is not here.

Shapes: the package legend in jaxllm/__init__.py (B, T, N, K, G, H).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxllm.config import ATTENTION_IMPLEMENTATIONS as IMPLEMENTATIONS
from jaxllm.model.layers import MASK_VALUE
from jaxllm.model.layers import attention as dense_attention
from jaxllm.model.varying import vary, varying_axes

# Query / key rows per block of the flash path: one block's fp32 scores are [B, K, G, block_q, block_k].
# By default a block is a quarter of the sequence rounded up to MIN_BLOCK rows, at most BLOCK_Q /
# BLOCK_K: larger blocks fall out of the CPU caches, and at short T smaller blocks let the causal skip
# drop work (figures: docs/benchmarks.md).
BLOCK_Q = BLOCK_K = 256
MIN_BLOCK = 64
# Loops over at most this many query blocks run as straight-line code (Python ints as block indices):
# key blocks wholly below the causal diagonal then skip the mask, and nothing is a while loop.
UNROLL_BLOCKS = 4


def document_mask(B: int, T: int, segment_ids=None):
  """[B, T, T] bool: causal, and (with segment_ids [B, T]) within one document."""
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), dtype=bool)), (B, T, T))
  if segment_ids is not None:
    mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
  return mask


def resolve(impl: str, q, segment_ids=None) -> str:
  """The concrete implementation `impl` means for q [B, T, N, H] on the default backend."""
  if impl != "auto":
    return impl
  platform = jax.devices()[0].platform
  T, H = q.shape[1], q.shape[3]
  if (
    platform in ("gpu", "cuda")
    and q.dtype in (jnp.bfloat16, jnp.float16)
    and segment_ids is None
    and H % 8 == 0
    and H <= 128
  ):
    return "cudnn"
  if platform == "tpu" and T % 128 == 0:
    return "splash"
  return "flash"


def self_attention(impl: str, q, k, v, segment_ids=None):
  """Causal (document-masked) self-attention. q [B, T, N, H]; k, v [B, T, K, H] -> [B, T, N, H]."""
  impl = resolve(impl, q, segment_ids)
  if impl == "xla":
    return dense_attention(q, k, v, document_mask(q.shape[0], q.shape[1], segment_ids))
  if impl == "flash":
    return flash_attention(q, k, v, segment_ids)
  if impl == "cudnn":
    return cudnn_attention(q, k, v, segment_ids)
  if impl == "splash":
    return splash_attention(q, k, v, segment_ids)
  raise ValueError(f"attention implementation {impl!r}: use one of {IMPLEMENTATIONS}")


# ---------------------------------------------------------------------------------------------
# flash: blockwise attention in XLA


def flash_block(T: int, block: int | None, most: int) -> int:
  """Rows per flash block for T positions: `block` if given, else a quarter of T rounded up to
  MIN_BLOCK, within [MIN_BLOCK, most]; never more than T."""
  if block is None:
    block = min(most, max(MIN_BLOCK, -(-T // (4 * MIN_BLOCK)) * MIN_BLOCK))
  return min(block, T)


def flash_attention(q, k, v, segment_ids=None, block_q: int | None = None, block_k: int | None = None):
  """Blockwise causal attention, memory linear in T in the forward and the backward.
  q [B, T, N, H]; k, v [B, T, K, H]; segment_ids [B, T] int or None -> [B, T, N, H] in q's dtype.
  Blocks: flash_block (T need not be a multiple)."""
  B, T, N, H = q.shape
  K = k.shape[2]
  if k.shape[1] != T:
    raise ValueError(f"flash attention is self-attention: q has {T} positions, k {k.shape[1]}")
  bq, bk = flash_block(T, block_q, BLOCK_Q), flash_block(T, block_k, BLOCK_K)
  seg = jnp.zeros((B, T), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  # Inside a region partitioned by hand (jaxllm.parallel.manual: manual TP, the pipeline) the inputs may
  # vary over different mesh axes: give them one type here, so the loops' carries and the backward's
  # cotangents all share it (jaxllm.model.varying).
  q, k, v, seg = vary((q, k, v, seg), varying_axes(q, k, v, seg))
  # Heads-major inside: q [B, K, G, T, H], k/v [B, K, T, H], so every block product below is a plain
  # batched matmul over (B, K) with no transposes in the loops (a token-major layout copies every
  # block into this order and back).
  qh = jnp.transpose(q.reshape(B, T, K, N // K, H), (0, 2, 3, 1, 4))
  out = _flash(bq, bk, segment_ids is not None, qh, jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3)), seg)
  return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(B, T, N, H)


def _pad(x, axis: int, size: int, value=0):
  if x.shape[axis] == size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad, constant_values=value)


def _padded(bq, bk, q, k, v, seg):
  """Pad T to whole blocks (q [B, K, G, T, H], k/v [B, K, T, H]); padded rows get segment -1 (they
  never meet a real row). q comes back scaled by H**-0.5 (once here, not on every block's scores)."""
  T, H = q.shape[3], q.shape[4]
  Tq, Tk = -(-T // bq) * bq, -(-T // bk) * bk
  q = q * jnp.asarray(H**-0.5, q.dtype)
  return (_pad(q, 3, Tq), _pad(k, 2, Tk), _pad(v, 2, Tk), _pad(seg, 1, Tq, -1), _pad(seg, 1, Tk, -1))


def _masked(s, bq, bk, i, j, seg_q, seg_k, documents: bool):
  """Scores s [B, K, G, bq, bk] of query block i and key block j with the keys a query may not see
  (later position, other document) set to MASK_VALUE. Unchanged when the indices are Python ints,
  there are no documents and the whole key block lies at or before the block's first query."""
  if not documents and isinstance(i, int) and isinstance(j, int) and (j + 1) * bk <= i * bq + 1:
    return s
  qs = jax.lax.dynamic_slice_in_dim(seg_q, i * bq, bq, axis=1)
  ks = jax.lax.dynamic_slice_in_dim(seg_k, j * bk, bk, axis=1)
  q_pos = i * bq + jnp.arange(bq)
  k_pos = j * bk + jnp.arange(bk)
  mask = (q_pos[:, None] >= k_pos[None, :])[None] & (qs[:, :, None] == ks[:, None, :])
  return jnp.where(mask[:, None, None], s, MASK_VALUE)


def _key_blocks(bq, bk, i, nk):
  """Key blocks query block i can see: 0 .. ceil((i+1)*bq / bk) - 1 (the rest lie in its future)."""
  return (min if isinstance(i, int) else jnp.minimum)(((i + 1) * bq + bk - 1) // bk, nk)


def _unrolled(nq: int, nk: int, bq: int, bk: int) -> bool:
  """Whether the block loops (forward and backward alike) run as straight-line code: at most
  UNROLL_BLOCKS query blocks, and the key blocks that cover them."""
  return nq <= UNROLL_BLOCKS and nk <= UNROLL_BLOCKS * max(1, bq // bk)


def _loop(lo, hi, body, init, unroll: bool, reverse: bool = False):
  """body(i, carry) for i in lo..hi-1 (hi-1 down to lo when reverse): straight-line code with Python
  int indices when `unroll` (the bounds are then ints), else a fori_loop."""
  if unroll:
    for i in range(hi - 1, lo - 1, -1) if reverse else range(lo, hi):
      init = body(i, init)
    return init
  if reverse:
    return jax.lax.fori_loop(lo, hi, lambda t, c: body(hi - 1 - (t - lo), c), init)
  return jax.lax.fori_loop(lo, hi, body, init)


def _forward(bq, bk, documents, q, k, v, seg):
  """q [B, K, G, T, H], k/v [B, K, T, H] -> out [B, K, G, T, H] (q's dtype), lse [B, K, G, Tq] fp32
  (padded rows included)."""
  B, K, G, T, H = q.shape
  qp, kp, vp, seg_q, seg_k = _padded(bq, bk, q, k, v, seg)
  Tq, Tk = qp.shape[3], kp.shape[2]
  nq, nk = Tq // bq, Tk // bk
  unroll = _unrolled(nq, nk, bq, bk)
  # Key blocks are visited from the diagonal back. When bk is a multiple of bq, every query row sees
  # a key in that first block (itself, and padded rows see padded keys), so the running max is a
  # real score from then on and exp(MASK_VALUE - max) is exactly 0: no second select on p.
  first_sees = bk % bq == 0
  axes = varying_axes(q, k, v, seg)

  def q_block(i, carry):
    out, lse = carry
    qi = jax.lax.dynamic_slice_in_dim(qp, i * bq, bq, axis=3)  # [B, K, G, bq, H]

    def k_block(j, c):
      m, l, acc = c
      kj = jax.lax.dynamic_slice_in_dim(kp, j * bk, bk, axis=2)  # [B, K, bk, H]
      vj = jax.lax.dynamic_slice_in_dim(vp, j * bk, bk, axis=2)
      s = jnp.einsum("bkgqh,bksh->bkgqs", qi, kj, preferred_element_type=jnp.float32)
      s = _masked(s, bq, bk, i, j, seg_q, seg_k, documents)
      m_new = jnp.maximum(m, jnp.max(s, axis=-1))
      p = jnp.exp(s - m_new[..., None])
      if not first_sees:  # a row may have seen no key yet: its max is MASK_VALUE
        p = jnp.where(s > MASK_VALUE, p, 0.0)
      alpha = jnp.exp(m - m_new)
      l = l * alpha + jnp.sum(p, axis=-1)
      pv = jnp.einsum("bkgqs,bksh->bkgqh", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32)
      return m_new, l, acc * alpha[..., None] + pv

    init = vary(
      (
        jnp.full((B, K, G, bq), MASK_VALUE, jnp.float32),
        jnp.zeros((B, K, G, bq), jnp.float32),
        jnp.zeros((B, K, G, bq, H), jnp.float32),
      ),
      axes,
    )
    m, l, acc = _loop(0, _key_blocks(bq, bk, i, nk), k_block, init, unroll, reverse=True)
    l_safe = jnp.where(l == 0, 1.0, l)  # a row that sees no key (padding only): output 0
    o = (acc / l_safe[..., None]).astype(q.dtype)  # [B, K, G, bq, H]
    out = jax.lax.dynamic_update_slice_in_dim(out, o, i * bq, axis=3)
    lse = jax.lax.dynamic_update_slice_in_dim(lse, m + jnp.log(l_safe), i * bq, axis=3)
    return out, lse

  init = vary((jnp.zeros(qp.shape, q.dtype), jnp.zeros((B, K, G, Tq), jnp.float32)), axes)
  out, lse = _loop(0, nq, q_block, init, unroll)
  return out[:, :, :, :T], lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _flash(bq, bk, documents, q, k, v, seg):
  return _forward(bq, bk, documents, q, k, v, seg)[0]


def _flash_fwd(bq, bk, documents, q, k, v, seg):
  out, lse = _forward(bq, bk, documents, q, k, v, seg)
  return out, (q, k, v, seg, out, lse)


def _flash_bwd(bq, bk, documents, res, dout):
  """Per key block j: dK_j, dV_j summed over the query blocks that see it (from its diagonal on),
  dQ accumulated into an fp32 [B, K, G, Tq, H] buffer; P recomputed from the saved lse."""
  q, k, v, seg, out, lse = res
  B, K, G, T, H = q.shape
  qp, kp, vp, seg_q, seg_k = _padded(bq, bk, q, k, v, seg)  # qp scaled
  Tq, Tk = qp.shape[3], kp.shape[2]
  dop = _pad(dout.astype(q.dtype), 3, Tq)
  # D_i = rowsum(dO * O) [B, K, G, Tq]
  delta = _pad(jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1), 3, Tq)
  nq, nk = Tq // bq, Tk // bk
  unroll = _unrolled(nq, nk, bq, bk)
  axes = varying_axes(q, k, v, seg, dout)
  dop, delta = vary((dop, delta), axes)

  def k_block(j, carry):
    dq, dk, dv = carry
    kj = jax.lax.dynamic_slice_in_dim(kp, j * bk, bk, axis=2)  # [B, K, bk, H]
    vj = jax.lax.dynamic_slice_in_dim(vp, j * bk, bk, axis=2)

    def q_block(i, c):
      dq, dkj, dvj = c
      qi = jax.lax.dynamic_slice_in_dim(qp, i * bq, bq, axis=3)  # [B, K, G, bq, H]
      doi = jax.lax.dynamic_slice_in_dim(dop, i * bq, bq, axis=3)
      lse_i = jax.lax.dynamic_slice_in_dim(lse, i * bq, bq, axis=3)  # [B, K, G, bq]
      d_i = jax.lax.dynamic_slice_in_dim(delta, i * bq, bq, axis=3)
      s = jnp.einsum("bkgqh,bksh->bkgqs", qi, kj, preferred_element_type=jnp.float32)
      p = jnp.exp(_masked(s, bq, bk, i, j, seg_q, seg_k, documents) - lse_i[..., None])  # masked: 0
      dvj = dvj + jnp.einsum("bkgqs,bkgqh->bksh", p.astype(doi.dtype), doi, preferred_element_type=jnp.float32)
      dp = jnp.einsum("bkgqh,bksh->bkgqs", doi, vj, preferred_element_type=jnp.float32)
      ds = p * (dp - d_i[..., None])
      # dK from the scaled q; dQ gets the scale once at the end
      dkj = dkj + jnp.einsum("bkgqs,bkgqh->bksh", ds.astype(qi.dtype), qi, preferred_element_type=jnp.float32)
      dqi = jnp.einsum("bkgqs,bksh->bkgqh", ds.astype(kj.dtype), kj, preferred_element_type=jnp.float32)
      old = jax.lax.dynamic_slice_in_dim(dq, i * bq, bq, axis=3)
      dq = jax.lax.dynamic_update_slice_in_dim(dq, old + dqi, i * bq, axis=3)
      return dq, dkj, dvj

    zeros = vary(jnp.zeros((B, K, bk, H), jnp.float32), axes)
    dq, dkj, dvj = _loop((j * bk) // bq, nq, q_block, (dq, zeros, zeros), unroll)
    dk = jax.lax.dynamic_update_slice_in_dim(dk, dkj.astype(dk.dtype), j * bk, axis=2)
    dv = jax.lax.dynamic_update_slice_in_dim(dv, dvj.astype(dv.dtype), j * bk, axis=2)
    return dq, dk, dv

  init = vary((jnp.zeros(qp.shape, jnp.float32), jnp.zeros(kp.shape, k.dtype), jnp.zeros(vp.shape, v.dtype)), axes)
  dq, dk, dv = _loop(0, nk, k_block, init, unroll)
  dq = dq[:, :, :, :T] * (H**-0.5)
  return dq.astype(q.dtype), dk[:, :, :T], dv[:, :, :T], None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---------------------------------------------------------------------------------------------
# cudnn (GPU) and splash (TPU)


def cudnn_attention(q, k, v, segment_ids=None, implementation: str = "cudnn"):
  """jax.nn.dot_product_attention, GQA native (k, v keep their K heads). cuDNN takes causal masking
  natively; a document mask goes in as a [B, 1, T, T] mask, which cuDNN turns into a bias: memory
  quadratic in T again ("auto" picks flash when there are segment ids). cuDNN wants bf16/fp16.
  `implementation="xla"` runs the same call through XLA (the tests use it on CPU)."""
  if implementation == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(
      f"model.attention='cudnn' needs bf16/fp16 activations (model.dtype='bfloat16'), got "
      f"{q.dtype}; use model.attention='flash' (or 'auto') for float32"
    )
  mask = None
  if segment_ids is not None:
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
  out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation=implementation)
  return out.astype(q.dtype)


def splash_attention(q, k, v, segment_ids=None, interpret: bool = False):
  """The Pallas TPU splash-attention kernel: an MQA kernel per kv head (its G query heads share one
  K/V), vmapped over batch and kv heads; causal mask, documents as segment ids. T must be a multiple
  of the kernel's 128-row blocks. `interpret=True` runs the kernel in the Pallas interpreter."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  B, T, N, H = q.shape
  K = k.shape[2]
  G = N // K
  if T % 128:
    raise ValueError(
      f"model.attention='splash' needs the sequence length ({T}) to be a multiple of 128; "
      "use model.attention='flash' (or 'auto') for other lengths"
    )
  mask = sm.MultiHeadMask([sm.CausalMask((T, T)) for _ in range(G)])
  kernel = sk.make_splash_mqa_single_device(mask, interpret=interpret)
  qg = jnp.transpose(q.reshape(B, T, K, G, H), (0, 2, 3, 1, 4)) * jnp.asarray(H**-0.5, q.dtype)  # [B, K, G, T, H]
  kt, vt = jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))  # [B, K, T, H]
  if segment_ids is None:
    run = lambda qh, kh, vh, s: kernel(qh, kh, vh)
    seg = jnp.zeros((B, T), jnp.int32)
  else:
    run = lambda qh, kh, vh, s: kernel(qh, kh, vh, segment_ids=sk.SegmentIds(q=s, kv=s))
    seg = segment_ids.astype(jnp.int32)
  per_head = jax.vmap(run, in_axes=(0, 0, 0, None))  # over K
  out = jax.vmap(per_head, in_axes=(0, 0, 0, 0))(qg, kt, vt, seg)  # [B, K, G, T, H]
  return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(B, T, N, H).astype(q.dtype)
