"""Scores of generated answers against every reference of a record.

- ``exact_match``: the answer equals a reference after :func:`normalize_answer` (lower case,
  punctuation removed, whitespace collapsed): the toolkit's answer accuracy.
- ``f1``: SQuAD's token F1 (lower case, punctuation deleted, articles dropped), the best over
  the references.
- ``bleu4``, ``rouge_l``, ``cider``: the MS-COCO caption metrics as pycocoevalcap computes them
  (BLEU-4 with the closest reference length, ROUGE-L with beta 1.2, CIDEr-D with its length
  penalty and clipping, IDF over the evaluated set's references). COCO tokenizes with Stanford's
  PTB tokenizer, which needs Java; here NLTK's Python port of the same Treebank rules splits each
  sentence and the tokens COCO drops are dropped (:func:`caption_tokens`).

Each record's row keeps what its share of a corpus value is made of -- a score, or for BLEU the
n-gram counts -- so the value over any multiset of records (one kind, a bootstrap draw) is a
weighted sum, not a rerun: :func:`corpus_values`.
"""

from __future__ import annotations

import re
import statistics
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any

import numpy as np

from hpc_train.evaluation import CAPTION, METRICS, SHORT_ANSWER

SENTENCE_WORDS = 5
"""``auto`` adds the caption metrics when the median reference has at least this many words."""
BLEU_ORDER = 4
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_CLITICS = {"'s", "'re", "'ve", "'ll", "'d", "'m"}


