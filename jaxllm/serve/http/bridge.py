"""The engine thread <-> asyncio: the engine requests of one HTTP request, as an async stream.

An HTTP request with n choices is n engine requests. Their events arrive on the engine thread and
are handed to the event loop with call_soon_threadsafe; the handler iterates them in the loop.

A client that goes away must not keep the engine busy: from submission until the handler is done,
a watcher task waits on the ASGI `receive` channel (the body was read already, so the next message
is `http.disconnect`) and aborts every unfinished request the moment it comes. The abort takes
effect at the engine's next step boundary. Leaving the handler any other way (an exception, a
cancelled streaming response) aborts them too (`close`).
"""

from __future__ import annotations

import asyncio
import functools

from jaxllm.serve.http.errors import APIError, bad_request
from jaxllm.serve.service import EngineDead, Event, QueueFull

RETRY_AFTER_S = 1  # Retry-After of a 503 (queue full): the queue drains in steps of seconds


class EngineCall:
  def __init__(self, service, receive):
    """`receive`: the request's ASGI receive channel (its body already read)."""
    self.service, self.receive = service, receive
    self.loop = asyncio.get_running_loop()
    self.queue: asyncio.Queue = asyncio.Queue()
    self.rids: list[int] = []
    self.unfinished: set[int] = set()  # choice indices without a final event yet
    self.aborted: set[int] = set()
    self.disconnected = False
    self._watcher: asyncio.Task | None = None

  def submit(self, prompt_ids, sampling: list, prompts: list | None = None, streaming: bool = False) -> "EngineCall":
    """Submit one engine request per choice (choice i's prompt: prompts[i], default prompt_ids). All
    or none: a failure aborts those already queued. streaming: the response is streamed (the engine
    then hands tokens over as they come)."""
    try:
      for i, sp in enumerate(sampling):
        prompt = prompt_ids if prompts is None else prompts[i]
        self.rids.append(self.service.submit(prompt, sp, functools.partial(self._deliver, i), streaming))
        self.unfinished.add(i)
    except QueueFull as e:
      self.abort()
      raise APIError(
        503, f"the server is busy ({e}); retry later", None, "queue_full", {"Retry-After": str(RETRY_AFTER_S)}
      ) from None
    except EngineDead as e:
      self.abort()
      raise APIError(503, f"the engine is not running: {e}", None, "engine_dead") from None
    except ValueError as e:  # the engine's check_request: a request that can never run
      self.abort()
      raise bad_request(str(e), None, "invalid_request") from None
    except BaseException:
      self.abort()
      raise
    self._watcher = self.loop.create_task(self._watch())
    return self

  def _deliver(self, index: int, ev: Event) -> None:
    """Engine thread: hand the event to the loop (asyncio objects are not thread-safe)."""
    self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, ev))

  async def _watch(self) -> None:
    while True:
      message = await self.receive()
      if message["type"] == "http.disconnect":
        break
    self.disconnected = True
    self.abort()
    self.queue.put_nowait(None)  # wake `events`: nobody is left to read the rest

  def abort(self) -> None:
    for i in self.unfinished - self.aborted:  # once each: the watcher and close may both get here
      self.service.abort(self.rids[i])
      self.aborted.add(i)

  async def events(self):
    """(choice index, Event) until every choice has finished or the client has gone."""
    while self.unfinished:
      item = await self.queue.get()
      if item is None:
        return
      index, ev = item
      if ev.finish_reason is not None:
        self.unfinished.discard(index)
      yield index, ev

  def close(self) -> None:
    """The handler is done with these requests: stop watching, abort what is still running."""
    if self._watcher is not None:
      self._watcher.cancel()
      self._watcher = None
    self.abort()


class PromptOnly:
  """The EngineCall of a request that generates nothing (max_tokens 0: its prompt is only echoed or
  scored): every choice finishes at once with 'length' and no tokens."""

  def __init__(self, prompts: list):
    """`prompts`: each choice's prompt ids."""
    self.prompts = prompts

  async def events(self):
    for i, p in enumerate(self.prompts):
      yield i, Event(i, [], "", [], [], "length", prompt_tokens=len(p))

  def close(self) -> None:
    pass
