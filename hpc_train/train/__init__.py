"""Training: the step loop, DeepSpeed setup and out-of-memory advice."""
