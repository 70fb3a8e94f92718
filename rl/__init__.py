"""Reinforcement learning and evaluation: the GRPO trainer (`grpo`) with its pure losses and
advantages (`algorithms`), rollout engines and weight sync (`rollout*`, `weight_group`),
the policy optimizer engines (`policy_optimizer`), data-parallel collection
(`data_parallel`), and pass@k evaluation (`evaluation`, `pass_at_k`).
"""
