"""Host-side allocator for the device KV page pool.

Page 0 is the null page: never handed out, it pads page tables and absorbs the writes of padding
tokens, so a step never needs a branch for "no page". Every other page has a reference count; a page
returns to the free list when its count drops to zero. Owners are the radix tree (cached prefixes)
and running requests (their private tail pages).

Shapes: the package legend in jaxllm/__init__.py (P: pages in the pool, the null page included).
"""

from __future__ import annotations

import numpy as np


class PageAllocator:
  def __init__(self, num_pages: int):
    """num_pages: usable pages, excluding the null page; ids run 1..num_pages."""
    if num_pages < 1:
      raise ValueError(f"page pool needs at least 1 usable page, got {num_pages}; raise serve num_pages")
    self.total = num_pages
    self.refcount = np.zeros(num_pages + 1, np.int32)  # [P], P = num_pages + 1
    # Pop from the end: low ids first keeps a small working set contiguous in the pool.
    self._free = list(range(num_pages, 0, -1))

  @property
  def num_free(self) -> int:
    return len(self._free)

  def alloc(self, n: int) -> list[int] | None:
    """n fresh pages with refcount 1, or None (nothing taken) if fewer than n are free."""
    if n > len(self._free):
      return None
    if n == 0:
      return []
    pages = self._free[-n:][::-1]
    del self._free[-n:]
    self.refcount[pages] = 1
    return pages

  def incref(self, pages) -> None:
    if len(pages):
      assert (self.refcount[pages] > 0).all(), f"incref of a free page in {list(pages)}"
      np.add.at(self.refcount, pages, 1)

  def free(self, pages) -> None:
    """Drop one reference from each page; pages that reach zero become free."""
    for p in pages:
      if p == 0:
        raise ValueError("the null page 0 is never allocated and cannot be freed")
      c = self.refcount[p]
      if c <= 0:
        raise ValueError(f"double free of page {p}")
      self.refcount[p] = c - 1
      if c == 1:
        self._free.append(int(p))
