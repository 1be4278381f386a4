"""The RL objective as pure jax functions, kept as sums and counts (like jaxllm/model/loss.py).

Owns the per-token pieces of the learner's loss -- GRPO advantages, the PPO-clip surrogate with an
off-policy correction, KL estimators (in the loss or as a reward penalty), entropy and token
log-probs -- and `rl_loss`, which combines them: (logp, batch, cfg) -> (loss_sum, count, sums, maxes).

The one idea: three policies. `logp_behav` is what the sampler reported (weights up to `eta` versions
old, another numeric stack), `logp_prox` the learner's no-grad log-probs just before this update, and
`logp` the current ones, with gradient. correction="decoupled" PPO-clips pi/proximal and weights each
token by proximal/behaviour (tokens above is_cap drop out); "tis" truncates that weight instead;
"none" clips pi/behaviour. Nothing here divides: a caller adds the sums over its chunks and divides
once by the step's token count. Which KL placement has which gradient (k1 as a reward: the exact
gradient of the sequences' KL; k2 in the loss: each token's, without the effect on later tokens), and
the rest of the derivation: docs/rl.md.

`chunked_rl_sums` and `chunked_token_logprobs` compute the loss (with the entropy) and the log-probs
from the final hidden states and the head chunk by chunk of positions, never holding the [B, T, V]
fp32 logits (the learner's path; `token_logprobs` and `token_entropy` take full logits).

A sample's row of the [B, T] arrays holds per-token values of the tokens it generated; `mask [B, T]`
is 1 on the tokens that count (fractional values act as token weights). Jit-friendly: static shapes,
masks instead of gathers, `RLLossConfig` frozen and hashable. Shapes: the package legend in
jaxllm/__init__.py (B, T, V); the rows of one GRPO group are adjacent, B = prompts * group_size.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxllm.config import ConfigError
from jaxllm.model.hooks import constrain
from jaxllm.model.loss import _chunk_logits, _rows, _split, token_nll

CORRECTIONS = ("decoupled", "tis", "none")
KL_ESTIMATORS = ("k1", "k2", "k3")
KL_PLACEMENTS = ("loss", "reward")
DEFAULT_IS_CAP = {"decoupled": 5.0, "tis": 2.0, "none": math.inf}


@dataclass(frozen=True)
class RLLossConfig:
  """The RL loss's knobs; static under jit (frozen, hashable)."""

  clip_low: float = 0.2  # epsilon in PPO eq. 7 (Schulman et al. 2017): ratio clipped below at 1 - clip_low
  clip_high: float = 0.2  # upper clip 1 + clip_high; DAPO's epsilon_high (Yu et al. 2025), e.g. 0.28
  dual_clip: float = 0.0  # c of dual-clip PPO (Ye et al. 2020), e.g. 3: loss <= -c*A when A < 0; 0 = off
  correction: str = "decoupled"  # "decoupled" (Hilton et al. 2022, AReaL), "tis" (Yao et al. 2025) or "none"
  # Cap on w = proximal/behaviour: decoupled drops tokens with w > cap (AReaL's behav_imp_weight_cap),
  # tis truncates w at it (C in Yao et al.). None = the correction's default (5.0 / 2.0); 0 = no cap.
  is_cap: float | None = None
  kl_coef: float = 0.0  # beta of the KL to the frozen reference (GRPO eq. 3, Shao et al. 2024); 0 = off
  kl_estimator: str = "k2"  # "k1" | "k2" | "k3" of Schulman's "Approximating KL divergence"
  kl_in: str = "loss"  # "loss": + beta*k per token; "reward": caller subtracts kl_reward_penalty
  entropy_coef: float = 0.0  # entropy bonus (c2 in PPO eq. 9): loss -= entropy_coef * H; 0 = off

  def __post_init__(self):
    def bad(name, allowed):
      raise ConfigError(f"RLLossConfig.{name}={getattr(self, name)!r}: allowed {allowed}")

    if not 0.0 <= self.clip_low < 1.0:
      bad("clip_low", "0 <= clip_low < 1")
    if not self.clip_high >= 0.0:
      bad("clip_high", "clip_high >= 0")
    if not (self.dual_clip == 0.0 or self.dual_clip > 1.0):
      bad("dual_clip", "0 (off) or c > 1 (e.g. 3)")
    if self.correction not in CORRECTIONS:
      bad("correction", " | ".join(repr(c) for c in CORRECTIONS))
    if self.is_cap is not None and not (self.is_cap == 0.0 or self.is_cap >= 1.0):
      bad("is_cap", "None (the correction's default), 0 (no cap) or a cap >= 1")
    if not self.kl_coef >= 0.0:
      bad("kl_coef", "kl_coef >= 0")
    if self.kl_estimator not in KL_ESTIMATORS:
      bad("kl_estimator", " | ".join(repr(k) for k in KL_ESTIMATORS))
    if self.kl_in not in KL_PLACEMENTS:
      bad("kl_in", " | ".join(repr(k) for k in KL_PLACEMENTS))
    if not math.isfinite(self.entropy_coef):
      bad("entropy_coef", "a finite number")

  @property
  def cap(self) -> float:
    """The importance-weight cap in force (inf = none)."""
    if self.correction == "none" or self.is_cap == 0.0:
      return math.inf
    return DEFAULT_IS_CAP[self.correction] if self.is_cap is None else float(self.is_cap)


