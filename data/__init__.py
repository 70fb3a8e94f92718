"""Data: where problems and training rows come from and how prompts are shown.

`sources` opens every kind of source through `datasets` (hub ids with subset/split/revision,
local files and folders, `builtin:` sets, weighted mixtures), maps columns and extracts gold
answers; `problems` turns rows into GRPO/eval problems and `sft_data` into SFT rows;
`arithmetic` generates the shipped arithmetic task, and `prompt_template` renders a prompt
the same way in SFT, GRPO and eval.
"""
