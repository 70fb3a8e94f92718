"""Supervised fine-tuning on TRL's SFTTrainer with the native model (`sft`)."""