def grpo_advantages(rewards, group_size: int, normalize_std: bool = True, eps: float = 1e-6):
  """rewards [B] -> advantages [B], relative to each sample's group.

  Layout: the rows of a group are adjacent, B = prompts * group_size (row i is in group
  i // group_size). A_i = (r_i - mean_group) / (std_group + eps) (GRPO outcome supervision, Shao et
  al. 2024); normalize_std=False gives Dr. GRPO's r_i - mean_group (Liu et al. 2025). std is the
  population std (ddof 0); TRL and verl use the sample std (ddof 1), larger by sqrt(G/(G-1)) for
  group size G. A group whose rewards are all equal gets advantages 0.
  """
  (b,) = rewards.shape
  if group_size < 1 or b % group_size:
    raise ValueError(f"grpo_advantages: group_size={group_size} must divide the {b} rewards (groups are adjacent rows)")
  r = rewards.astype(jnp.float32).reshape(b // group_size, group_size)
  centred = r - jnp.mean(r, axis=1, keepdims=True)
  if normalize_std:
    centred = centred / (jnp.std(r, axis=1, keepdims=True) + eps)
  return centred.reshape(b)


def ppo_surrogate(ratio, advantages, clip_low: float = 0.2, clip_high: float = 0.2, dual_clip: float = 0.0):
  """Token-level clipped surrogate. ratio [B, T], advantages [B, T] (or broadcastable) ->
  (loss [B, T], clipped [B, T] bool, dual_clipped [B, T] bool).

  loss = -min(ratio*A, clip(ratio, 1 - clip_low, 1 + clip_high)*A)   (PPO eq. 7, sign flipped)
  and with dual_clip = c > 1, for A < 0: loss = min(loss, -c*A)       (Ye et al. 2020)
  `clipped`: the clipped branch is strictly the larger (its gradient is 0); ties take the unclipped
  branch, so the gradient inside the trust region is exactly -A * dratio. `dual_clipped`: the dual
  bound binds (gradient 0).
  """
  unclipped = -advantages * ratio
  clipped_term = -advantages * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
  clipped = clipped_term > unclipped
  loss = jnp.where(clipped, clipped_term, unclipped)
  if dual_clip:
    bound = -dual_clip * advantages
    dual = (advantages < 0) & (loss > bound)
    loss = jnp.where(dual, bound, loss)
  else:
    dual = jnp.zeros_like(clipped)
  return loss, clipped, dual


def kl_estimate(logp, logp_ref, estimator: str = "k2"):
  """Per-token estimator of KL(pi||ref) from the sampled tokens' log-probs, logp and logp_ref [B, T]
  -> [B, T]. With d = logp - logp_ref:  k1 = d,  k2 = d^2 / 2,  k3 = exp(-d) + d - 1  (Schulman,
  "Approximating KL divergence"). See the module docstring for which has the right gradient where."""
  d = logp - logp_ref
  if estimator == "k1":
    return d
  if estimator == "k2":
    return 0.5 * d * d
  if estimator == "k3":
    return jnp.expm1(-d) + d  # exp(logp_ref - logp) - (logp_ref - logp) - 1, without cancellation
  raise ConfigError(f"kl_estimator={estimator!r}: allowed " + " | ".join(repr(k) for k in KL_ESTIMATORS))


def kl_reward_penalty(logp, logp_ref, mask, cfg: RLLossConfig):
  """The KL as a reward penalty (kl_in="reward"): kl_coef * k [B, T], zero off the mask, no gradient.
  logp: the sampled tokens' log-probs under the policy that drew them (logp_behav, or logp_prox).
  The caller subtracts it from the advantages after the GRPO normalisation (learner.advantages_of:
  summed over a sequence, or as reward-to-go per token); with k1 this is REINFORCE on the KL, the
  exact gradient of the sequences' reverse KL (k2 and k3 here are biased: docs/rl.md)."""
  k = kl_estimate(logp, logp_ref, cfg.kl_estimator)
  return jax.lax.stop_gradient(cfg.kl_coef * jnp.where(mask > 0, k, 0.0))


def token_entropy(logits):
  """logits [B, T, V] -> entropy of softmax(logits) per token [B, T] (fp32; -inf logits allowed)."""
  logits = logits.astype(jnp.float32)
  logq = jax.nn.log_softmax(logits, axis=-1)
  q = jnp.exp(logq)
  return -jnp.sum(jnp.where(q > 0, q * logq, 0.0), axis=-1)


def token_logprobs(logits, targets):
  """logits [B, T, V], targets [B, T] int -> log pi(target) [B, T] (fp32)."""
  return -token_nll(logits.astype(jnp.float32), targets)


def rl_loss(logp, batch: dict, cfg: RLLossConfig):
  """The RL loss of one batch (or chunk) as sums: -> (loss_sum, count, sums, maxes).

  logp [B, T]: the current policy's log-probs of the sampled tokens (the only input with gradient).
  batch:
    mask        [B, T]  1 on counted (generated) tokens
    advantages  [B] or [B, T]  (e.g. grpo_advantages; no gradient)
    logp_behav  [B, T]  behaviour (sampler) log-probs
    logp_prox   [B, T]  proximal log-probs (learner, pre-update weights); required unless correction="none"
    logp_ref    [B, T]  frozen reference log-probs; required when kl_coef > 0 and kl_in="loss"
    entropy     [B, T]  per-token entropy (token_entropy of the current logits); required when entropy_coef != 0
  loss_sum: sum over counted tokens of  w * surrogate + [kl_in="loss"] kl_coef * k - entropy_coef * H.
  count: the counted tokens (sum of mask). The loss is loss_sum / count, with the count summed over
  the whole step when the batch is split.
  sums (fp32 scalars, summed over counted tokens; divide by the count for means):
    pg_loss, clipped, dual_clipped, ratio, approx_kl (k3 of current vs old: estimates KL(old||pi)),
    is_weight (raw w = proximal/behaviour; 1 when correction="none"), is_capped (tokens the cap acted
    on: masked out for decoupled, truncated for tis), kl (if logp_ref given), entropy (if given).
  maxes: is_weight, ratio (maxima over counted tokens; combine chunks with max).
  """
  m = batch["mask"].astype(jnp.float32)
  on = m > 0
  adv = jax.lax.stop_gradient(jnp.asarray(batch["advantages"], jnp.float32))
  if adv.ndim == 1:
    adv = adv[:, None]
  logp_behav = batch["logp_behav"]
  if cfg.correction == "none":
    logp_old = logp_behav
  else:
    if "logp_prox" not in batch:
      raise KeyError(
        f"rl_loss: correction={cfg.correction!r} needs batch['logp_prox'] (the learner's log-probs "
        "under the pre-update weights); use correction='none' to treat the behaviour as old"
      )
    logp_old = batch["logp_prox"]
  logp_old = jax.lax.stop_gradient(logp_old)

  # Off-mask entries may hold anything: zero the log-ratios there before exp (no inf, no NaN grads).
  log_ratio = jnp.where(on, logp - logp_old, 0.0)
  ratio = jnp.exp(log_ratio)
  pg, clipped, dual = ppo_surrogate(ratio, adv, cfg.clip_low, cfg.clip_high, cfg.dual_clip)

  if cfg.correction == "none":
    w_raw = jnp.ones_like(m)
    capped = jnp.zeros_like(on)
    w = w_raw
  else:
    w_raw = jnp.exp(jax.lax.stop_gradient(jnp.where(on, logp_old - logp_behav, 0.0)))
    capped = on & (w_raw > cfg.cap)
    if cfg.correction == "decoupled":
      w = jnp.where(capped, 0.0, w_raw)
    else:  # tis
      w = jnp.minimum(w_raw, cfg.cap)
  pg = pg * w
  tok = pg

  sums = {}
  if "logp_ref" in batch:
    # Masked inputs (not only a masked output), so off-mask garbage cannot make exp overflow.
    k = kl_estimate(jnp.where(on, logp, 0.0), jnp.where(on, batch["logp_ref"], 0.0), cfg.kl_estimator)
    sums["kl"] = jnp.sum(jax.lax.stop_gradient(k) * m)
    if cfg.kl_in == "loss" and cfg.kl_coef:
      tok = tok + cfg.kl_coef * k
  elif cfg.kl_in == "loss" and cfg.kl_coef:
    raise KeyError("rl_loss: kl_coef > 0 with kl_in='loss' needs batch['logp_ref'] (frozen reference log-probs)")
  if "entropy" in batch:
    ent = jnp.where(on, batch["entropy"], 0.0)
    sums["entropy"] = jnp.sum(jax.lax.stop_gradient(ent) * m)
    if cfg.entropy_coef:
      tok = tok - cfg.entropy_coef * ent
  elif cfg.entropy_coef:
    raise KeyError("rl_loss: entropy_coef != 0 needs batch['entropy'] (e.g. token_entropy(logits))")

  sg = jax.lax.stop_gradient
  f32 = lambda x: x.astype(jnp.float32)
  sums.update(
    pg_loss=jnp.sum(sg(pg) * m),
    clipped=jnp.sum(f32(clipped) * m),
    dual_clipped=jnp.sum(f32(dual) * m),
    ratio=jnp.sum(sg(ratio) * m),
    approx_kl=jnp.sum(sg(jnp.expm1(log_ratio) - log_ratio) * m),
    is_weight=jnp.sum(w_raw * m),
    is_capped=jnp.sum(f32(capped) * m),
  )
  maxes = {"is_weight": jnp.max(jnp.where(on, w_raw, 0.0)), "ratio": jnp.max(jnp.where(on, sg(ratio), 0.0))}
  return jnp.sum(tok * m), jnp.sum(m), sums, maxes


def metric_means(sums: dict, maxes: dict, count) -> dict:
  """Sums (added over a step's chunks) and maxes (max over chunks) -> {name: mean, name_max: max}."""
  denom = jnp.maximum(count, 1.0)
  out = {k: v / denom for k, v in sums.items()}
  out.update({f"{k}_max": v for k, v in maxes.items()})
  return out


# ---- the policy's log-probs and the loss chunk by chunk of positions (no [B, T, V] fp32 logits) ----

# The [B, T] inputs of rl_loss that a chunked loss slices along T (besides the targets).
_TOKEN_KEYS = ("mask", "advantages", "logp_behav", "logp_prox", "logp_ref")


def _policy_logits(hc, w, temperature):
  """One chunk's logits of the policy softmax(h @ w / temperature), fp32 [B, C, V]."""
  return _chunk_logits(constrain(hc, ("batch", "seq", "embed")), w) / temperature


def _n_chunks(T: int, chunk: int) -> tuple[int, int]:
  n = -(-T // chunk)
  return n, n * chunk - T


def _pad_t(x, pad: int):
  return jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2)) if pad else x


