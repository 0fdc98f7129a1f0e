"""Scoring generated answers (:mod:`.metrics`) and comparing evaluations (:mod:`.compare`).

The names below need no numpy, so the config and the command line can read them on a machine
where nothing is installed yet (``hpc-train doctor`` runs there)."""

METRICS = ("exact_match", "f1", "bleu4", "rouge_l", "cider")
"""Every metric ``eval.metrics`` can name, in report order."""
SHORT_ANSWER = ("exact_match", "f1")
CAPTION = ("bleu4", "rouge_l", "cider")
RESAMPLES = 1000
"""Paired bootstrap draws ``compare-eval`` takes by default."""
CONFIDENCE = 0.95
