"""Continuous batching over the page pool and the radix cache (SGLang's scheduler, simplified).

Every step the scheduler picks a list of (request, n tokens to compute):
- running requests first, oldest first: a decoding request computes its last sampled token (n = 1);
  a request still in prefill takes its next chunk under the step's token budget `chunk_size`
  (chunked prefill, Sarathi-Serve / SGLang). Decode rows count against the budget too (vLLM's
  max_num_batched_tokens), so a mixed step fills exactly the chunk_size bucket instead of spilling
  into the next power of two;
- then new requests from the waiting queue, in policy order, while budget, running slots and pages
  last. Admission matches the prompt in the radix tree and only computes the uncached rest.

Admission control (SGLang's PrefillAdder): a request is admitted only if every page it may still
need -- its uncached prompt AND an estimate of its decode -- fits in the free plus evictable pages
left after the running requests' own outstanding estimates. The estimate of a request is
`decode_reserve` x min(its max_tokens still to generate, `reserve_clip`) tokens, re-taken every step
from its current length (SGLang: new_token_ratio x min(max_new_tokens - generated,
SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION)). The clip is what lets chat requests without max_tokens (whose
max_tokens is the whole remaining context) run together: unclipped, each reserves the whole context
and a 16k-token pool runs 8 of them at a 2k context. Requests whose max_tokens is within the clip
reserve all of it (with decode_reserve = 1) and are preempted last (see Preemption); `reserve_clip` =
0 (no clip) with `decode_reserve` = 1 is the old never-preempt admission. `decode_reserve` < 1 is SGLang's optimistic
new_token_ratio (requests often stop early).
Worst case: every admitted request runs far past its estimate (e.g. all run to a long max_tokens).
Then the pool runs out mid-decode and the newest running requests on a short estimate are
preempted, one at a time, until the rest fit; a preempted request comes back only with all of its remaining max_tokens
reserved. So a request is, in practice, preempted for pages once (see Preemption) and recomputes its
prompt and the tokens it had generated (less what the radix cache still holds), after which the
batch runs what full reservation would run. Any one request fits the pool (Engine.check_request),
so every request finishes.
Without any reservation (decode_reserve = 0) the scheduler admits whatever the prefill chunk fits and
under a memory limit that cost fcfs and dfs-weight a third of their hit rate (shared prefixes evicted).
The first waiting request that does not fit stops admission (no overtaking). With every running slot
taken, no token budget or no page left, the waiting queue is not ordered at all: nothing could be
admitted.

No starvation: lpm and dfs-weight reorder the queue every step, so a request with no cached prefix
could wait behind an endless stream of requests that hit. A request that has waited `max_wait_s`
goes to the front (oldest first), whatever the policy.

Weight versions (RL): the radix key includes the weights, bound when a request is admitted
(`namespace`), never when it is queued; `set_version` preempts running requests so their KV is
recomputed with the new weights. Nothing computed by old weights is matched again: the namespace is
(a counter of set_version calls, version), so weights that come back under an earlier version name
(v1 -> v2 -> v1) do not match the KV the first v1 computed.

Policies: `fcfs`; `lpm` (longest cached prefix first); `dfs-weight` (walk the tree visiting the
subtree with more waiting requests first, each node's requests after its subtree's, SGLang sec. 4:
on the offline problem this equals the optimal DFS order; requests with no cached prefix come last).
Both fall back to fcfs for queues longer than `policy_max_queue`, where matching every prompt each
step would cost more than it saves.

Prefix dedup inside a batch: a request whose prompt shares at least one more page with a request
still in prefill than it has in the tree waits; once that request's prefix is inserted (after each of
its chunks) the waiting one matches it instead of computing it again.

Preemption: when a running request needs a page and none can be freed by evicting the tree, the
newest running request whose reservation may fall short (clipped, or decode_reserve < 1) is
preempted (the newest of all when none is): its computed pages go to the tree (or are freed), it
rejoins the front of the queue with its prompt and generated tokens, and is recomputed
later. From then on it reserves all it may still generate (no clip, no decode_reserve): it is
readmitted only when that fits, and preempted for pages again only when no request on a short
estimate is left to preempt. Nothing is lost.

Shapes: the package legend in jaxllm/__init__.py (R, Z); host-side lists, counted in pages of Z tokens.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field

from jaxllm.serve.pages import PageAllocator
from jaxllm.serve.radix import Node, RadixCache
from jaxllm.serve.sampling import SamplingParams

POLICIES = ("fcfs", "lpm", "dfs-weight")
_order = itertools.count()


@dataclass
class Stats:
  """Monotonic counters (exported as Prometheus counters by the server)."""

  prompt_tokens: int = 0  # prompt tokens of admitted requests (first admission only)
  cached_tokens: int = 0  # of those, reused from the radix cache
  generated_tokens: int = 0  # tokens sampled and kept
  computed_tokens: int = 0  # tokens run through the model in prefill chunks (recompute included)
  preemptions: int = 0
  finished: dict = field(default_factory=dict)  # finish reason ('stop', 'length', 'abort') -> requests


@dataclass(eq=False)
class Req:
  rid: int
  prompt: list
  sp: SamplingParams
  extra_key: object = None  # the weight version (user's name), bound at admission
  namespace: object = None  # radix key namespace: (weights generation, version), bound at admission
  arrival: float = 0.0  # time.perf_counter() when queued
  admitted: float | None = None  # first admission time (queue time = admitted - arrival)
  queued: float = 0.0  # time.perf_counter() when the scheduler got it (for max_wait_s)
  output: list = field(default_factory=list)
  logprobs: list = field(default_factory=list)
  top_logprobs: list = field(default_factory=list)  # per token: [(id, logprob)] * sp.top_logprobs
  pages: list = field(default_factory=list)  # page ids for tokens [0, num_computed + scheduled)
  num_computed: int = 0  # tokens whose K/V are in `pages`
  cached_len: int = 0  # leading tokens whose pages the tree owns (locked via `node`)
  node: Node | None = None
  order: int = 0  # admission counter (newest is preempted first)
  cache_hit: int = 0  # prompt tokens reused from the tree (first admission)
  computed: int = 0  # tokens computed in prefill, recompute included
  preemptions: int = 0
  reserve_all: bool = False  # preempted for lack of pages: reserves all it may still generate from now on
  finish_reason: str | None = None
  token_times: list = field(default_factory=list)
  stream: object = None  # jaxllm.serve.detok.TextStream when the engine detokenizes
  streaming: bool = False  # a client reads the tokens as they come (the engine avoids multi-step bursts)

  @property
  def tokens(self) -> list:
    return self.prompt + self.output

  def token_slice(self, a: int, b: int) -> list:
    """(prompt + output)[a:b] without building the whole list."""
    P = len(self.prompt)
    if b <= P:
      return self.prompt[a:b]
    if a >= P:
      return self.output[a - P : b - P]
    return self.prompt[a:] + self.output[: b - P]

  @property
  def remaining(self) -> int:
    return len(self.prompt) + len(self.output) - self.num_computed

  @property
  def prefilling(self) -> bool:
    return self.num_computed < len(self.prompt)


def _top(ids, logprobs, n: int) -> list:
  """The n most likely alternatives of one sampled token: [(id, logprob)]."""
  return [(int(i), float(lp)) for i, lp in zip(ids[:n], logprobs[:n])]


def _lcp(a, b) -> int:
  n = min(len(a), len(b))
  i = 0
  while i < n and a[i] == b[i]:
    i += 1
  return i


class Scheduler:
  def __init__(
    self,
    num_pages: int,
    page_size: int,
    *,
    max_running: int = 32,
    chunk_size: int = 256,
    policy: str = "lpm",
    radix: bool = True,
    policy_max_queue: int = 128,
    decode_reserve: float = 1.0,
    reserve_clip: int = 256,
    max_wait_s: float = 30.0,
  ):
    if policy not in POLICIES:
      raise ValueError(f"unknown scheduling policy {policy!r}; use one of {POLICIES}")
    if chunk_size < 1 or max_running < 1:
      raise ValueError(f"chunk_size={chunk_size} and max_running={max_running} must be >= 1")
    if not 0 <= decode_reserve <= 1:
      raise ValueError(f"decode_reserve={decode_reserve} must be in [0, 1] (fraction of max_tokens reserved)")
    if reserve_clip < 0:
      raise ValueError(f"reserve_clip={reserve_clip} must be >= 0 tokens (0 = no clip)")
    self.decode_reserve, self.reserve_clip = decode_reserve, reserve_clip
    self.page_size, self.max_running, self.chunk_size = page_size, max_running, chunk_size
    self.policy, self.radix_on, self.policy_max_queue = policy, radix, policy_max_queue
    self.alloc = PageAllocator(num_pages)
    self.tree = RadixCache(self.alloc, page_size)
    self.max_wait_s = max_wait_s
    self.waiting: list[Req] = []
    self.running: list[Req] = []
    self.version = None  # weight version of the requests admitted from now on (reported with their tokens)
    self.generation = 0  # set_version calls so far: with the version, the radix namespace
    self.stats = Stats()

  @property
  def namespace(self) -> tuple:
    """The radix namespace of requests admitted now: a fresh one per set_version."""
    return (self.generation, self.version)

  @classmethod
  def from_config(cls, sc) -> "Scheduler":
    """The scheduler a ServeConfig describes (what Engine builds)."""
    return cls(
      sc.max_pages or sc.num_pages,
      sc.page_size,
      max_running=sc.max_running,
      chunk_size=sc.chunk_size,
      policy=sc.policy,
      radix=sc.radix,
      decode_reserve=sc.decode_reserve,
      reserve_clip=sc.reserve_clip,
      max_wait_s=sc.max_wait_s,
    )

  @property
  def num_preemptions(self) -> int:
    return self.stats.preemptions

  # ---- pages --------------------------------------------------------------------------------
  def _alloc(self, n: int) -> list | None:
    pages = self.alloc.alloc(n)
    if pages is None and self.radix_on:
      self.tree.evict(n - self.alloc.num_free)
      pages = self.alloc.alloc(n)
    return pages

  def _grow(self, req: Req, n_tokens: int) -> bool:
    need = -(-(req.num_computed + n_tokens) // self.page_size) - len(req.pages)
    if need <= 0:
      return True
    pages = self._alloc(need)
    if pages is None:
      return False
    req.pages += pages
    return True

  def _future_pages(self, req: Req) -> int:
    """Pages req may still allocate by the estimate: KV for its prompt and output so far, plus
    decode_reserve x min(tokens still to generate, reserve_clip) (the last sampled token is never
    fed back, hence - 1)."""
    have, left = len(req.prompt) + len(req.output), req.sp.max_tokens - len(req.output)
    if req.reserve_all:  # its estimate was wrong once: no second guess
      return max(0, -(-(have + left - 1) // self.page_size) - len(req.pages))
    if self.reserve_clip:
      left = min(left, self.reserve_clip)
    end = max(have + math.ceil(left * self.decode_reserve) - 1, have)
    return max(0, -(-end // self.page_size) - len(req.pages))

  def private_pages(self) -> int:
    return sum(len(r.pages) - r.cached_len // self.page_size for r in self.running)

  # ---- radix interplay ------------------------------------------------------------------------
  def _release(self, req: Req) -> None:
    """Give a leaving request's pages back: computed whole pages to the tree, the rest freed."""
    if not self.radix_on:
      self.alloc.free(req.pages)
    else:
      Z = self.page_size
      n_full = req.num_computed // Z
      prev = self.tree.insert(req.tokens[: n_full * Z], req.pages[:n_full], req.namespace)
      self.alloc.free(req.pages[req.cached_len // Z : prev // Z])  # duplicates of cached pages
      self.alloc.free(req.pages[n_full:])
      self.tree.unlock(req.node)
    req.pages, req.node, req.cached_len, req.num_computed = [], None, 0, 0

  def cache_prefix(self, req: Req) -> None:
    """Insert a running request's computed whole pages (SGLang cache_unfinished_req) so others
    can match them now; swap its duplicate pages for the tree's and move its lock down."""
    Z = self.page_size
    n_full = req.num_computed // Z
    if not self.radix_on or n_full * Z <= req.cached_len:
      return
    key = req.tokens[: n_full * Z]
    prev = self.tree.insert(key, req.pages[:n_full], req.namespace)
    pages, node = self.tree.match_prefix(key, req.namespace)
    assert len(pages) == n_full, "radix: a just-inserted prefix must match in full"
    self.alloc.free(req.pages[req.cached_len // Z : prev // Z])
    req.pages[:n_full] = pages
    self.tree.lock(node)
    self.tree.unlock(req.node)
    req.node, req.cached_len = node, n_full * Z

  # ---- queue --------------------------------------------------------------------------------
  def add(self, req: Req) -> None:
    req.queued = time.perf_counter()
    self.waiting.append(req)

  def abort(self, req: Req, reason: str = "abort") -> None:
    """Take a request out wherever it is; a running one's computed prefix goes to the tree. Counted
    under `reason` ('error' when the service fails it)."""
    if req in self.waiting:
      self.waiting.remove(req)
    elif req in self.running:
      self.running.remove(req)
      self._release(req)
    self._count(req, reason)

  def set_version(self, version) -> None:
    """New weights: later admissions use `version`; running requests are preempted (requeued at
    the front, recomputed under the new weights). Each call opens a fresh radix namespace, even
    for a version name used before."""
    self.version = version
    self.generation += 1
    for req in sorted(self.running, key=lambda r: -r.order):
      self._preempt(req)

  def flush(self) -> None:
    """Drop every unlocked cached prefix."""
    if self.radix_on:
      self.tree.reset()

  def _ordered_waiting(self) -> list[Req]:
    now = time.perf_counter()
    overdue = [r for r in self.waiting if now - r.queued >= self.max_wait_s]
    if overdue:  # no starvation: the long-waiting go first, oldest first
      rest = [r for r in self._policy_order() if now - r.queued < self.max_wait_s]
      return sorted(overdue, key=lambda r: r.queued) + rest
    return self._policy_order()

  def _policy_order(self) -> list[Req]:
    if self.policy == "fcfs" or not self.radix_on or len(self.waiting) > self.policy_max_queue:
      return list(self.waiting)
    t = self.tree
    matches = [t.prefix_len(r.tokens[:-1], self.namespace) for r in self.waiting]
    if self.policy == "lpm":
      order = sorted(range(len(self.waiting)), key=lambda i: -matches[i][0])
      return [self.waiting[i] for i in order]
    # dfs-weight: weight(node) = waiting requests at or below it; visit heavier children first.
    weight, at = {}, {}
    for r, (_, node) in zip(self.waiting, matches):
      at.setdefault(id(node), []).append(r)
      while node is not None:
        weight[id(node)] = weight.get(id(node), 0) + 1
        node = node.parent
    # Post-order (SGLang get_dfs_priority): a node's own requests after its subtree's, so the
    # root's (no cached prefix) come last instead of crowding out the requests that hit.
    out, stack = [], [(t.root, False)]
    while stack:
      node, visited = stack.pop()
      if visited:
        out += at.get(id(node), [])
        continue
      stack.append((node, True))
      kids = [c for c in node.children.values() if id(c) in weight]
      stack += [(c, False) for c in sorted(kids, key=lambda c: weight[id(c)])]  # heaviest popped first
    return out

  def _short(self, req: Req) -> bool:
    """Whether req's reservation may fall short of what it generates (clipped or decode_reserve < 1)."""
    if req.reserve_all:
      return False
    left = req.sp.max_tokens - len(req.output)
    return self.decode_reserve < 1 or (self.reserve_clip and left > self.reserve_clip)

  def _victim(self) -> Req:
    """The running request to preempt for pages: the newest one on a short estimate; requests whose
    reservation covers all they may generate go only when no such one is left."""
    return max(self.running, key=lambda r: (self._short(r), r.order))

  def _preempt(self, req: Req, for_pages: bool = False) -> None:
    req.reserve_all |= for_pages
    self.running.remove(req)
    self._release(req)
    req.preemptions += 1
    self.stats.preemptions += 1
    self.waiting.insert(0, req)

  # ---- one step -----------------------------------------------------------------------------
  def schedule(self) -> list[tuple[Req, int]]:
    batch, budget = [], self.chunk_size
    for req in sorted(self.running, key=lambda r: r.order):
      if req not in self.running:  # preempted earlier in this loop
        continue
      n = 1 if req.remaining == 1 else min(req.remaining, max(budget, 0))
      if n == 0:
        continue
      while not self._grow(req, n):
        self._preempt(self._victim(), for_pages=True)
        if req not in self.running:
          break
      else:
        batch.append((req, n))
        budget -= n  # decode rows too: chunk_size bounds the step's tokens
    if not self.waiting or budget <= 0 or len(self.running) >= self.max_running:
      return batch  # nothing can be admitted: do not order the queue (lpm matches every prompt)
    reserved = sum(self._future_pages(r) for r in self.running)
    if self.alloc.num_free + (self.tree.evictable if self.radix_on else 0) - reserved < 1:
      return batch  # every admission needs >= 1 new page: none fits, so do not order either
    prefilling = [r for r in self.running if r.prefilling]
    for req in self._ordered_waiting():
      if budget <= 0 or len(self.running) >= self.max_running:
        break
      verdict = self._admit(req, budget, prefilling, reserved)
      if verdict == "full":  # out of pages: admit nobody else this step
        break
      if verdict == "wait":
        continue
      n = min(req.remaining, budget)
      batch.append((req, n))
      budget -= n
      prefilling.append(req)
      reserved += self._future_pages(req)
    return batch

  def _admit(self, req: Req, budget: int, prefilling: list, reserved: int) -> str:
    """'ok' (req now running), 'wait' (in-batch prefix dedup) or 'full' (its pages do not fit
    beside the running requests' reservations)."""
    Z = self.page_size
    tokens = req.tokens
    pages, node = ([], self.tree.root)
    if self.radix_on:
      pages, node = self.tree.match_prefix(tokens[:-1], self.namespace)
      cached = len(pages) * Z
      for other in prefilling:
        if other.namespace == self.namespace and _lcp(tokens, other.prompt) // Z * Z >= cached + Z:
          return "wait"  # `other` is computing our prefix right now
      self.tree.lock(node)  # before counting: our prefix is no longer evictable
    n = min(len(tokens) - len(pages) * Z, budget)
    n_pages = -(-(len(pages) * Z + n) // Z) - len(pages)
    req.pages = pages  # so _future_pages counts the matched prefix as held
    need = max(n_pages, self._future_pages(req))
    avail = self.alloc.num_free + (self.tree.evictable if self.radix_on else 0) - reserved
    new = self._alloc(n_pages) if need <= avail else None
    req.pages = []
    if new is None:
      if self.radix_on:
        self.tree.unlock(node)
      return "full"
    self.waiting.remove(req)
    req.extra_key, req.namespace = self.version, self.namespace
    req.pages, req.node = pages + new, (node if self.radix_on else None)
    req.num_computed = req.cached_len = len(pages) * Z
    if req.preemptions == 0:
      req.cache_hit = req.cached_len
      req.admitted = time.perf_counter()
      self.stats.prompt_tokens += len(req.prompt)
      self.stats.cached_tokens += req.cached_len
    req.order = next(_order)
    self.running.append(req)
    return "ok"

  def commit(self, batch, tokens, logprobs, now: float, top=None) -> list[Req]:
    """Book a step's results: advance each request, cache finished prefill pages, append the
    sampled token of each request that reached its end, retire finished ones (returned)."""
    done = []
    for i, (r, n) in enumerate(batch):
      was_prefill = r.prefilling
      r.num_computed += n
      if was_prefill or n > 1:
        r.computed += n
        self.stats.computed_tokens += n
        self.cache_prefix(r)
      if r.remaining:  # mid-prefill chunk: nothing sampled yet
        continue
      r.output.append(int(tokens[i]))
      self.stats.generated_tokens += 1
      if r.sp.logprobs:
        r.logprobs.append(float(logprobs[i]))
      if r.sp.top_logprobs and top is not None:
        r.top_logprobs.append(_top(top[0][i], top[1][i], r.sp.top_logprobs))
      r.token_times.append(now)
      r.finish_reason = self._finish_reason(r)
      if r.finish_reason:
        self.finish(r)
        done.append(r)
    return done

  def grow_decode(self, batch, steps: int, ahead=None) -> list[int]:
    """Multi-step decode: allocate each decoding request's pages for its next k <= steps tokens
    (never past max_tokens); returns the k of each. ahead[i]: tokens row i has in flight, not yet
    committed (overlap), that come first. schedule() already holds the pages of one token, so a row
    whose pages cannot grow keeps the steps its held pages cover (>= 1 unless tokens are in flight)."""
    ks = []
    for i, (r, _) in enumerate(batch):
      a = ahead[i] if ahead else 0
      k = max(1, min(steps, r.sp.max_tokens - len(r.output) - a))
      if not self._grow(r, a + k):
        k = len(r.pages) * self.page_size - r.num_computed - a
      ks.append(k)
    return ks

  def commit_multi(self, batch, ks, tokens, logprobs, now: float, top=None) -> list[Req]:
    """Book a multi-step decode: tokens/logprobs [steps, R]; row i ran ks[i] steps. Tokens are taken
    in order until a stop condition, the rest discarded (their K/V lies past num_computed)."""
    done = []
    for i, (r, _) in enumerate(batch):
      for j in range(ks[i]):
        r.num_computed += 1  # the token fed at step j now has its K/V cached
        r.output.append(int(tokens[j, i]))
        self.stats.generated_tokens += 1
        if r.sp.logprobs:
          r.logprobs.append(float(logprobs[j, i]))
        if r.sp.top_logprobs and top is not None:
          r.top_logprobs.append(_top(top[0][j, i], top[1][j, i], r.sp.top_logprobs))
        r.token_times.append(now)
        r.finish_reason = self._finish_reason(r)
        if r.finish_reason:
          self.finish(r)
          done.append(r)
          break
    return done

  @staticmethod
  def _finish_reason(r: Req) -> str | None:
    """'stop' (a stop token, or a stop string in the text), 'length' (max_tokens), or None. The new
    token goes through the request's TextStream (incremental: no re-decoding of the whole output);
    a stop token's own text is not part of the output (OpenAI)."""
    tok, sp = r.output[-1], r.sp
    if tok in sp.stop_token_ids and len(r.output) > getattr(sp, "min_tokens", 0):
      if r.stream is not None and getattr(sp, "include_stop_str_in_output", False):
        r.stream.push([tok])  # vLLM: the stop token's text too (none for a skipped special token)
      return "stop"
    if r.stream is not None:
      r.stream.push([tok])
      if r.stream.stopped:
        return "stop"
    return "length" if len(r.output) >= sp.max_tokens else None

  def finish(self, req: Req) -> None:
    self.running.remove(req)
    self._release(req)
    if req.stream is not None:
      req.stream.finish()  # emit text held back for a stop string that never came
    self._count(req, req.finish_reason)

  def _count(self, req: Req, reason: str) -> None:
    self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1

  def check(self) -> None:
    """The page-accounting invariant (holds between steps, with requests running or not)."""
    if self.radix_on:
      self.tree.check(self.private_pages())
    else:
      used = sum(len(r.pages) for r in self.running)
      assert self.alloc.num_free + used == self.alloc.total, (
        f"page leak: free {self.alloc.num_free} + used {used} != total {self.alloc.total}"
      )
