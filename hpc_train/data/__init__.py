"""Data pipeline: records -> media -> chat template and labels -> batches."""