def normalize_answer(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed (exact match compares these)."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    said = normalize_answer(prediction)
    return float(any(said == normalize_answer(r) for r in references))


def _squad_tokens(text: str) -> list[str]:
    """SQuAD's normalisation: punctuation deleted (``well-known`` is ``wellknown``), not spaced."""
    return _ARTICLES.sub(" ", "".join(c for c in text.lower() if c not in string.punctuation)).split()


def token_f1(prediction: str, references: Sequence[str]) -> float:
    """SQuAD's F1 of shared tokens, the best over ``references`` (two empty answers agree)."""
    said = _squad_tokens(prediction)
    best = 0.0
    for reference in references:
        wanted = _squad_tokens(reference)
        if not said or not wanted:
            best = max(best, float(said == wanted))
            continue
        shared = sum((Counter(said) & Counter(wanted)).values())
        if shared:
            precision, recall = shared / len(said), shared / len(wanted)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


@cache
def _treebank() -> Any:
    from nltk.tokenize import TreebankWordTokenizer

    return TreebankWordTokenizer()


def caption_tokens(text: str) -> str:
    """``text`` as COCO's caption metrics read it: Stanford's tokens (``-lowerCase``; brackets as
    ``-lrb-`` etc.) without the punctuation COCO drops."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

    tokens = _treebank().tokenize(text.replace("\n", " "), convert_parentheses=True)
    return " ".join(t for t in _as_stanford(tokens) if t not in PUNCTUATIONS)


def _as_stanford(tokens: list[str]) -> list[str]:
    """Where NLTK's Treebank port and Stanford's tokenizer part: NLTK splits a period only at the
    end of its input (``runs.`` inside a text; Stanford splits it, and keeps ``a.m.``), and leaves
    an opening single quote on its word (Stanford splits it off)."""
    out = []
    for k, token in enumerate(t.lower() for t in tokens):
        if token.startswith("'") and len(token) > 1 and token not in _CLITICS:
            out.append("'")
            token = token[1:]
        if token.endswith(".") and len(token) > 1 and "." not in token[:-1] and k < len(tokens) - 1:
            out += [token[:-1], "."]
        else:
            out.append(token)
    return out


def choose_metrics(setting: str | Sequence[str], references: Sequence[Sequence[str]]) -> tuple[list[str], str]:
    """The metrics to compute and why: ``auto`` picks exact match and F1, plus the caption metrics
    when answers are sentences (median reference of :data:`SENTENCE_WORDS` words or more)."""
    if setting != "auto":
        return [m for m in METRICS if m in setting], "as eval.metrics lists them"
    # per record (its references' mean), so five COCO captions weigh as much as one answer
    words = [statistics.mean(len(r.split()) for r in refs) for refs in references if refs]
    median = statistics.median(words) if words else 0
    if median >= SENTENCE_WORDS:
        return list(METRICS), f"auto: answers are sentences (median reference {median:g} words)"
    return list(SHORT_ANSWER), (f"auto: short answers (median reference {median:g} words; caption metrics "
                                f"from {SENTENCE_WORDS}, or list them in eval.metrics)")


def score_rows(rows: Sequence[dict[str, Any]], names: Sequence[str]) -> None:
    """Fill (or refresh) each row's ``scores`` of ``names`` (and its ``bleu`` counts) from its
    ``prediction`` and ``references``; other scores the row has are kept."""
    for row in rows:
        row.setdefault("scores", {})
        if "exact_match" in names:
            row["scores"]["exact_match"] = exact_match(row["prediction"], row["references"])
        if "f1" in names:
            row["scores"]["f1"] = token_f1(row["prediction"], row["references"])
    if not any(m in names for m in CAPTION) or not rows:
        return
    said = [caption_tokens(r["prediction"]) for r in rows]
    wanted = [[caption_tokens(x) for x in r["references"]] for r in rows]
    if "bleu4" in names:
        from pycocoevalcap.bleu.bleu_scorer import cook_refs, cook_test

        for row, test, refs in zip(rows, said, wanted, strict=True):
            cooked = cook_test(test, cook_refs(refs, n=BLEU_ORDER), eff="closest", n=BLEU_ORDER)
            row["bleu"] = [cooked["testlen"], cooked["reflen"], *cooked["correct"], *cooked["guess"]]
    if "rouge_l" in names:
        from pycocoevalcap.rouge.rouge import Rouge

        rouge = Rouge()
        for row, test, refs in zip(rows, said, wanted, strict=True):
            row["scores"]["rouge_l"] = float(rouge.calc_score([test], refs))
    if "cider" in names:
        from pycocoevalcap.cider.cider import Cider

        keys = range(len(rows))
        if any(ref for refs in wanted for ref in refs):
            _, per_row = Cider().compute_score({k: wanted[k] for k in keys}, {k: [said[k]] for k in keys})
        else:  # no reference has a word: no n-gram to match (pycocoevalcap fails on an empty IDF)
            per_row = [0.0] * len(rows)
        for row, value in zip(rows, per_row, strict=True):
            row["scores"]["cider"] = float(value)


def corpus_values(name: str, rows: Sequence[Mapping[str, Any]], weights: np.ndarray) -> np.ndarray:
    """``name`` over the rows taken ``weights[r, i]`` times each, for every row ``r`` of ``weights``
    (shape: draws x rows); one value per draw. BLEU sums its counts, every other metric averages."""
    weights = np.asarray(weights, dtype=np.float64)
    totals = weights.sum(axis=1)
    if name == "bleu4":
        return bleu_from_counts(weights @ np.array([r["bleu"] for r in rows], dtype=np.float64))
    scores = np.array([r["scores"][name] for r in rows], dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, weights @ scores / np.where(totals > 0, totals, 1), np.nan)


def bleu_from_counts(counts: np.ndarray) -> np.ndarray:
    """BLEU-4 from summed ``[hypothesis length, reference length, correct 1..4, guessed 1..4]``
    counts (one row per corpus), with pycocoevalcap's smoothing constants and brevity penalty."""
    tiny, small = 1e-15, 1e-9
    counts = np.atleast_2d(counts)
    test, ref = counts[:, 0], counts[:, 1]
    correct, guess = counts[:, 2:2 + BLEU_ORDER], counts[:, 2 + BLEU_ORDER:2 + 2 * BLEU_ORDER]
    score = np.prod((correct + tiny) / (guess + small), axis=1) ** (1.0 / BLEU_ORDER)
    ratio = (test + tiny) / (ref + small)
    with np.errstate(divide="ignore", over="ignore"):
        penalty = np.where(ratio < 1, np.exp(1 - 1 / np.maximum(ratio, tiny)), 1.0)
    return score * penalty


def values_over(rows: Sequence[Mapping[str, Any]], names: Sequence[str]) -> dict[str, float]:
    """Each metric over ``rows``, every row taken once."""
    ones = np.ones((1, len(rows)))
    return {name: float(corpus_values(name, rows, ones)[0]) for name in names}


def summarize(rows: Sequence[Mapping[str, Any]], names: Sequence[str]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Each metric over every row, and per record kind (in the order kinds first appear)."""
    overall = values_over(rows, names) if rows else {}
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    return overall, {kind: values_over([r for r in rows if r["kind"] == kind], names) for kind in kinds}


__all__ = ["CAPTION", "METRICS", "SHORT_ANSWER", "bleu_from_counts", "caption_tokens", "choose_metrics",
           "corpus_values", "exact_match", "normalize_answer", "score_rows", "summarize", "token_f1", "values_over"]
