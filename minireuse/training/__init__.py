"""Training: the loop (trainer.py) above the device side of one step (step.py, graphs.py),
the reuse strategies that decide when a layer reuses (adaptive.py) with their per-step
probes (probes.py), checkpoints and the run's output directory."""
