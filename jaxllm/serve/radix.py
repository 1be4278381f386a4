"""Page-granular radix tree over token ids: SGLang's RadixAttention prefix cache (Zheng et al., 2024).

Each edge holds a run of whole pages: `key` is page_size * n token ids, `pages` the n KV page ids
that store them. Requests that share a prefix share its pages. The tree owns one reference on every
page it holds (see PageAllocator); running requests `lock` the node where their cached prefix ends,
which pins the whole path to the root. Unlocked leaves are evicted least-recently-used first.

`extra_key` namespaces the tree (model weight version, LoRA id): two requests share pages only when
their tokens AND extra keys agree, so KV computed with old weights is never reused with new ones.

Accounting: every page the tree holds is either `evictable` (its node's lock_ref == 0) or
`protected`; with the allocator's free list, at any idle point
    free + evictable + protected == total.

Shapes: the package legend in jaxllm/__init__.py (Z); keys are token-id tuples, counted in pages of Z.
"""

from __future__ import annotations

import heapq
import itertools
import time
from typing import Hashable, Sequence

from jaxllm.serve.pages import PageAllocator

_clock = itertools.count()  # logical time for LRU: strictly increasing, no ties, no wall-clock jitter


class Node:
  __slots__ = ("key", "pages", "children", "parent", "lock_ref", "last_access", "extra_key")

  def __init__(self, key: tuple, pages: list, parent: "Node | None", extra_key: Hashable = None):
    self.key = key  # token ids on the edge into this node (len = page_size * len(pages))
    self.pages = pages  # page ids holding their KV
    self.children: dict = {}  # (extra_key, first page of child key) -> Node
    self.parent = parent
    self.lock_ref = 0  # running requests whose cached prefix passes through this node
    self.last_access = next(_clock)
    self.extra_key = extra_key

  def __repr__(self):
    return f"Node(tokens={len(self.key)}, pages={self.pages}, lock={self.lock_ref})"


