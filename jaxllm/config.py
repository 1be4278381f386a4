"""Typed, frozen run configuration: model, mesh, training and serving.

Configs come from named presets, a TOML file (sections [model], [mesh], [train], [serve]) and `key=value`
overrides on the command line (`model=tiny-moe model.n_layers=2 mesh.tp=2 train.steps=50`).
Unknown keys, wrong types and impossible combinations are errors that name the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
import typing
from dataclasses import dataclass, field, fields, replace


class ConfigError(ValueError):
  """A configuration the user must fix; the message says what and how."""


# model.remat: what each layer keeps for its backward (jax.checkpoint policies; the rest is recomputed).
#   none                     everything (no recompute)
#   full                     only the layer input (recompute the whole layer; in a pipeline, each chunk's input)
#   dots                     the matmul outputs without batch dims: the weight projections, not the attention
#                            scores (jax's dots_with_no_batch_dims_saveable)
#   dots_with_no_batch_dims  the same as dots, by its jax name
#   dots_saveable            every matmul output, with model.attention=xla the scores [B, N, T, T] too
#                            (jax's dots_saveable)
#   offload                  like dots, but kept in pinned host memory instead of the accelerator's
#                            (offload_dot_with_no_batch_dims: device -> pinned_host)
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims", "dots_saveable", "offload")
# model.attention: the training-attention implementations (jaxllm.model.attention): xla is naive (memory
# quadratic in T), flash blockwise (linear), cudnn GPU-only, splash TPU-only; auto picks per backend.
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "flash", "cudnn", "splash")


@dataclass(frozen=True)
class ModelConfig:
  """A Llama/Qwen-family decoder; MoE when `n_experts > 0` (every layer is then MoE)."""

  name: str = "custom"  # preset name, for logs
  vocab_size: int = 512  # token ids 0..vocab_size-1 (>= tokenizer vocab; padded for sharding)
  d_model: int = 128  # D, residual width
  n_layers: int = 4  # L, transformer blocks
  n_heads: int = 4  # N, query heads
  n_kv_heads: int = 2  # K, key/value heads (GQA when K < N)
  head_dim: int = 0  # H, per-head width; 0 means d_model // n_heads
  d_ff: int = 384  # F, SwiGLU hidden width of the dense MLP
  n_experts: int = 0  # E, routed experts; 0 means a dense MLP
  n_experts_per_tok: int = 2  # top-k experts per token
  moe_d_ff: int = 0  # hidden width of each expert; 0 means d_ff
  moe_renormalize: bool = True  # renormalise the top-k router probs to sum to 1 (Mixtral/Qwen3: norm_topk_prob)
  shared_expert_d_ff: int = 0  # width of an always-on shared expert (Qwen2-MoE); 0 means none
  shared_expert_gate: bool = False  # scale the shared expert by sigmoid(x @ w) (Qwen2-MoE)
  aux_loss_coef: float = 0.01  # load-balancing loss weight (Switch Transformer)
  z_loss_coef: float = 0.001  # router z-loss weight (ST-MoE)
  rope_theta: float = 10000.0  # RoPE base
  rope_scaling: str = "none"  # "none" or "llama3" (Llama 3.1+ frequency scaling)
  rope_factor: float = 8.0  # llama3 scaling: factor
  rope_low_freq_factor: float = 1.0  # llama3 scaling: low_freq_factor
  rope_high_freq_factor: float = 4.0  # llama3 scaling: high_freq_factor
  rope_original_max_pos: int = 8192  # llama3 scaling: original_max_position_embeddings
  max_seq_len: int = 2048  # longest sequence the model is meant for (cache sizing)
  norm_eps: float = 1e-5  # RMSNorm epsilon
  qkv_bias: bool = False  # biases on q/k/v projections (Qwen2)
  qk_norm: bool = False  # RMSNorm on each q and k head (Qwen3)
  tie_embeddings: bool = False  # output head reuses the embedding matrix
  init_std: float = 0.02  # normal init std of weight matrices
  dtype: str = "float32"  # compute dtype: "float32" or "bfloat16"
  param_dtype: str = "float32"  # storage dtype of parameters (fp32 master weights with bf16 compute)
  remat: str = "none"  # kept for backward: "none", "full", "dots", "dots_saveable", "offload" (docs/training.md)
  attention: str = "auto"  # training attention: "xla" (naive), "flash" (blockwise), "cudnn", "splash" or "auto"
  scan_unroll: int = 0  # layers per iteration of the layer scan; 0 = auto (all on CPU training without remat, else 1)
  loss_chunk: int = 1024  # LM and RL losses: positions per chunk of fp32 [B, chunk, V] logits at once; 0 = all
  batch_invariant: bool = False  # forward rows independent of the batch (jaxllm.model.invariant); dense models

  def __post_init__(self):
    _positive(self, "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff")
    if self.head_dim == 0 and self.d_model % self.n_heads:
      raise ConfigError(
        f"model.n_heads={self.n_heads} does not divide model.d_model={self.d_model}; "
        f"pick n_heads among {_divisors(self.d_model)} or set model.head_dim explicitly"
      )
    if self.n_heads % self.n_kv_heads:
      raise ConfigError(
        f"model.n_kv_heads={self.n_kv_heads} must divide model.n_heads={self.n_heads} "
        f"(GQA groups); use one of {_divisors(self.n_heads)}"
      )
    if self.n_experts < 0 or (self.n_experts and not 1 <= self.n_experts_per_tok <= self.n_experts):
      raise ConfigError(f"model.n_experts_per_tok={self.n_experts_per_tok} must be in 1..n_experts={self.n_experts}")
    if self.rope_scaling not in ("none", "llama3"):
      raise ConfigError(f"model.rope_scaling={self.rope_scaling!r}: use 'none' or 'llama3'")
    if self.remat not in REMAT_POLICIES:
      raise ConfigError(f"model.remat={self.remat!r}: use one of {', '.join(REMAT_POLICIES)}")
    if self.attention not in ATTENTION_IMPLEMENTATIONS:
      raise ConfigError(
        f"model.attention={self.attention!r}: use one of {', '.join(ATTENTION_IMPLEMENTATIONS)} "
        "('auto' = cudnn on GPU, splash on TPU, flash otherwise)"
      )
    if self.batch_invariant and self.is_moe:
      raise ConfigError(
        "model.batch_invariant=true needs a dense model: a MoE's routing capacity depends on the other "
        "tokens of the batch; turn it off for MoE models"
      )
    if self.scan_unroll < 0 or self.loss_chunk < 0:
      raise ConfigError(
        f"model.scan_unroll={self.scan_unroll} and model.loss_chunk={self.loss_chunk} must be >= 0 "
        "(scan_unroll 0 = auto; loss_chunk 0 = the loss over whole sequences)"
      )
    for key in ("dtype", "param_dtype"):
      if getattr(self, key) not in ("float32", "bfloat16"):
        raise ConfigError(f"model.{key}={getattr(self, key)!r}: use 'float32' or 'bfloat16'")
    if self.resolved_head_dim % 2:
      raise ConfigError(f"head dim {self.resolved_head_dim} must be even for RoPE")

  @property
  def resolved_head_dim(self) -> int:
    """H: the head_dim field, or d_model // n_heads where it is 0."""
    return self.head_dim or self.d_model // self.n_heads

  @property
  def is_moe(self) -> bool:
    return self.n_experts > 0

  @property
  def resolved_moe_d_ff(self) -> int:
    """Hidden width of each routed expert: the moe_d_ff field, or d_ff where it is 0."""
    return self.moe_d_ff or self.d_ff

  def param_counts(self) -> dict[str, int]:
    """Exact parameter counts: 'total' and 'active' (per token; experts counted top-k times)."""
    D, H, N, K, L = self.d_model, self.resolved_head_dim, self.n_heads, self.n_kv_heads, self.n_layers
    attn = D * H * (N + 2 * K) + N * H * D + (H * (N + 2 * K) if self.qkv_bias else 0)
    attn += 2 * H if self.qk_norm else 0
    norms = 2 * D
    if self.is_moe:
      expert = 3 * D * self.resolved_moe_d_ff
      shared = 3 * D * self.shared_expert_d_ff + (D if self.shared_expert_gate else 0)
      router = D * self.n_experts
      mlp_total = router + self.n_experts * expert + shared
      mlp_active = router + self.n_experts_per_tok * expert + shared
    else:
      mlp_total = mlp_active = 3 * D * self.d_ff
    embed = self.vocab_size * D * (1 if self.tie_embeddings else 2)
    total = L * (attn + norms + mlp_total) + embed + D
    active = L * (attn + norms + mlp_active) + embed + D
    return {"total": total, "active": active}

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token: 6 * active non-embedding-lookup params + causal attention (PaLM app. B)."""
    active = self.param_counts()["active"] - self.vocab_size * self.d_model * (0 if self.tie_embeddings else 1)
    attention = 12 * self.n_layers * self.n_heads * self.resolved_head_dim * seq_len / 2  # causal: half the scores
    return 6.0 * active + attention


@dataclass(frozen=True)
class MeshConfig:
  """Device mesh sizes. Attention uses dp x tp per stage, MoE uses edp x ep x etp on the same devices."""

  name: str = "custom"  # preset name, for logs
  device: str = "cpu"  # device kind the preset is for: "cpu", "gpu" or "tpu" (any: whatever jax has)
  pp: int = 1  # pipeline stages
  vpp: int = 1  # virtual stages (layer chunks) per pipeline stage, Megatron interleaving
  dp: int = 1  # data parallel replicas of the attention/dense part
  fsdp: int = 1  # of the dp ways, how many also shard params, grads and Adam state (ZeRO-3 / FSDP; divides dp)
  tp: int = 1  # tensor parallel ways of attention/dense MLP/vocab
  ep: int = 1  # expert parallel ways (may span tp devices: MoE Parallel Folding)
  etp: int = 1  # tensor parallel ways inside each expert (shards the expert hidden dim)
  microbatches: int = 1  # pipeline microbatches m per step (pp > 1 only; needs m >= pp)
  schedule: str = "1f1b"  # pipeline order: "1f1b" (Megatron's interleaved, memory flat in m) or "gpipe"
  dcn_pp: int = 1  # of the pp ways, how many cross hosts/slices (the slow network, DCN); divides pp
  dcn_dp: int = 1  # of the dp ways, how many cross hosts/slices (outermost dp ways); divides dp; tp/ep/etp never cross

  def __post_init__(self):
    _positive(self, "pp", "vpp", "dp", "fsdp", "tp", "ep", "etp", "microbatches")
    check_pipeline(self.pp, self.vpp, self.microbatches)
    if self.schedule not in ("1f1b", "gpipe"):
      raise ConfigError(
        f'mesh.schedule={self.schedule!r} is not a pipeline schedule; use "1f1b" (activation '
        'memory bounded by ~2*pp*vpp chunk inputs) or "gpipe" (all forwards, then all backwards)'
      )
    if self.dp % self.fsdp:
      raise ConfigError(
        f"mesh.fsdp={self.fsdp} must divide mesh.dp={self.dp} (FSDP shards the parameters over "
        f"that many of the data-parallel devices); divisors of dp: {_divisors(self.dp)}"
      )
    per_stage = self.dp * self.tp
    if per_stage % (self.ep * self.etp):
      ok = [(e, t) for e in _divisors(per_stage) for t in _divisors(per_stage // e)]
      raise ConfigError(
        f"mesh.ep * mesh.etp = {self.ep}*{self.etp} must divide dp*tp = {per_stage} "
        f"(the MoE layers fold onto the same devices); (ep, etp) that work: {ok}"
      )
    _positive(self, "dcn_pp", "dcn_dp")
    for key, of in (("dcn_pp", "pp"), ("dcn_dp", "dp")):
      if getattr(self, of) % getattr(self, key):
        raise ConfigError(
          f"mesh.{key}={getattr(self, key)} must divide mesh.{of}={getattr(self, of)} (it is how many "
          f"of the {of} ways sit on different hosts/slices); use one of {_divisors(getattr(self, of))}"
        )

  @property
  def edp(self) -> int:
    """Expert data parallel size, derived: dp*tp == edp*ep*etp."""
    return self.dp * self.tp // (self.ep * self.etp)

  @property
  def num_devices(self) -> int:
    return self.pp * self.dp * self.tp


@dataclass(frozen=True)
class TrainConfig:
  """Optimisation, data and checkpointing of one training run."""

  steps: int = 600  # optimizer steps to run in total (resume continues to this)
  decay_steps: int = 0  # cosine horizon; 0 = train.steps when the run starts (saved; longer resumes keep it)
  batch_size: int = 16  # global sequences per optimizer step
  seq_len: int = 128  # tokens per sequence
  grad_accum: int = 1  # micro-steps accumulated per optimizer step (batch_size % grad_accum == 0)
  lr: float = 3e-3  # peak learning rate
  min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
  warmup_steps: int = 30  # linear warmup steps
  weight_decay: float = 0.1  # AdamW decoupled weight decay (matrices only)
  b1: float = 0.9  # AdamW beta1
  b2: float = 0.95  # AdamW beta2
  grad_clip: float = 1.0  # global-norm clipping; 0 disables
  seed: int = 0  # init and data order seed
  data: tuple[str, ...] = ()  # .txt/.jsonl files, dirs, globs; or prepared dirs, DIR[:WEIGHT] (mixture); () = stdlib
  tokenizer: str = "byte"  # "byte" or a path to a HF tokenizer.json (or its directory)
  max_corpus_bytes: int = 8_000_000  # cap on the embedded corpus size
  log_every: int = 10  # steps between log lines / metrics records
  eval_every: int = 100  # steps between eval-loss measurements; 0 disables
  eval_batches: int = 4  # batches per eval
  out_dir: str = "runs/default"  # checkpoints, config.json and metrics.jsonl go here
  save_every: int = 100  # steps between checkpoints; 0 saves only at the end
  keep_checkpoints: int = 3  # newest checkpoints kept
  resume: bool = True  # continue from the newest checkpoint in out_dir if there is one
  sample_prompt: str = "def "  # prompt of the sample printed after training
  sample_tokens: int = 160  # tokens generated for that sample (temperature 0.8)
  init_from_hf: str = ""  # start from a Hugging Face model directory instead of random init
  document_masks: bool = False  # attend only within each packed (eos-separated) document; no loss on its first token
  reset_positions: bool = False  # with document_masks: RoPE positions restart at 0 at each document start
  long_rows: str = "truncate"  # SFT rows over seq_len tokens: "truncate" (keep the start) or "drop"; counted in the log

  def __post_init__(self):
    _positive(self, "steps", "batch_size", "seq_len", "grad_accum", "log_every", "keep_checkpoints")
    if self.batch_size % self.grad_accum:
      raise ConfigError(f"train.batch_size={self.batch_size} must be a multiple of train.grad_accum={self.grad_accum}")
    if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
      raise ConfigError("train.lr must be > 0 and train.min_lr_ratio in [0, 1]")
    if self.warmup_steps < 0 or self.eval_every < 0 or self.save_every < 0 or self.decay_steps < 0:
      raise ConfigError("train.warmup_steps, train.decay_steps, train.eval_every and train.save_every must be >= 0")
    if self.reset_positions and not self.document_masks:
      raise ConfigError(
        "train.reset_positions=true needs train.document_masks=true (positions restart where "
        "the document masks start a new document)"
      )
    if self.long_rows not in ("truncate", "drop"):
      raise ConfigError(f"train.long_rows={self.long_rows!r}: use truncate (keep each row's start) or drop")


SCHEDULING_POLICIES = ("fcfs", "lpm", "dfs-weight")
ATTENTION_BACKENDS = ("auto", "reference", "pallas")
TOOL_PARSERS = ("auto", "hermes", "llama3_json")  # tool-call formats of chat replies (jaxllm.serve.http.tools)


@dataclass(frozen=True)
class ServeConfig:
  """The serving engine (KV pages, batching, scheduling) and the HTTP server in front of it."""

  page_size: int = 16  # Z, tokens per KV page
  num_pages: int = 1024  # P, pages in the device KV pool (page 0 is the null page)
  max_pages: int = 0  # pages the allocator may use (<= num_pages), a memory limit; 0 = num_pages
  max_running: int = 32  # sequences batched together at most
  chunk_size: int = 256  # tokens per step, prefill chunks and decode rows together (chunked prefill budget)
  decode_steps: int = 8  # decode steps per device call when the batch is pure decode (1 = one)
  policy: str = "lpm"  # waiting-queue order: "fcfs", "lpm" (longest cached prefix) or "dfs-weight"
  radix: bool = True  # share KV of common prefixes through the radix cache
  attention: str = "auto"  # paged attention: "pallas" (TPU/GPU kernels), "reference" (XLA), "auto" (pallas off CPU)
  decode_reserve: float = 1.0  # fraction of a request's (clipped) max_tokens whose pages admission reserves
  reserve_clip: int = 256  # max_tokens counted by admission at most (SGLang's CLIP_MAX_NEW_TOKENS); 0 = no clip
  max_wait_s: float = 30.0  # a request waiting this long is admitted next, whatever the policy (no starvation)
  min_seqs: int = 1  # smallest sequences bucket of a step (raise to compile fewer shapes)
  min_tokens: int = 32  # smallest tokens bucket of a step
  overlap: bool = True  # plan and launch the next decode while the device runs this one (SGLang's overlap)
  host: str = "127.0.0.1"  # HTTP bind address (0.0.0.0 exposes the server to the network)
  port: int = 8000  # HTTP port
  api_key: str = ""  # required as `Authorization: Bearer KEY` when set
  model_name: str = ""  # model id in the API; "" = the checkpoint or HF directory name
  max_waiting: int = 256  # queued requests at most; beyond it requests get 503 + Retry-After
  max_n: int = 16  # largest `n` (samples per request)
  max_body_bytes: int = 1_000_000  # largest request body (413 above)
  tool_parser: str = "auto"  # tool-call format of chat replies (TOOL_PARSERS); "auto" = the chat template's
  drain_timeout_s: float = 30.0  # on SIGTERM: /health 503, running requests finish for at most this long, then exit
  stream_multistep: bool = False  # streamed requests take decode_steps per call too (tokens arrive in bursts)
  deterministic: bool = False  # batch-invariant steps: output bits never depend on the batch

  def __post_init__(self):
    _positive(
      self,
      "page_size",
      "num_pages",
      "max_running",
      "chunk_size",
      "decode_steps",
      "min_seqs",
      "min_tokens",
      "port",
      "max_waiting",
      "max_n",
      "max_body_bytes",
    )
    if self.policy not in SCHEDULING_POLICIES:
      raise ConfigError(f"serve.policy={self.policy!r}: use one of {', '.join(SCHEDULING_POLICIES)}")
    if self.attention not in ATTENTION_BACKENDS:
      raise ConfigError(f"serve.attention={self.attention!r}: use one of {', '.join(ATTENTION_BACKENDS)}")
    if self.tool_parser not in TOOL_PARSERS:
      raise ConfigError(f"serve.tool_parser={self.tool_parser!r}: use one of {', '.join(TOOL_PARSERS)}")
    if not 0 <= self.max_pages <= self.num_pages:
      raise ConfigError(f"serve.max_pages={self.max_pages} must be in 0..serve.num_pages={self.num_pages}")
    if not 0 <= self.decode_reserve <= 1:
      raise ConfigError(f"serve.decode_reserve={self.decode_reserve} must be in [0, 1]")
    if self.reserve_clip < 0:
      raise ConfigError(f"serve.reserve_clip={self.reserve_clip} must be >= 0 tokens (0 = reserve all of max_tokens)")
    if self.max_wait_s <= 0:
      raise ConfigError(f"serve.max_wait_s={self.max_wait_s} must be > 0 seconds")
    if not self.drain_timeout_s >= 0:
      raise ConfigError(f"serve.drain_timeout_s={self.drain_timeout_s} must be >= 0 seconds")


@dataclass(frozen=True)
class RLConfig:
  """Off-policy RL (`train.py rl`): rollouts from the serving engine, rewards, the PPO-family loss.
  The optimiser, steps, output directory and seed are train.*; the engine's settings serve.*."""

  init_from: str = ""  # the starting policy: a checkpoints dir (e.g. an SFT run) or a Hugging Face dir; "" = random
  data: str = ""  # jsonl rows {"prompt"|"messages", ...fields} (files, dirs, globs; jaxllm.rl.data); "" = rl.task
  eval_data: str = ""  # held-out rows in the same form; "" = rl.eval_problems of rl.task's held-out split
  stop: tuple[str, ...] = ()  # stop strings besides the model's EOS ids, comma-separated; \n and \t escapes work
  task: str = "addition"  # built-in rows when rl.data is "" (jaxllm.data.tasks)
  digits_min: int = 1  # addition task: fewest digits of an operand
  digits_max: int = 2  # addition task: most digits of an operand
  rewards: str = "exact_match:1.0"  # name:weight,... (jaxllm.rl.rewards; python:MODULE:FN for your own)
  train_problems: int = 0  # 0: fresh training problems every step; N: a fixed set of N, in shuffled epochs
  group_size: int = 8  # G: samples per prompt (GRPO group; the prompt's KV is shared)
  prompts_per_step: int = 8  # prompts per learner step (batch = prompts_per_step * group_size)
  max_new_tokens: int = 8  # longest completion
  overlong: str = "keep"  # a sample cut by max_new_tokens: "keep", "mask" (out of the loss) or "penalty" (DAPO)
  overlong_buffer: int = 0  # DAPO's soft penalty: reward -(len - (max - buffer)) / buffer in the last buffer tokens
  filter_groups: bool = False  # DAPO dynamic sampling: drop groups whose rewards are all equal, sample more
  filter_max_tries: int = 4  # generation rounds per step for filter_groups before the batch is filled with dropped
  temperature: float = 1.0  # sampling temperature of the rollouts
  eta: int = 1  # staleness bound: samples are generated by weights at most eta versions old
  async_rollouts: bool = True  # generate in a thread of its own, overlapping the learner (False: inline)
  normalize_std: bool = True  # GRPO advantages divided by the group std (False: Dr. GRPO)
  clip_low: float = 0.2  # PPO epsilon (lower clip)
  clip_high: float = 0.2  # upper clip (DAPO clip-higher, e.g. 0.28)
  dual_clip: float = 0.0  # dual-clip c (e.g. 3); 0 = off
  correction: str = "decoupled"  # behaviour-policy correction: "decoupled" (AReaL), "tis" or "none"
  is_cap: float = -1.0  # importance-weight cap; -1 = the correction's default (5 / 2), 0 = none
  kl_coef: float = 0.0  # beta of the KL to the frozen reference; 0 = off
  kl_estimator: str = "k2"  # "k1", "k2" or "k3"; which placement gives which gradient: docs/rl.md (KL)
  kl_in: str = "loss"  # "loss" (per-token term) or "reward" (penalty after GRPO normalisation; needs k1)
  entropy_coef: float = 0.0  # entropy bonus coefficient
  behaviour_logprobs: str = "sampler"  # the loss's behaviour log-probs: "sampler" or "learner" (recomputed: exact)
  rescore: bool = True  # the learner recomputes each rollout's log-probs (logp_gap_*); "learner" needs it
  ppo_epochs: int = 1  # passes over each rollout (PPO's K epochs; the clip bounds the drift)
  minibatches: int = 1  # optimizer steps per pass: the rollout's groups split this many ways
  eval_every: int = 10  # learner steps between held-out accuracy measurements; 0 = only at the end
  eval_problems: int = 200  # held-out problems per measurement (greedy)
  eval_k: int = 0  # pass@k on the held-out rows at each evaluation (k samples at rl.temperature); 0 = off

  def __post_init__(self):
    _positive(self, "group_size", "prompts_per_step", "max_new_tokens", "eval_problems", "ppo_epochs", "minibatches")
    _positive(self, "filter_max_tries")
    if self.overlong not in ("keep", "mask", "penalty"):
      raise ConfigError(f"rl.overlong={self.overlong!r}: choose keep, mask (out of the loss) or penalty (DAPO's)")
    if self.overlong == "penalty" and not 0 < self.overlong_buffer <= self.max_new_tokens:
      raise ConfigError(
        f"rl.overlong=penalty needs 0 < rl.overlong_buffer <= rl.max_new_tokens={self.max_new_tokens} "
        f"(got {self.overlong_buffer}): the penalty ramps from 0 to -1 over the last overlong_buffer tokens"
      )
    if self.train_problems < 0:
      raise ConfigError(f"rl.train_problems={self.train_problems} must be >= 0 (0 = a fresh stream)")
    if self.prompts_per_step % self.minibatches:
      raise ConfigError(
        f"rl.minibatches={self.minibatches} must divide rl.prompts_per_step={self.prompts_per_step} "
        "(a GRPO group is never split)"
      )
    if self.eta < 0:
      raise ConfigError(f"rl.eta={self.eta} must be >= 0 (0 = synchronous on-policy)")
    if self.temperature <= 0:
      raise ConfigError(f"rl.temperature={self.temperature} must be > 0 (rollouts sample)")
    if not 1 <= self.digits_min <= self.digits_max:
      raise ConfigError(f"rl.digits_min={self.digits_min}, rl.digits_max={self.digits_max}: need 1 <= min <= max")
    if self.group_size < 2:
      raise ConfigError(f"rl.group_size={self.group_size}: GRPO needs at least 2 samples per prompt")
    if self.behaviour_logprobs not in ("sampler", "learner"):
      raise ConfigError(
        f"rl.behaviour_logprobs={self.behaviour_logprobs!r}: choose 'sampler' (the engine's "
        f"log-probs) or 'learner' (recomputed by the learner's forward; deterministic)"
      )
    if self.behaviour_logprobs == "learner" and not self.rescore:
      raise ConfigError(
        "rl.behaviour_logprobs=learner uses the learner's recomputation: it needs rl.rescore=true (or use "
        "rl.behaviour_logprobs=sampler, exact without it under model.batch_invariant=true)"
      )
    if self.kl_in == "reward" and self.kl_coef > 0 and self.kl_estimator == "k2":
      raise ConfigError(
        "rl.kl_in=reward with rl.kl_estimator=k2: REINFORCE on the k2 penalty is a biased KL gradient "
        "(docs/rl.md, 'KL to the reference'); set rl.kl_estimator=k1 (the exact reverse-KL gradient "
        "as a reward), or keep k2 with rl.kl_in=loss"
      )


