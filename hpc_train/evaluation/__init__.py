"""Scoring generated answers (:mod:`.metrics`) and comparing evaluations (:mod:`.compare`)."""
