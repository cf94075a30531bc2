"""Training one run: the checks and resolution before it starts (preflight), the trainer, whole-image
validation, learning-rate schedules, determinism, torch.distributed, and the run's model artifact.
"""
