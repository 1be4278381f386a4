"""Paged attention kernels equal their pure-jnp reference, and the reference equals dense attention.

Every page slot no live key occupies -- whole unused pages (page 0, the null page, included) and the
tail of each partially filled page -- holds NaN, so a kernel that reads one shows it in the output.
The Pallas kernels run in interpret mode: TPU kernels under pltpu.InterpretParams(), GPU (Triton)
kernels with interpret=True. Shapes stay tiny because interpret mode runs grid steps one by one. TPU
interpret mode fills scratch buffers with NaN too (a stale read of a DMA buffer shows) and raises on an
out-of-bounds DMA, which the poisoned page tables below use to prove a kernel copies only the pages it
needs.

Shapes: the package legend in jaxllm/__init__.py (R, Q, N, K, G, H, P, Z, M; B, T, S for the dense
attention the reference is checked against, S = M * Z).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from jaxllm.kernels import get_attention_backend, gpu, reference, tpu
from jaxllm.model.layers import attention

TOL = {jnp.float32: dict(atol=1e-5, rtol=1e-5), jnp.bfloat16: dict(atol=2e-2, rtol=2e-2)}
KERNELS = {
  "tpu": (tpu, dict(interpret=pltpu.InterpretParams())),
  "gpu": (gpu, dict(interpret=True)),
}


def make_cache(rng, kv_lens, Z, K, H, M, dtype, spare_pages=3):
  """Scatter random per-sequence K/V into randomly permuted pages; everything else is NaN.

  Returns k_pages, v_pages [K, P, Z, H] (head-major, like the engine's pool), page_table [R, M] (padded
  with the null page 0) and the contiguous per-sequence (k, v) [len, K, H] that were scattered, for
  dense checks.
  """
  n_pages = [-(-int(n) // Z) for n in kv_lens]
  P = 1 + sum(n_pages) + spare_pages
  k_pages = np.full((K, P, Z, H), np.nan, np.float32)
  v_pages = np.full((K, P, Z, H), np.nan, np.float32)
  page_table = np.zeros((len(kv_lens), M), np.int32)
  free = list(rng.permutation(np.arange(1, P)))
  dense = []
  for s, n in enumerate(kv_lens):
    k = rng.normal(size=(int(n), K, H)).astype(np.float32)
    v = rng.normal(size=(int(n), K, H)).astype(np.float32)
    for j in range(n_pages[s]):
      page = free.pop()
      page_table[s, j] = page
      rows = slice(j * Z, min((j + 1) * Z, int(n)))
      k_pages[:, page, : rows.stop - rows.start] = k[rows].transpose(1, 0, 2)
      v_pages[:, page, : rows.stop - rows.start] = v[rows].transpose(1, 0, 2)
    dense.append((k, v))
  cast = lambda x: jnp.asarray(x, dtype)
  return cast(k_pages), cast(v_pages), jnp.asarray(page_table), dense


def decode_case(seed, Z, G, dtype, K=2, H=16, M=4):
  """Lengths cover 1, a partial tail, an exact page multiple, the full table, and a padding row (0)."""
  rng = np.random.default_rng(seed)
  kv_lens = np.array([1, Z + 3 if Z > 3 else Z + 1, 2 * Z, M * Z, 0, rng.integers(1, M * Z + 1)], np.int32)
  k_pages, v_pages, page_table, dense = make_cache(rng, kv_lens, Z, K, H, M, dtype)
  q = jnp.asarray(rng.normal(size=(len(kv_lens), K * G, H)), dtype)
  return (q, k_pages, v_pages, jnp.asarray(kv_lens), page_table), dense


def ragged_case(seed, Z, G, dtype, K=2, H=16, M=3):
  """A decode row (q_len 1), a full prefill, a live sequence with no rows this step, chunked prefills
  with a cached prefix, a padding sequence (R > num_seqs) and padding rows after the last live one."""
  rng = np.random.default_rng(seed)
  cap = M * Z  # keys a sequence can hold
  kv_lens = np.array([rng.integers(1, cap + 1), min(Z + 1, cap), 3, cap, rng.integers(2, cap + 1), 0], np.int32)
  q_lens = np.array(
    [1, kv_lens[1], 0, rng.integers(1, min(kv_lens[3], 9) + 1), rng.integers(1, min(kv_lens[4], 6) + 1), 0], np.int32
  )
  num_seqs = 5
  cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
  k_pages, v_pages, page_table, dense = make_cache(rng, kv_lens, Z, K, H, M, dtype)
  q = jnp.asarray(rng.normal(size=(int(cu[-1]) + 3, K * G, H)), dtype)
  args = (q, k_pages, v_pages, jnp.asarray(kv_lens), page_table, jnp.asarray(cu), jnp.int32(num_seqs))
  return args, dense


CASES = [  # (page size Z, GQA ratio G = N // K, dtype)
  (4, 1, jnp.float32),
  (8, 2, jnp.float32),
  (16, 4, jnp.float32),
  (8, 4, jnp.bfloat16),
]
case_ids = [f"Z{Z}-g{g}-{jnp.dtype(d).name}" for Z, g, d in CASES]


def check(out, want, dtype):
  out, want = np.asarray(out, np.float32), np.asarray(want, np.float32)
  assert np.isfinite(out).all(), "kernel output has NaN/inf: it read an unused page or slot"
  np.testing.assert_allclose(out, want, **TOL[dtype])


@pytest.mark.parametrize("impl", sorted(KERNELS))
@pytest.mark.parametrize("Z,G,dtype", CASES, ids=case_ids)
def test_decode_kernel_equals_reference(impl, Z, G, dtype):
  args, _ = decode_case(Z * 10 + G, Z, G, dtype)
  want = reference.paged_decode_attention(*args)
  mod, kw = KERNELS[impl]
  out = mod.paged_decode_attention(*args, **kw)
  assert out.shape == args[0].shape and out.dtype == args[0].dtype
  check(out, want, dtype)
  np.testing.assert_array_equal(np.asarray(out[4], np.float32), 0.0)  # kv_len 0: padding row -> 0


@pytest.mark.parametrize("impl", sorted(KERNELS))
@pytest.mark.parametrize("Z,G,dtype", CASES, ids=case_ids)
def test_ragged_kernel_equals_reference(impl, Z, G, dtype):
  args, _ = ragged_case(Z * 10 + G, Z, G, dtype)
  want = reference.ragged_paged_attention(*args)
  mod, kw = KERNELS[impl]
  out = mod.ragged_paged_attention(*args, **kw)
  assert out.shape == args[0].shape and out.dtype == args[0].dtype
  check(out, want, dtype)
  live = int(args[5][args[6]])
  np.testing.assert_array_equal(np.asarray(out[live:], np.float32), 0.0)  # padding rows -> 0


def pad_dense(dense, S):
  """Contiguous per-sequence K/V zero-padded to one [B, S, K, H] batch (no NaN: nothing paged)."""
  out = np.zeros((2, len(dense), S) + dense[0][0].shape[1:], np.float32)
  for s, (k, v) in enumerate(dense):
    out[0, s, : len(k)], out[1, s, : len(v)] = k, v
  return jnp.asarray(out[0]), jnp.asarray(out[1])


@pytest.mark.parametrize("impl", sorted(KERNELS))
def test_ragged_many_short_sequences(impl):
  """More sequences than a query block has rows (decode-heavy batches), some live ones without rows:
  the TPU kernel's per-block sequence lists and the GPU kernel's per-sequence tiles both get busy."""
  rng = np.random.default_rng(7)
  Z, G, M, num_seqs = 4, 2, 3, 13
  kv_lens = np.concatenate([rng.integers(2, M * Z + 1, num_seqs), [0]]).astype(np.int32)
  q_lens = np.array([1] * 9 + [0, 2, 1, 3, 0], np.int32)  # block 0 = 8 one-row sequences
  cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
  k_pages, v_pages, page_table, _ = make_cache(rng, kv_lens, Z, 2, 16, M, jnp.float32)
  q = jnp.asarray(rng.normal(size=(int(cu[-1]) + 2, 2 * G, 16)), jnp.float32)
  args = (q, k_pages, v_pages, jnp.asarray(kv_lens), page_table, jnp.asarray(cu), jnp.int32(num_seqs))
  mod, kw = KERNELS[impl]
  out = mod.ragged_paged_attention(*args, **kw, block_q=8)
  check(out, reference.ragged_paged_attention(*args), jnp.float32)


def poison_table(page_table, kv_lens, Z, no_rows=()):
  """page_table with every entry a kernel must not read -- past each sequence's ceil(kv_len / Z) pages,
  and all of those of sequences in `no_rows` (no query rows this step) -- set to an out-of-range page id:
  TPU interpret mode raises on a DMA from it."""
  pt, kv_lens = np.array(page_table), np.asarray(kv_lens)
  pt[np.arange(pt.shape[1])[None, :] >= -(-kv_lens[:, None] // Z)] = 10**6
  pt[list(no_rows)] = 10**6
  return jnp.asarray(pt)


BLOCK_CASES = [(4, 1, jnp.float32), (8, 4, jnp.bfloat16)]
block_ids = [f"Z{Z}-g{g}-{jnp.dtype(d).name}" for Z, g, d in BLOCK_CASES]


@pytest.mark.parametrize("Z,G,dtype", BLOCK_CASES, ids=block_ids)
def test_tpu_decode_multi_page_blocks(Z, G, dtype):
  """3 pages per KV block over a 7-page table: sequences of one block, several, a partial last block
  (7 = 3 + 3 + 1 pages, and partial pages) and a padding row, so the double-buffered walk crosses blocks
  and kv heads. The page table is poisoned past each sequence's pages: only needed pages are copied."""
  args, _ = decode_case(Z + G, Z, G, dtype, M=7)
  q, k_pages, v_pages, kv_lens, page_table = args
  bad = poison_table(page_table, kv_lens, Z)
  out = tpu.paged_decode_attention(q, k_pages, v_pages, kv_lens, bad, pages_per_block=3, **KERNELS["tpu"][1])
  check(out, reference.paged_decode_attention(*args), dtype)
  np.testing.assert_array_equal(np.asarray(out[4], np.float32), 0.0)  # kv_len 0: padding row -> 0


