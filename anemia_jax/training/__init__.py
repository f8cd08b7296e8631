"""Training: the loop, the data-parallel step, the optimizer, the experiment factory, the run's outputs,
pretrained weights and the workdir lock. Nothing below imports it."""
