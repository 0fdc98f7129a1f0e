"""hpc-train: fine-tune small vision-language models on SLURM clusters with DeepSpeed."""

__version__ = "0.1.0"
