"""Training: optimizer and schedules, the step, checkpoints, the loop, SFT."""