@dataclass(frozen=True)
class RewardConfig:
  """Reward-model training (`train.py reward`); optimiser, steps, batch (pairs) and output are train.*."""

  data: str = ""  # jsonl of {"prompt", "chosen", "rejected"} lines (or --data FILE)
  eval_data: str = ""  # held-out pairs (jsonl); "" = hold out reward.eval_fraction of reward.data
  eval_fraction: float = 0.1  # share of reward.data held out (by a hash of the prompt) without eval_data
  init_from: str = ""  # checkpoints dir of the backbone (e.g. an SFT run); "" = random init (model.*)

  def __post_init__(self):
    if not 0 < self.eval_fraction < 1:
      raise ConfigError(f"reward.eval_fraction={self.eval_fraction} must be in (0, 1)")


def check_invariant_mesh(m: ModelConfig, mesh: MeshConfig) -> None:
  """ConfigError unless model.batch_invariant can run on this mesh: per device, with the heads and
  the MLP split evenly over tp (jaxllm.parallel.invariant_tp)."""
  if mesh.num_devices == 1:
    return
  bad = []
  if mesh.pp > 1:
    bad.append(f"mesh.pp={mesh.pp} (pipeline stages; use pp=1)")
  if mesh.fsdp > 1:
    bad.append(f"mesh.fsdp={mesh.fsdp} (use fsdp=1)")
  if m.n_heads % mesh.tp or m.n_kv_heads % mesh.tp:
    bad.append(f"model.n_heads={m.n_heads} and n_kv_heads={m.n_kv_heads} must be divisible by mesh.tp={mesh.tp}")
  if m.d_ff % mesh.tp:
    bad.append(f"model.d_ff={m.d_ff} must be divisible by mesh.tp={mesh.tp}")
  if bad:
    raise ConfigError(
      "model.batch_invariant (serve.deterministic) cannot run on this mesh: " + "; ".join(bad) + ". Pick a "
      "mesh of dp and tp only that splits the heads and the MLP evenly, or meshes/cpu-1.toml"
    )


