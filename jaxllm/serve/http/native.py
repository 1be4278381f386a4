"""Engine events -> SGLang's native /generate responses (what RL rollout clients speak).

  {"text": completion text, "output_ids": [...],
   "meta_info": {"id", "prompt_tokens", "completion_tokens", "cached_tokens",
                 "finish_reason": {"type": "stop" | "length" | "abort"}, "weight_version",
                 "weight_versions": [the weights of each output id],
                 "output_token_logprobs": [[logprob, token id, null], ...]  (with return_logprob)}}

With sampling_params.n > 1 the response is a list of those, one per sample. Streamed, each
`data:` chunk holds the same object with everything generated so far (SGLang's cumulative
streaming: text and output_ids grow, a chunk never needs the previous ones) plus "index" = the
sample, then `data: [DONE]`.
"""

from __future__ import annotations

from jaxllm.serve.http.responses import SSE_DONE, Output, error_chunk, json_safe, new_id, sse


class Generate:
  def __init__(self, parsed):
    self.parsed = parsed
    self.ids = [new_id("gen") for _ in range(parsed.n)]

  def one(self, i: int, o: Output) -> dict:
    meta = {
      "id": self.ids[i],
      "prompt_tokens": o.prompt_tokens,
      "completion_tokens": len(o.token_ids),
      "cached_tokens": o.cached_tokens,
      "finish_reason": {"type": o.finish_reason} if o.finish_reason else None,
      "weight_version": json_safe(o.weight_version),
      "weight_versions": [json_safe(v) for v in o.weight_versions],  # per output id (tokens span swaps)
    }
    if self.parsed.logprobs:
      meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(o.logprobs, o.token_ids)]
    return {"text": o.text, "output_ids": list(o.token_ids), "meta_info": meta}

  def response(self, outputs: list[Output]):
    objs = [self.one(i, o) for i, o in enumerate(outputs)]
    return objs[0] if len(objs) == 1 else objs

  async def stream(self, events):
    outputs = [Output() for _ in range(self.parsed.n)]
    async for i, ev in events:
      outputs[i].add(ev)
      if ev.finish_reason == "error":
        yield sse(error_chunk(ev))
        continue
      yield sse(self.one(i, outputs[i]) | {"index": i})
    yield SSE_DONE