@pytest.mark.parametrize("Z,G,dtype", BLOCK_CASES, ids=block_ids)
def test_tpu_ragged_multi_page_blocks(Z, G, dtype):
  """8-token query blocks, 2-page KV blocks over a 5-page table. Sequence 0 is a chunked prefill over
  query blocks 0 and 1 whose block-0 rows stop attending inside KV block 1's first page while its keys
  go on into the next page (a key neither copied nor causal, whose stale buffer slot is NaN); then a
  decode row over all 5 pages (KV blocks 2 + 2 + 1), a live sequence with no rows and a padding
  sequence (neither may be copied at all: their page-table rows are poisoned whole), a full prefill
  sharing a query block with others, a short decode, and padding rows after the last live one."""
  rng = np.random.default_rng(Z + G)
  M, num_seqs = 5, 5
  q_lens = np.array([Z + 5, 1, 0, Z + 1, 1, 0], np.int32)
  kv_lens = np.array([3 * Z + 1, M * Z, 3, Z + 1, 2, 0], np.int32)
  cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
  k_pages, v_pages, page_table, _ = make_cache(rng, kv_lens, Z, 2, 16, M, dtype)
  q = jnp.asarray(rng.normal(size=(int(cu[-1]) + 3, 2 * G, 16)), dtype)
  args = (q, k_pages, v_pages, jnp.asarray(kv_lens), page_table, jnp.asarray(cu), jnp.int32(num_seqs))
  bad = poison_table(page_table, kv_lens, Z, no_rows=[2, 5])
  out = tpu.ragged_paged_attention(*args[:4], bad, *args[5:], block_q=8, pages_per_block=2, **KERNELS["tpu"][1])
  check(out, reference.ragged_paged_attention(*args), dtype)
  np.testing.assert_array_equal(np.asarray(out[cu[-1] :], np.float32), 0.0)  # padding rows -> 0