def _chunk_stats(logits, targets):
  """Policy logits [B, C, V] fp32, targets [B, C] -> (log q [B, C, V], q, log q(target) [B, C], entropy
  [B, C]): token_logprobs and token_entropy up to fp32 rounding, from one max and two sums over the
  logits (one pass, which XLA fuses without a [B, C, V] log-softmax buffer). The learner's log-probs,
  with gradient or without, all come from here, so the proximal pass and the loss agree."""
  m = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  zm = logits - m
  e = jnp.exp(zm)
  s = jnp.sum(e, axis=-1)
  log_s = jnp.log(s)
  logp = jnp.take_along_axis(zm, targets[..., None], axis=-1)[..., 0] - log_s
  ent = log_s - jnp.sum(jnp.where(e > 0, e * zm, 0.0), axis=-1) / s
  logq = zm - log_s[..., None]
  return logq, jnp.exp(logq), logp, ent


def chunked_token_logprobs(h, w_head, targets, temperature: float = 1.0, chunk: int = 1024):
  """token_logprobs(h @ w_head / temperature, targets) [B, T] fp32 (to fp32 rounding) without the
  [B, T, V] fp32 logits: a lax.map over chunks of `chunk` positions (every row at once), each holding
  [B, chunk, V]. For the learner's no-grad passes (proximal, reference, re-scoring); the same
  per-token arithmetic as chunked_rl_sums.
  h [B, T, D], w_head [D, V], targets [B, T] int; chunk <= 0 or >= T: the plain computation."""
  B, T, _ = h.shape
  if chunk <= 0 or T <= chunk:
    return _chunk_stats(_policy_logits(h, w_head, temperature), targets)[2]
  n, pad = _n_chunks(T, chunk)

  def one(xs):
    hc, tc = xs
    return _chunk_stats(_policy_logits(hc, w_head, temperature), tc)[2]

  out = jax.lax.map(one, (_split(_pad_t(h, pad), n), _split(_pad_t(targets, pad), n)))  # [n, B, chunk]
  return jnp.moveaxis(out, 0, 1).reshape(B, n * chunk)[:, :T]


