"""Profiling for training runs: statistics, phase timers and reports (importable on its own)."""