@dataclass(frozen=True)
class Config:
  model: ModelConfig = field(default_factory=lambda: ModelConfig(name="tiny"))  # the `tiny` preset
  mesh: MeshConfig = field(default_factory=MeshConfig)
  train: TrainConfig = field(default_factory=TrainConfig)
  serve: ServeConfig = field(default_factory=ServeConfig)
  rl: RLConfig = field(default_factory=RLConfig)
  reward: RewardConfig = field(default_factory=RewardConfig)

  def __post_init__(self):
    m, t, mesh = self.model, self.train, self.mesh
    check_pipeline(mesh.pp, mesh.vpp, mesh.microbatches, n_layers=m.n_layers)
    if mesh.pp > 1 and t.document_masks:
      raise ConfigError(
        "train.document_masks=true is not supported with pipeline parallelism (mesh.pp > 1) "
        "yet; use mesh.pp=1 or train.document_masks=false"
      )
    if m.is_moe and m.n_experts % mesh.ep:
      raise ConfigError(f"model.n_experts={m.n_experts} must be divisible by mesh.ep={mesh.ep}")
    if m.batch_invariant:
      check_invariant_mesh(m, mesh)
      if t.document_masks:
        raise ConfigError(
          "model.batch_invariant=true does not support document masks yet; set train.document_masks=false"
        )
    micro = t.batch_size // t.grad_accum
    per_pipe = micro // mesh.microbatches if micro % mesh.microbatches == 0 else 0
    if per_pipe == 0 or per_pipe % mesh.dp:
      raise ConfigError(
        f"train.batch_size/grad_accum = {micro} must split into mesh.microbatches="
        f"{mesh.microbatches} microbatches each divisible by mesh.dp={mesh.dp}"
      )

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Loading: TOML + key=value overrides