def _rl_sums(logp, entropy, xc: dict, cfg: RLLossConfig):
  loss_sum, _, sums, _ = rl_loss(logp, dict(xc, entropy=entropy), cfg)
  return loss_sum, sums


def _chunk_rl_sums(logits, xc: dict, cfg: RLLossConfig):
  """rl_loss of one chunk from its policy logits [B, C, V] (the entropy is computed here) -> (loss_sum, sums)."""
  _, _, logp, ent = _chunk_stats(logits, xc["targets"])
  return _rl_sums(logp, ent, xc, cfg)


def _chunk_rl_grad(logits, xc: dict, cfg: RLLossConfig):
  """One chunk: ((loss_sum, sums), d loss_sum / d logits [B, C, V] fp32). rl_loss depends on the logits
  only through each token's log-prob and entropy, so its gradient is two per-token scalars [B, C] (from
  autodiff of rl_loss) times the closed forms d logp / dz = onehot - q and d H / dz = -q (log q + H):
  one elementwise pass over the chunk's logits."""
  logq, q, logp, ent = _chunk_stats(logits, xc["targets"])
  out, (g_logp, g_ent) = jax.value_and_grad(_rl_sums, argnums=(0, 1), has_aux=True)(logp, ent, xc, cfg)
  onehot = jnp.arange(logits.shape[-1], dtype=xc["targets"].dtype) == xc["targets"][..., None]
  dlogits = g_logp[..., None] * (onehot - q)
  if cfg.entropy_coef:  # otherwise the entropy is a metric only (no gradient)
    dlogits = dlogits - g_ent[..., None] * jnp.where(q > 0, q * (logq + ent[..., None]), 0.0)
  return out, dlogits