class RadixCache:
  def __init__(self, allocator: PageAllocator, page_size: int):
    self.alloc = allocator
    self.page_size = page_size
    self.root = Node((), [], None)
    self.root.lock_ref = 1  # the root is never evicted
    self.evictable = 0  # pages in nodes with lock_ref == 0
    self.protected = 0  # pages in locked nodes
    self.seconds = 0.0  # host time spent in tree operations (bookkeeping share in the bench)

  # ---- lookup -------------------------------------------------------------------------------
  def _child_key(self, extra_key, key, pos):
    return (extra_key, tuple(key[pos : pos + self.page_size]))

  def _common_pages(self, node_key: tuple, key: Sequence[int], pos: int) -> int:
    """Number of leading whole pages on which node_key equals key[pos:]."""
    Z, n = self.page_size, 0
    limit = min(len(node_key), len(key) - pos) // Z
    while n < limit and tuple(key[pos + n * Z : pos + (n + 1) * Z]) == node_key[n * Z : (n + 1) * Z]:
      n += 1
    return n

  def match_prefix(self, key: Sequence[int], extra_key: Hashable = None) -> tuple[list[int], Node]:
    """Longest cached whole-page prefix of `key`: (its page ids, the node where it ends).

    Splits a node when the match ends inside its edge, so the returned node covers exactly the
    match (and can be locked without pinning pages the caller does not use).
    """
    t0 = time.perf_counter()
    Z = self.page_size
    key = key[: len(key) // Z * Z]
    node, pos, pages = self.root, 0, []
    now = next(_clock)
    while pos < len(key):
      child = node.children.get(self._child_key(extra_key, key, pos))
      if child is None:
        break
      n = self._common_pages(child.key, key, pos)
      if n < len(child.pages):
        child = self._split(child, n)
      child.last_access = now
      pages += child.pages
      pos += n * Z
      node = child
    self.seconds += time.perf_counter() - t0
    return pages, node

  def prefix_len(self, key: Sequence[int], extra_key: Hashable = None) -> tuple[int, Node]:
    """Read-only match for scheduling policies: (matched tokens, node whose edge the match ends
    on -- inside its edge too, since the request then shares that node's subtree). Does not split
    or touch LRU times."""
    Z = self.page_size
    node, pos = self.root, 0
    while pos + Z <= len(key):
      child = node.children.get(self._child_key(extra_key, key, pos))
      if child is None:
        break
      n = self._common_pages(child.key, key, pos)
      pos += n * Z
      node = child
      if n < len(child.pages):
        break
    return pos, node

  def _split(self, child: Node, n: int) -> Node:
    """Cut child's edge after n pages; returns the new upper node (which keeps child's lock)."""
    Z = self.page_size
    mid = Node(child.key[: n * Z], child.pages[:n], child.parent, child.extra_key)
    mid.lock_ref, mid.last_access = child.lock_ref, child.last_access
    child.parent.children[(child.extra_key, child.key[:Z])] = mid
    child.key, child.pages, child.parent = child.key[n * Z :], child.pages[n:], mid
    mid.children[(child.extra_key, child.key[:Z])] = child
    return mid

  # ---- insert -------------------------------------------------------------------------------
  def insert(self, key: Sequence[int], pages: Sequence[int], extra_key: Hashable = None) -> int:
    """Cache `pages` as the KV of key's whole pages. Returns how many leading tokens were already
    cached: the caller's pages for that span are duplicates, and the caller frees them. The tree
    takes over the caller's reference on the remaining pages."""
    t0 = time.perf_counter()
    Z = self.page_size
    n_pages = len(key) // Z
    assert len(pages) >= n_pages, f"insert: {len(key)} tokens need {n_pages} pages, got {len(pages)}"
    key = tuple(key[: n_pages * Z])
    node, pos = self.root, 0
    now = next(_clock)
    while pos < len(key):
      child = node.children.get(self._child_key(extra_key, key, pos))
      if child is None:
        leaf = Node(key[pos:], list(pages[pos // Z : n_pages]), node, extra_key)
        node.children[self._child_key(extra_key, key, pos)] = leaf
        self.evictable += len(leaf.pages)
        break
      n = self._common_pages(child.key, key, pos)
      if n < len(child.pages):
        child = self._split(child, n)
      child.last_access = now
      pos += n * Z
      node = child
    self.seconds += time.perf_counter() - t0
    return pos

  # ---- locks --------------------------------------------------------------------------------
  def lock(self, node: Node) -> None:
    """Pin node and its ancestors (a running request uses their pages)."""
    while node is not self.root:
      if node.lock_ref == 0:
        self.evictable -= len(node.pages)
        self.protected += len(node.pages)
      node.lock_ref += 1
      node = node.parent

  def unlock(self, node: Node) -> None:
    while node is not self.root:
      if node.lock_ref <= 0:
        raise RuntimeError(f"radix unlock of an unlocked node {node}: lock/unlock calls are unbalanced")
      node.lock_ref -= 1
      if node.lock_ref == 0:
        self.protected -= len(node.pages)
        self.evictable += len(node.pages)
      node = node.parent

  # ---- eviction -----------------------------------------------------------------------------
  def _leaves(self):
    stack, out = [self.root], []
    while stack:
      node = stack.pop()
      if not node.children and node is not self.root:
        out.append(node)
      stack.extend(node.children.values())
    return out

  def evict(self, num_pages: int) -> int:
    """Free at least num_pages pages (if that many are evictable), least recently used leaves
    first; a parent whose last child goes becomes a candidate. Returns pages freed."""
    t0 = time.perf_counter()
    heap = [(n.last_access, id(n), n) for n in self._leaves() if n.lock_ref == 0]
    heapq.heapify(heap)
    freed = 0
    while freed < num_pages and heap:
      _, _, node = heapq.heappop(heap)
      self.alloc.free(node.pages)
      freed += len(node.pages)
      self.evictable -= len(node.pages)
      parent = node.parent
      del parent.children[(node.extra_key, node.key[: self.page_size])]
      if parent is not self.root and not parent.children and parent.lock_ref == 0:
        heapq.heappush(heap, (parent.last_access, id(parent), parent))
    self.seconds += time.perf_counter() - t0
    return freed

  def reset(self) -> None:
    """Drop every unlocked cached prefix (e.g. on a weight swap when the caller wants the memory)."""
    self.evict(self.evictable)

  # ---- invariants ---------------------------------------------------------------------------
  def total_pages(self) -> int:
    stack, total = [self.root], 0
    while stack:
      node = stack.pop()
      total += len(node.pages)
      stack.extend(node.children.values())
    return total

  def check(self, private_pages: int = 0) -> None:
    """Assert the accounting invariant; private_pages = pages held by running requests outside
    the tree (0 at an idle point)."""
    stack, ev, pr = list(self.root.children.values()), 0, 0
    while stack:
      node = stack.pop()
      assert len(node.key) == len(node.pages) * self.page_size, f"edge/page mismatch at {node}"
      assert node.lock_ref >= 0 and all(c.lock_ref <= node.lock_ref for c in node.children.values()), (
        f"a child is locked more than its parent at {node}"
      )
      if node.lock_ref:
        pr += len(node.pages)
      else:
        ev += len(node.pages)
      stack.extend(node.children.values())
    assert (ev, pr) == (self.evictable, self.protected), (
      f"counters drifted: counted evictable={ev} protected={pr}, tracked {self.evictable}/{self.protected}"
    )
    total = self.alloc.num_free + ev + pr + private_pages
    assert total == self.alloc.total, (
      f"page leak: free {self.alloc.num_free} + evictable {ev} + protected {pr} + private {private_pages} "
      f"= {total} != total {self.alloc.total}"
    )