# The config sections: TOML tables [model], [mesh], ... and the `section.` of `section.key=value`.
SECTIONS = {
  "model": ModelConfig,
  "mesh": MeshConfig,
  "train": TrainConfig,
  "serve": ServeConfig,
  "rl": RLConfig,
  "reward": RewardConfig,
}


def load_config(
  toml_paths: typing.Sequence[str] = (), overrides: typing.Sequence[str] = (), base: Config | None = None
) -> Config:
  """Resolve a Config: base (defaults) <- each TOML file in order <- `section.key=value` overrides.

  `model=NAME` (TOML: `[model] preset = "NAME"`) starts the model section from a preset; likewise
  `mesh=PATH.toml` reads a mesh preset file.
  """
  raw: dict[str, dict] = {s: {} for s in SECTIONS}
  base = base or Config()
  for path in toml_paths:
    _merge(raw, _read_toml(path), where=path)
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"override {item!r} is not key=value; e.g. train.steps=100 or model=tiny-moe")
    key, value = item.split("=", 1)
    key = key.strip().lstrip("-")
    if key in ("model", "model.preset"):
      raw["model"]["preset"] = value
    elif key == "mesh":
      _merge(raw, {"mesh": _read_toml(value).get("mesh", {})}, where=value)
    elif "." in key:
      section, name = key.split(".", 1)
      if section not in SECTIONS:
        raise ConfigError(f"override {item!r}: unknown section {section!r}; use one of {list(SECTIONS)}")
      raw[section][name] = _parse_cli_value(value)
    else:
      raise ConfigError(f"override {item!r}: write section.key=value, e.g. train.{key}=... or model.{key}=...")
  sections = {}
  for section, cls in SECTIONS.items():
    start = getattr(base, section)
    values = dict(raw[section])
    preset = values.pop("preset", None)
    if preset is not None:
      if section != "model" or preset not in MODEL_PRESETS:
        raise ConfigError(f"unknown {section} preset {preset!r}; known: {sorted(MODEL_PRESETS)}")
      start = MODEL_PRESETS[preset]
    sections[section] = _build(cls, start, values, section)
  return Config(**sections)


