"""Encoded samples into batches: padding, packing, a rank's share under sequence parallelism, which videos may share a batch, DataLoader workers."""
