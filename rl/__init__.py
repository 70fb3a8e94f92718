"""RL and evaluation: problem sources, pass@k, `moetune eval` (GRPO arrives with its issue)."""