def _chunks(h, xs, n):
  """h [B, n*C, D] and a pytree of [B, n*C] arrays -> the same split into n chunks along a leading axis."""
  return _split(h, n), jax.tree.map(lambda a: _split(a, n), xs)


def _sum_chunks(outs):
  loss, sums = outs
  return jnp.sum(loss), {k: jnp.sum(v) for k, v in sums.items()}


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _chunked_rl(h, w, xs, cfg, temperature, n):
  """(loss_sum, sums) of padded h [B, n*C, D] and xs ([B, n*C] arrays) over n chunks; forward only."""
  outs = jax.lax.map(lambda x: _chunk_rl_sums(_policy_logits(x[0], w, temperature), x[1], cfg), _chunks(h, xs, n))
  return _sum_chunks(outs)


def _chunked_rl_fwd(h, w, xs, cfg, temperature, n):
  # Differentiated: rl_loss is a sum of per-token terms, so each chunk's gradient is computed right
  # after its loss, while its logits exist (as jaxllm.model.loss does for the NLL): nothing of [B, T, V]
  # is kept or recomputed, and the residuals are dh (h's size) and dw (w's size). The metric sums have
  # no gradient (rl_loss stops it), so their cotangents are ignored.
  def body(dw, x):
    hc, xc = x
    hc = constrain(hc, ("batch", "seq", "embed"))
    logits = _chunk_logits(hc, w) / temperature
    out, dlogits = _chunk_rl_grad(logits, xc, cfg)
    # d/d(h @ w) = d/dlogits / temperature, in the compute dtype for the two matmuls (see _chunk_grads).
    dl = constrain(dlogits / temperature, ("batch", "seq", "vocab")).astype(hc.dtype)
    dh = jnp.dot(_rows(dl), w.astype(hc.dtype).T, preferred_element_type=jnp.float32).reshape(hc.shape)
    dw_c = jnp.dot(_rows(hc).T, _rows(dl), preferred_element_type=jnp.float32)
    return dw + dw_c, (out, dh.astype(hc.dtype))

  dw, (outs, dh) = jax.lax.scan(body, jnp.zeros(w.shape, jnp.float32), _chunks(h, xs, n))
  return _sum_chunks(outs), (jnp.moveaxis(dh, 0, 1).reshape(h.shape), dw.astype(w.dtype))


