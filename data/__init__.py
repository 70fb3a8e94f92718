"""Data: where problems and training rows come from and how prompts are shown.

`arithmetic` generates the shipped arithmetic task, `problems` loads GRPO/eval problems,
`sft_data` loads SFT rows, and `prompt_template` renders a prompt the same way in SFT, GRPO
and eval.
"""