@pytest.mark.parametrize(
  "splits,Z,G,dtype", [(2, 4, 1, jnp.float32), (5, 8, 4, jnp.bfloat16)], ids=["s2-Z4-g1-float32", "s5-Z8-g4-bfloat16"]
)
def test_gpu_decode_split_k(splits, Z, G, dtype):
  """Flash-decoding splits over an 8-page table, one page per KV block: the 1-key sequence leaves every
  split but the first empty (m at the mask value, l = 0: weight 0 in the merge), others end mid-split,
  and the padding row has only empty splits (output 0)."""
  args, _ = decode_case(splits, Z, G, dtype, M=8)
  out = gpu.paged_decode_attention(*args, pages_per_block=1, num_splits=splits, interpret=True)
  check(out, reference.paged_decode_attention(*args), dtype)
  np.testing.assert_array_equal(np.asarray(out[4], np.float32), 0.0)  # kv_len 0: padding row -> 0


def test_gpu_decode_num_splits_heuristic():
  """Split only when R * K programs leave the GPU idle, and only as far as the context has KV blocks."""
  assert gpu.decode_num_splits(R=64, K=8, M=256, pages_per_block=4) == 1  # 512 programs already
  assert gpu.decode_num_splits(R=1, K=8, M=256, pages_per_block=4) == 16  # 8 programs x 16 splits
  assert gpu.decode_num_splits(R=2, K=2, M=32, pages_per_block=4) == 2  # 8 blocks: 4 per split
  assert gpu.decode_num_splits(R=2, K=2, M=8, pages_per_block=4) == 1  # too short to split


