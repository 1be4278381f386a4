"""Radix prefix cache and page allocator: unit tests, a hypothesis property test of the page
accounting invariant, and 10,000 random requests through the scheduler (model replaced by random
tokens; tests/serve/test_serve.py runs the real engine)."""

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxllm.serve.pages import PageAllocator
from jaxllm.serve.radix import RadixCache
from jaxllm.serve.sampling import SamplingParams
from jaxllm.serve.scheduler import Req, Scheduler

PS = 2


def make(total=16):
  alloc = PageAllocator(total)
  return alloc, RadixCache(alloc, PS)


def put(alloc, tree, key, extra=None):
  """Insert key with fresh pages the way a finished request does; returns its pages."""
  pages = alloc.alloc(len(key) // PS)
  prev = tree.insert(key, pages, extra)
  alloc.free(pages[: prev // PS])
  return pages


def test_allocator_null_page_and_refcounts():
  alloc = PageAllocator(3)
  pages = alloc.alloc(3)
  assert sorted(pages) == [1, 2, 3] and alloc.alloc(1) is None
  alloc.incref([pages[0]])
  alloc.free(pages)
  assert alloc.num_free == 2
  alloc.free([pages[0]])
  assert alloc.num_free == 3
  with pytest.raises(ValueError, match="double free"):
    alloc.free([pages[0]])
  with pytest.raises(ValueError, match="null page"):
    alloc.free([0])


def test_split_and_paged_match():
  alloc, tree = make()
  pages = put(alloc, tree, [1, 2, 3, 4, 5, 6])
  # Match ends inside the edge: the node is split at the page boundary.
  got, node = tree.match_prefix([1, 2, 3, 4, 9, 9])
  assert got == pages[:2] and node.key == (1, 2, 3, 4) and len(node.children) == 1
  # A partial page never matches: only whole pages are cached.
  got, _ = tree.match_prefix([1, 2, 3])
  assert got == pages[:1]
  got, _ = tree.match_prefix([1, 3])
  assert got == []
  # Insert a branch: the shared 2 pages are reported cached, the caller frees its duplicates.
  new = alloc.alloc(3)
  assert tree.insert([1, 2, 3, 4, 7, 8], new) == 4
  alloc.free(new[:2])
  got, _ = tree.match_prefix([1, 2, 3, 4, 7, 8, 0])
  assert got == pages[:2] + new[2:]
  tree.check()


def test_extra_key_namespaces():
  alloc, tree = make()
  put(alloc, tree, [1, 2, 3, 4], extra="v1")
  assert tree.match_prefix([1, 2, 3, 4], "v2")[0] == []
  assert len(tree.match_prefix([1, 2, 3, 4], "v1")[0]) == 2
  tree.check()


def test_lock_accounting():
  alloc, tree = make()
  put(alloc, tree, [1, 2, 3, 4, 5, 6])
  _, node = tree.match_prefix([1, 2, 3, 4])  # splits into [1..4] + [5, 6]
  tree.lock(node)
  assert (tree.protected, tree.evictable) == (2, 1)
  tree.check()
  assert tree.evict(10) == 1  # only the unlocked leaf goes
  assert tree.match_prefix([1, 2, 3, 4, 5, 6])[0] != [] and tree.total_pages() == 2
  tree.unlock(node)
  assert (tree.protected, tree.evictable) == (0, 2)
  with pytest.raises(RuntimeError, match="unbalanced"):
    tree.unlock(node)
  tree.check()


def test_eviction_order_is_lru_and_cascades():
  alloc, tree = make()
  put(alloc, tree, [1, 1, 2, 2])
  put(alloc, tree, [1, 1, 3, 3])
  put(alloc, tree, [4, 4])
  tree.match_prefix([1, 1, 2, 2])  # touch: [3, 3] branch is now oldest
  assert tree.evict(1) == 1
  assert len(tree.match_prefix([1, 1, 3, 3])[0]) == 1 and len(tree.match_prefix([1, 1, 2, 2])[0]) == 2
  assert tree.evict(1) == 1  # [4, 4] is next oldest
  assert tree.match_prefix([4, 4])[0] == []
  assert tree.evict(2) == 2  # leaf [2, 2], then its parent [1, 1]
  assert tree.total_pages() == 0 and alloc.num_free == alloc.total
  tree.check()


ops = st.lists(
  st.tuples(
    st.sampled_from(["insert", "match_lock", "unlock", "evict"]),
    st.lists(st.integers(0, 2), min_size=0, max_size=8),
    st.integers(0, 6),
  ),
  max_size=60,
)


@settings(max_examples=60, deadline=None)
@given(ops)
def test_invariant_under_random_operations(seq):
  alloc, tree = make(24)
  locked = []
  for op, key, n in seq:
    extra = n % 2
    if op == "insert":
      pages = alloc.alloc(len(key) // PS)
      if pages is None:
        tree.evict(len(key) // PS - alloc.num_free)
        pages = alloc.alloc(len(key) // PS)
      if pages is not None:
        prev = tree.insert(key, pages, extra)
        alloc.free(pages[: prev // PS])
    elif op == "match_lock":
      pages, node = tree.match_prefix(key, extra)
      assert len(pages) * PS <= len(key)
      tree.lock(node)
      locked.append(node)
    elif op == "unlock" and locked:
      tree.unlock(locked.pop(n % len(locked)))
    elif op == "evict":
      before = alloc.num_free
      freed = tree.evict(n)
      assert alloc.num_free == before + freed and (freed >= n or tree.evictable == 0)
    tree.check()
  for node in locked:
    tree.unlock(node)
  assert tree.protected == 0
  tree.evict(tree.evictable)
  assert alloc.num_free == alloc.total
  tree.check()


@pytest.mark.parametrize("policy", ["fcfs", "lpm", "dfs-weight"])
def test_no_page_leaked_after_10k_random_requests(policy):
  """Scheduler + radix + allocator with random 'sampled' tokens: a small pool forces eviction and
  preemption (decode_reserve=0: admission reserves no decode pages); every request finishes with
  exactly its max_tokens, and every page comes back."""
  rng = random.Random(0)
  ps, n_req = 4, 10_000 if policy == "fcfs" else 2_000
  sched = Scheduler(40, ps, max_running=8, chunk_size=24, policy=policy, decode_reserve=0.0)
  prefixes = [[rng.randrange(50) for _ in range(rng.randrange(4, 30))] for _ in range(12)]
  reqs, finished, steps = [], 0, 0
  while finished < n_req:
    while len(sched.waiting) < 16 and len(reqs) < n_req:
      prompt = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(1, 12))]
      req = Req(len(reqs), prompt, SamplingParams(max_tokens=rng.randrange(1, 10)))
      reqs.append(req)
      sched.add(req)
    batch = sched.schedule()
    assert batch, "no progress"
    toks = np.array([rng.randrange(50) for _ in batch])
    finished += len(sched.commit(batch, toks, np.zeros(len(batch)), 0.0))
    steps += 1
    if steps % 50 == 0:
      sched.check()
    if steps % 97 == 0:  # a weight swap: running requests are preempted, a new namespace starts
      sched.set_version(steps // 97 % 2)
  assert not sched.running and not sched.waiting
  assert all(len(r.output) == r.sp.max_tokens and r.finish_reason == "length" for r in reqs)
  assert sched.num_preemptions > 0 and sum(r.cache_hit for r in reqs) > 0
  sched.check()
  assert sched.tree.protected == 0
  sched.tree.evict(sched.tree.evictable)
  assert sched.alloc.num_free == sched.alloc.total


def _drive(sched, rng, n_req, prefixes):
  reqs, finished = [], 0
  while finished < n_req:
    while len(sched.waiting) < 16 and len(reqs) < n_req:
      prompt = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(1, 12))]
      req = Req(len(reqs), prompt, SamplingParams(max_tokens=rng.randrange(1, 10)))
      reqs.append(req)
      sched.add(req)
    batch = sched.schedule()
    assert batch, "no progress"
    finished += len(sched.commit(batch, np.array([rng.randrange(50) for _ in batch]), np.zeros(len(batch)), 0.0))
  return reqs


@pytest.mark.parametrize("policy", ["fcfs", "dfs-weight"])
def test_admission_reserving_decode_pages_never_preempts(policy):
  """SGLang-style admission: a request runs only if its prompt and max_tokens pages fit beside the
  running requests' reservations (free + evictable), so the same tight pool never preempts."""
  rng = random.Random(1)
  sched = Scheduler(40, 4, max_running=8, chunk_size=24, policy=policy)
  prefixes = [[rng.randrange(50) for _ in range(rng.randrange(4, 30))] for _ in range(12)]
  reqs = _drive(sched, rng, 1000, prefixes)
  assert sched.num_preemptions == 0 and sum(r.cache_hit for r in reqs) > 0
  sched.check()
  assert sched.tree.protected == 0


def test_dfs_weight_puts_uncached_requests_last():
  """Post-order DFS (SGLang): requests that hit a cached prefix first, heavier subtrees first, the
  root's (no match) last; a match that ends inside an edge counts for that edge's subtree."""
  ps = 4
  sched = Scheduler(64, ps, policy="dfs-weight")
  a, b = [1] * 8, [2] * 8
  sched.tree.insert(a, sched.alloc.alloc(2), sched.namespace)  # the key requests are admitted under
  sched.tree.insert(b, sched.alloc.alloc(2), sched.namespace)  # the key requests are admitted under
  # Request 4 matches only a's first page: a match ending inside an edge belongs to that subtree.
  reqs = [
    Req(0, [9] * 9, SamplingParams()),
    Req(1, a + [5], SamplingParams()),
    Req(2, b + [5], SamplingParams()),
    Req(3, b + [6], SamplingParams()),
    Req(4, a[:4] + [7] * 5, SamplingParams()),
    Req(5, b + [7], SamplingParams()),
  ]
  for r in reqs:
    sched.add(r)
  assert [r.rid for r in sched._ordered_waiting()] == [2, 3, 5, 1, 4, 0]
  assert sched.tree.prefix_len(a[:4] + [7] * 5, sched.namespace)[0] == 4
