"""What defines and restores a training run, shared by training and serving: its config, its checkpoints and
their integrity, the model it builds, a finished run restored for inference."""
