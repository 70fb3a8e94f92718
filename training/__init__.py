"""What the SFT and GRPO trainers share: the model, tokenizer and LoRA a recipe names
(`model_loading`), the distributed engine accelerate launched (`launcher`), metrics
(`metrics_file`), expert load and profiles (`expert_load`, `expert_profile`), adapter
merging (`merge`) and memory plans (`memory_plan`).
"""
