"""Reinforcement learning and evaluation: the GRPO loop (`grpo`) composing its prompt order
(`prompt_stream`), group sampling and scoring (`collector`), policy update (`policy_update`,
on `policy_batch`) and checkpoints (`checkpoint`); its pure losses and advantages
(`algorithms`), rollout engines and weight sync (`rollout*`, `weight_group`), the policy's
training engines under each launcher (`policy_engine`), data-parallel collection
(`data_parallel`), what a person inspects of each step (`inspection`: rollouts.jsonl and router
agreement; `rollouts_file`: `moetune rollouts show`), and pass@k evaluation (`evaluation`,
`pass_at_k`).
"""