def _chunked_rl_bwd(cfg, temperature, n, res, g):
  dh, dw = res
  g_loss = g[0]
  return (dh * g_loss).astype(dh.dtype), (dw * g_loss).astype(dw.dtype), None


_chunked_rl.defvjp(_chunked_rl_fwd, _chunked_rl_bwd)


def chunked_rl_sums(h, w_head, batch: dict, cfg: RLLossConfig, temperature: float = 1.0, chunk: int = 1024):
  """rl_loss of the policy softmax(h @ w_head / temperature), with its per-token entropy, as
  (loss_sum, sums) -- without the [B, T, V] fp32 logits or their gradient.

  rl_loss is a sum of per-token terms, so it splits along the sequence like the LM loss
  (jaxllm.model.loss.chunked_cross_entropy_sums): a scan over chunks of `chunk` positions (every row
  at once) computes a chunk's logits [B, chunk, V], its log-probs of the targets, entropy and loss
  terms, and, when differentiated (a custom_vjp), that chunk's gradients wrt h and w_head at once, so
  the backward keeps no logits and recomputes none (the same 3 head matmuls per token as the plain
  loss; peak a few [B, chunk, V] fp32 buffers). Equal to the plain computation to fp32 rounding.

  h [B, T, D], w_head [D, V]; batch: targets [B, T] int and the per-token inputs of rl_loss (mask,
  advantages [B] or [B, T], logp_behav, logp_prox, logp_ref; others are ignored). chunk <= 0 or >= T:
  the plain computation (autodiff through full logits). T not a multiple of `chunk` is padded with
  uncounted positions. -> (loss_sum, sums) as rl_loss's; its maxes are not kept.
  """
  B, T, _ = h.shape
  if chunk <= 0 or T <= chunk:
    return _chunk_rl_sums(_policy_logits(h, w_head, temperature), batch, cfg)
  xs = {"targets": batch["targets"]}
  for k in _TOKEN_KEYS:
    if k in batch:
      v = jnp.asarray(batch[k])
      xs[k] = jnp.broadcast_to(v[:, None], (B, T)) if k == "advantages" and v.ndim == 1 else v
  n, pad = _n_chunks(T, chunk)
  xs = jax.tree.map(lambda a: _pad_t(a, pad), xs)  # padded positions: mask 0, so they do not count
  return _chunked_rl(_pad_t(h, pad), w_head, xs, cfg, float(temperature), n)
