"""Fine-tuning: adapter merge/export (SFT and expert profiling arrive with their issue)."""