def config_from_dict(d: dict) -> Config:
  """Inverse of Config.to_dict (used when restoring the config saved beside a checkpoint)."""
  return Config(**{s: _build(cls, cls(), d.get(s, {}), s) for s, cls in SECTIONS.items()})


def save_config(config: Config, path: str) -> None:
  with open(path, "w") as f:
    json.dump(config.to_dict(), f, indent=2)


def _read_toml(path: str) -> dict:
  try:
    with open(path, "rb") as f:
      data = tomllib.load(f)
  except FileNotFoundError:
    raise ConfigError(f"config file {path!r} does not exist (mesh presets live in meshes/*.toml)") from None
  except tomllib.TOMLDecodeError as e:
    raise ConfigError(f"config file {path!r} is not valid TOML: {e}") from None
  unknown = set(data) - set(SECTIONS)
  if unknown:
    raise ConfigError(f"{path}: unknown section(s) {sorted(unknown)}; use {', '.join(f'[{s}]' for s in SECTIONS)}")
  return data


def _merge(raw: dict, data: dict, where: str) -> None:
  for section, values in data.items():
    if not isinstance(values, dict):
      raise ConfigError(f"{where}: [{section}] must be a table of key = value")
    raw[section].update(values)


def _build(cls, start, values: dict, section: str):
  hints = typing.get_type_hints(cls)
  names = {f.name for f in fields(cls)}
  kwargs = {}
  for key, value in values.items():
    if key not in names:
      close = difflib.get_close_matches(key, names, n=3)
      hint = (
        f"; did you mean {', '.join(section + '.' + c for c in close)}?" if close else f"; known keys: {sorted(names)}"
      )
      raise ConfigError(f"unknown config key {section}.{key}{hint}")
    kwargs[key] = _coerce(value, hints[key], f"{section}.{key}")
  return replace(start, **kwargs)


