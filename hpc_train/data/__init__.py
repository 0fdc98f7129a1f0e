"""Data pipeline, one folder per stage: sources (records) -> decoding (media) -> encoding
(chat template and labels) -> caches -> dataset -> batching; pipeline.py wires them."""