@pytest.mark.parametrize("Z,G", [(4, 2), (8, 1)])
def test_reference_equals_dense_attention(Z, G):
  """The reference against jaxllm.model.layers.attention on contiguous (never paged) K/V."""
  (q, k_pages, v_pages, kv_lens, page_table), dense = decode_case(Z + G, Z, G, jnp.float32)
  out = reference.paged_decode_attention(q, k_pages, v_pages, kv_lens, page_table)
  S = page_table.shape[1] * Z  # M * Z
  k, v = pad_dense(dense, S)
  mask = (jnp.arange(S)[None, :] < kv_lens[:, None])[:, None, :]  # [B, 1, S]
  want = jax.jit(attention)(q[:, None], k, v, mask)[:, 0]
  live = np.asarray(kv_lens) > 0  # dense gives padding rows a mean
  np.testing.assert_allclose(out[live], want[live], atol=1e-5, rtol=1e-5)

  args, dense = ragged_case(Z + G, Z, G, jnp.float32)
  q, kv_lens, cu, num_seqs = args[0], np.asarray(args[3]), np.asarray(args[5]), int(args[6])
  out = reference.ragged_paged_attention(*args)
  T, S = int(np.diff(cu).max()), int(kv_lens.max())
  k, v = pad_dense(dense[:num_seqs], S)
  rows = np.zeros((num_seqs, T), np.int32)  # [B, T] padded with row 0, ignored
  mask = np.zeros((num_seqs, T, S), bool)
  for s in range(num_seqs):
    n = cu[s + 1] - cu[s]
    rows[s, :n] = np.arange(cu[s], cu[s + 1])
    qpos = kv_lens[s] - n + np.arange(n)  # queries are the last n positions
    mask[s, :n] = np.arange(S)[None, :] <= qpos[:, None]
  want = jax.jit(attention)(q[rows], k, v, jnp.asarray(mask))
  for s in range(num_seqs):
    n = cu[s + 1] - cu[s]
    np.testing.assert_allclose(out[cu[s] : cu[s + 1]], want[s, :n], atol=1e-5, rtol=1e-5)


