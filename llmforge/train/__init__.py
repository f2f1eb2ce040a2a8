"""Engine setup, the Trainer, LR schedules, checkpoint commit/resume."""