def _coerce(value, typ, key: str):
  if typ is bool:
    if isinstance(value, bool):
      return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
      return value.lower() in ("true", "1", "yes")
  elif typ is int:
    if isinstance(value, int) and not isinstance(value, bool):
      return value
    if isinstance(value, str):
      try:
        return int(value)
      except ValueError:
        pass
  elif typ is float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
    if isinstance(value, str):
      try:
        return float(value)
      except ValueError:
        pass
  elif typ is str:
    if isinstance(value, str):
      return value
  elif typing.get_origin(typ) is tuple:
    if isinstance(value, str):
      return tuple(v for v in value.split(",") if v)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
      return tuple(value)
  name = getattr(typ, "__name__", str(typ))
  raise ConfigError(f"config key {key} expects {name}, got {value!r}")


def _parse_cli_value(value: str):
  return value.strip()


def check_pipeline(pp: int, vpp: int, m: int, n_layers: int | None = None) -> None:
  """The one validity check of a pipeline layout (config loading and jaxllm.parallel.pipeline both
  call it): pp*vpp equal layer chunks, m >= pp microbatches, and no pipeline knobs without pp > 1."""
  if min(pp, vpp, m) < 1:
    raise ConfigError(f"pipeline sizes must be >= 1, got pp={pp} vpp={vpp} microbatches={m}")
  if pp == 1 and vpp > 1:
    raise ConfigError(
      f"mesh.vpp={vpp} needs mesh.pp > 1 (virtual stages interleave layer chunks over "
      "pipeline stages); set mesh.vpp=1, or mesh.pp >= 2"
    )
  if pp == 1 and m > 1:
    raise ConfigError(
      f"mesh.microbatches={m} only applies with mesh.pp > 1; to split a step's batch "
      f"without pipelining set train.grad_accum={m} and mesh.microbatches=1"
    )
  if pp > 1 and m < pp:
    raise ConfigError(
      f"mesh.microbatches={m} must be >= mesh.pp={pp}: the circular schedule needs the "
      f"last stage's output of microbatch i back at stage 0 before it is due; raise "
      f"microbatches to at least {pp}"
    )
  if n_layers is not None and n_layers % (pp * vpp):
    ok = [v for v in range(1, n_layers + 1) if n_layers % (pp * v) == 0]
    raise ConfigError(
      f"model.n_layers={n_layers} must be divisible by mesh.pp*mesh.vpp={pp}*{vpp} (each "
      "virtual stage holds the same number of layers); "
      + (f"with pp={pp} use vpp in {ok}" if ok else f"pick pp among the divisors of {n_layers}")
    )