def test_reference_ragged_blocks_equal_dense_attention():
  """Steps longer than one query block (64 rows): sequences of several blocks, an exact multiple, a
  partial last block, a decode row between prefills, a live sequence without rows, trailing padding."""
  rng = np.random.default_rng(5)
  Z, K, G, H = 16, 2, 2, 8
  q_lens = np.array([150, 1, 64, 0, 65, 7], np.int32)
  kv_lens = q_lens + np.array([0, 40, 16, 9, 100, 3], np.int32)  # cached prefixes before the rows
  M = int(-(-kv_lens.max() // Z))
  k_pages, v_pages, page_table, dense = make_cache(rng, kv_lens, Z, K, H, M, jnp.float32)
  cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
  q = jnp.asarray(rng.normal(size=(int(cu[-1]) + 5, K * G, H)), jnp.float32)
  out = np.asarray(
    reference.ragged_paged_attention(
      q, k_pages, v_pages, jnp.asarray(kv_lens), page_table, jnp.asarray(cu), jnp.int32(len(q_lens))
    )
  )
  assert reference.query_block_size(q.shape[0]) == 64 and np.isfinite(out).all()
  for s in range(len(q_lens)):
    k, v = dense[s]
    qs = np.asarray(q[cu[s] : cu[s + 1]]).reshape(-1, K, G, H)
    qpos = kv_lens[s] - q_lens[s] + np.arange(q_lens[s])
    sc = np.einsum("qkgh,ckh->qkgc", qs, k) / np.sqrt(H)
    sc = np.where((np.arange(kv_lens[s])[None, :] <= qpos[:, None])[:, None, None, :], sc, -np.inf)
    p = np.exp(sc - sc.max(-1, keepdims=True))
    want = np.einsum("qkgc,ckh->qkgh", p / p.sum(-1, keepdims=True), v).reshape(-1, K * G, H)
    np.testing.assert_allclose(out[cu[s] : cu[s + 1]], want, atol=1e-5, rtol=1e-5)
  assert (out[cu[-1] :] == 0).all()  # padding rows


def test_backend_switch():
  ref = get_attention_backend("reference")
  assert ref.paged_decode_attention is reference.paged_decode_attention
  pallas = get_attention_backend("pallas", platform="cpu")  # the TPU kernels, interpret mode
  args, _ = decode_case(0, 4, 1, jnp.float32)
  check(pallas.paged_decode_attention(*args), ref.paged_decode_attention(*args), jnp.float32)
  assert get_attention_backend("pallas", platform="gpu").ragged_paged_attention.func is gpu.ragged_paged_attention
  with pytest.raises(ValueError, match="reference, pallas"):
    get_attention_backend("flash")


@pytest.mark.parametrize("platform,mod,marker", [("tpu", tpu, "tpu_custom_call"), ("cuda", gpu, "xla.gpu.triton")])
def test_kernels_lower_for_their_hardware(platform, mod, marker):
  """Runs each kernel's real lowering (Mosaic for TPU, Triton for GPU) on CPU at a serving-like bf16
  shape, which rejects what interpret mode lets through (unsupported ops, non-power-of-two Triton tiles,
  TPU block rules). Compiling the lowered kernel needs the hardware."""
  R, Q, P, Z, K, G, H, M = 8, 40, 64, 16, 2, 4, 128, 8
  sds = jax.ShapeDtypeStruct
  pages = sds((K, P, Z, H), jnp.bfloat16)
  table, lens = sds((R, M), jnp.int32), sds((R,), jnp.int32)
  # Beyond the defaults: a partial last KV block (TPU, 3 pages of 8) and split-K decode (GPU).
  knobs = dict(pages_per_block=3) if mod is tpu else dict(num_splits=2)
  decode = [
    mod.paged_decode_attention.trace(sds((R, K * G, H), jnp.bfloat16), pages, pages, lens, table, **kw)
    for kw in ({}, knobs)
  ]
  ragged = mod.ragged_paged_attention.trace(
    sds((Q, K * G, H), jnp.bfloat16), pages, pages, lens, table, sds((R + 1,), jnp.int32), sds((), jnp.int32)
  )
  for traced in (*decode, ragged):
    assert marker in traced.lower(lowering_platforms=(platform,)).as_text()  # the serialized kernel


def test_gpu_rejects_non_power_of_two_page_size():
  args, _ = decode_case(0, 6, 1, jnp.float32)
  with pytest.raises(ValueError, match="power of two"):
    gpu.paged_decode_attention(*args, interpret=True)
