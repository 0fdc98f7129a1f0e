"""``hpc-train plan``: a run's peak memory per rank, step time and what fits, before it is queued."""
