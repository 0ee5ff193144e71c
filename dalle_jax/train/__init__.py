"""What every trainer shares: train state, checkpoints, schedules, launch, preemption, run config, logs."""
