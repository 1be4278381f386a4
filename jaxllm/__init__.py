"""jaxllm: one JAX/Flax NNX codebase that trains, serves and RL-tunes decoder-only LLMs, dense
and MoE (Llama/Qwen family), on TPU and GPU meshes, and runs every parallel configuration on an
emulated 8-device CPU mesh. A single model definition is shared by the trainer (TP/DP/EP with MoE
Parallel Folding, circular PP x vPP pipeline), the serving engine (paged KV cache, Pallas kernels,
radix-tree prefix cache, cache-aware scheduling) and the RL trainer. The project's own account of
the design is docs/architecture.md.

Package map
  config     frozen dataclass configs (model, mesh, train, serve, rl, reward), presets, TOML + key=value
  buckets    power-of-two size buckets (few compiled shapes), pure Python
  model/     the shared decoder, its loss and a plain generate loop; logical axis names, never a mesh
  parallel/  mesh + folding plan, logical->physical sharding rules, expert dispatch, pipeline schedule
  data/      tokenizers, the embedded corpus, packing, resumable batch iterators (numpy only)
  kernels/   paged attention: pure-jnp reference and Pallas kernels (TPU, GPU), one backend switch
  io/        checkpoint layout on disk, Hugging Face import/export, load_model (checkpoint or HF dir)
  train/     train state and step, optimizer, the one run loop (runner) every trainer uses, metrics
  serve/     KV page pool, page allocator, radix prefix cache, scheduler, sampling, engine, benchmark
  rl/        off-policy RL: losses, rewards, reward models, rollouts through the engine, learner
  planner/   memory planner: per-device bytes of a training config, no devices (python -m jaxllm.planner)
  cli        plumbing shared by the command-line entry points train.py and serve.py

Layering (imports point one way only)
  config <- model <- parallel <- {train, serve} <- rl <- CLIs (train.py, serve.py, jaxllm/cli.py)
  `kernels` and `data` are leaves (import nothing of jaxllm but `config` and `buckets`, which imports
  nothing); `io` imports only `config`, `model` and `data`; `train` and `serve` never import each other; what
  both need (shardings, loading params for inference) sits below them; `planner` sits above `train`.
  tests/test_layering.py enforces this by parsing every import, function-level imports included, and
  fails on a top-level module or package whose layer it does not declare.

Shape legend (the one for the whole package; a new letter is added here, never redefined locally)
  B  batch: sequences in a training or plain-generation batch
  T  query length: tokens per sequence in one forward pass (the prompt length in generate)
  S  key/value length (the capacity of a contiguous KV cache)
  D  model (residual) width
  N  query heads    K  kv heads    G  = N // K, query heads per kv head    H  head dim
  F  MLP hidden width (of one expert in MoE layers)
  E  routed experts    k  experts per token (top-k)
  V  vocab size
  L  layers    C  layers per pipeline chunk, L / (pp * vpp)
  m  pipeline microbatches    b  sequences per microbatch, B / m
  n  new tokens generated per sequence
 Serving (paged KV cache):
  R  sequences (requests) in one engine step: rows of the page table
  Q  query tokens packed into one engine step (ragged rows; Q = R when every row decodes)
  P  pages in the KV pool    Z  tokens per page (page size)
  M  page-table width: pages per sequence
 In code, `P` is also jax's PartitionSpec alias; shape comments use the letters above only.
"""
