"""Engine events -> SGLang's native /generate responses (what RL rollout clients speak).

  {"text": completion text, "output_ids": [...],
   "meta_info": {"id", "prompt_tokens", "completion_tokens", "cached_tokens",
                 "finish_reason": {"type": "stop" | "length" | "abort"}, "weight_version",
                 "weight_versions": [the weights of each output id],
                 "output_token_logprobs": [[logprob, token id, null], ...]  (with return_logprob),
                 "output_top_logprobs": [[[logprob, id, null], ...] per token]  (and top_logprobs_num),
                 "input_token_logprobs": [[null, id0, null], [logprob, id1, null], ...],
                 "input_top_logprobs": [null, [[logprob, id, null], ...], ...],
                 "prompt_weight_version"  (the last three with the prompt's log-probs)}}

SGLang's names and shapes (`meta_info` of its /generate). The prompt's log-probs (jaxllm.serve.score),
with return_prompt_logprob or SGLang's return_logprob + logprob_start_len >= 0 (from that position
on): each token's log-prob given those before it, null for the first, with the top_logprobs_num
likeliest alternatives per position; with max_new_tokens 0 nothing is generated (finish_reason
"length").

With sampling_params.n > 1, or a batch of prompts, the response is a list of those, one per sample,
prompt after prompt. Streamed, each
`data:` chunk holds the same object with everything generated so far (SGLang's cumulative
streaming: text and output_ids grow, a chunk never needs the previous ones) plus "index" = the
sample, then `data: [DONE]`.
"""

from __future__ import annotations

from jaxllm.serve.http.responses import SSE_DONE, Output, error_chunk, json_safe, new_id, sse


def _triples(pairs) -> list:
  return [[lp, t, None] for t, lp in pairs]


class Generate:
  def __init__(self, parsed):
    self.parsed = parsed
    self.ids = [new_id("gen") for _ in range(parsed.n)]
    self.scores = None  # each prompt's jaxllm.serve.score.PromptScore (its log-probs asked for)

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
      meta["output_token_logprobs"] = _triples(zip(o.token_ids, o.logprobs))
      if self.parsed.top_logprobs:
        meta["output_top_logprobs"] = [_triples(alts[: self.parsed.top_logprobs]) for alts in o.top_logprobs]
    if self.scores is not None:
      s, start = self.scores[i // self.parsed.per_prompt], self.parsed.logprob_start
      if o.weight_version is None:  # nothing generated: the scoring weights
        meta["weight_version"] = json_safe(s.weight_version)
      meta["input_token_logprobs"] = _triples(zip(s.token_ids[start:], s.logprobs[start:]))
      if self.parsed.prompt_logprobs > 0:
        meta["input_top_logprobs"] = [None if alts is None else _triples(alts) for alts in s.top[start:]]
      meta["prompt_weight_version"] = json_safe(s.weight_version)
    return {"text": o.text, "output_ids": list(o.token_ids), "meta_info": meta}

  def response(self, outputs: list[Output]):
    objs = [self.one(i, o) for i, o in enumerate(outputs)]
    return objs[0] if len(objs) == 1 and self.parsed.prompts is None else objs

  async def stream(self, events):
    outputs = [Output() for _ in range(self.parsed.n)]
    async for i, ev in events:
      outputs[i].add(ev)
      if ev.finish_reason == "error":
        yield sse(error_chunk(ev))
        continue
      yield sse(self.one(i, outputs[i]) | {"index": i})
    yield SSE_DONE
