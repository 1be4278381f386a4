"""Off-policy RL trainer (being built); see docs/architecture.md.

  losses   the RL objective as pure jax functions over sums and counts: GRPO advantages, PPO /
           DAPO / dual-clip surrogate, behaviour-policy correction (decoupled, TIS), KL to a frozen
           reference, entropy bonus
"""
