"""Off-policy RL on the shared model (`train.py rl`); see docs/architecture.md.

losses    the RL objective as pure jax functions over sums and counts: GRPO advantages, PPO /
          DAPO / dual-clip surrogate, behaviour-policy correction (decoupled, TIS), KL to a frozen
          reference (k1/k2/k3, in the loss or the reward), entropy bonus
rewards   verifiable rewards (exact match, format, python: callables) and the learned reward model
          (rm:DIR) combined with weights
reward_model  the shared backbone + a scalar head, Bradley-Terry on preference pairs (`train.py reward`)
rollout   G samples per prompt from the in-process serving engine, with behaviour log-probs and
          the weight version that generated them
learner   the RL objective for jaxllm.train's one train step, and the [B, T] batch it consumes
loop      the generation thread and the learner with bounded staleness (eta), evaluation,
          metrics, checkpoints
"""
