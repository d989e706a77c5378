"""Training SPMs data-free: the trainable adapter, the loop, its config and checkpoints, the DDIM schedule helpers, background jobs, presets."""