def _positive(obj, *names):
  for n in names:
    if getattr(obj, n) < 1:
      section = {c.__name__: n for n, c in SECTIONS.items()}[type(obj).__name__]
      raise ConfigError(f"{section}.{n}={getattr(obj, n)} must be >= 1")


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


# ---------------------------------------------------------------------------------------------
# Presets

MODEL_PRESETS: dict[str, ModelConfig] = {
  # ~0.9M params; trains visibly in minutes on a small CPU with the byte tokenizer.
  "tiny": ModelConfig(name="tiny"),
  # Same backbone, 8 experts top-2, with a gated shared expert: exercises every MoE path.
  "tiny-moe": ModelConfig(
    name="tiny-moe", n_experts=8, n_experts_per_tok=2, moe_d_ff=128, shared_expert_d_ff=128, shared_expert_gate=True
  ),
  # ~100M params (GPT-2-small-like shape with GQA), the benchmark model.
  "small": ModelConfig(
    name="small", vocab_size=16384, d_model=768, n_layers=12, n_heads=12, n_kv_heads=4, d_ff=2048, max_seq_len=2048
  ),
  # Shapes of public models, for planning meshes and memory (weights come from HF import).
  "llama-3.2-1b": ModelConfig(
    name="llama-3.2-1b",
    vocab_size=128256,
    d_model=2048,
    n_layers=16,
    n_heads=32,
    n_kv_heads=8,
    head_dim=64,
    d_ff=8192,
    rope_theta=500000.0,
    rope_scaling="llama3",
    rope_factor=32.0,
    max_seq_len=131072,
    tie_embeddings=True,
    dtype="bfloat16",
  ),
  "qwen3-30b-a3b": ModelConfig(
    name="qwen3-30b-a3b",
    vocab_size=151936,
    d_model=2048,
    n_layers=48,
    n_heads=32,
    n_kv_heads=4,
    head_dim=128,
    d_ff=6144,
    n_experts=128,
    n_experts_per_tok=8,
    moe_d_ff=768,
    rope_theta=1000000.0,
    norm_eps=1e-6,
    qk_norm=True,
    max_seq_len=40960,
    dtype="bfloat16",
  ),
}
