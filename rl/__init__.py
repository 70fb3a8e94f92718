"""Reinforcement learning and evaluation.

The GRPO loop (`grpo`) composes its prompt order (`prompt_stream`), group sampling and
scoring (`collector`), policy update (`policy_update`, on `policy_batch`) and checkpoints
(`checkpoint`); its pure losses and advantages live in `algorithms`. Rollouts: the engine
pool (`rollout`), one engine's process (`worker_process`, running `rollout_worker`, or a
remote engine through `rollout_remote` / `rollout_server`), what a sync sends
(`engine_weights`, streamed block by block), and how it travels (`weight_group`: buckets
over a torch.distributed group per engine). The policy's training engines under each
launcher (`policy_engine`), data-parallel collection (`data_parallel`), FP8 checkpoints for
vLLM (`vllm_fp8`), what a person inspects of each step (`inspection`: rollouts.jsonl and
router agreement; `rollouts_file`: `moetune rollouts show`), and pass@k evaluation
(`evaluation`, `pass_at_k`).
"""
