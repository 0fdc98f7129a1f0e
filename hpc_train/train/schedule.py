"""Warm-up then cosine decay, as a multiplier of each group's peak learning rate."""

from __future__ import annotations

import math

import torch


def lr_multiplier(step: int, *, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak rate for optimizer step ``step`` (0-based; the rate used by that step)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int,
                    min_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """One schedule shared by every parameter group, each scaled from its own peak rate."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_multiplier(step, total_steps=total_steps, warmup_steps=warmup_steps,
                                   min_ratio=min_ratio),
    )
