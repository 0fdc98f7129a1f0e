"""Where samples come from: dataset records (JSON / JSONL, indexed), their optional fields, mixtures, the ProAssist converter and the synthetic dataset."""
