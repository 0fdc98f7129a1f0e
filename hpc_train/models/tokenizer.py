"""A small byte-level BPE tokenizer trained offline, for tiny test and demo models.

Real checkpoints bring their own tokenizer; tiny models need one that exists without any
download and that keeps the demo's answer words as single tokens (a tiny model learns a
one-token answer much faster than a spelled-out one).
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# Sentences that give the BPE merges the shape of ordinary chat text.
_BASE_TEXT = [
    "User: Describe the picture. Assistant: A small scene with a ball on a plain background.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "What is shown in the video? The ball moves from the left to the right and bounces.",
    "Answer with one word. Which colour comes after red in the list?",
    "How many frames are there? There are four frames in this short clip.",
    "system user assistant System: You are a helpful assistant.",
    "Please explain step by step what happens next, then give the answer.",
    "0 1 2 3 4 5 6 7 8 9 10 12 16 32 64 100 seconds frame time t=1.5s",
]


def train_tokenizer(
    special_tokens: list[str],
    *,
    corpus: Iterable[str] = (),
    single_token_words: Iterable[str] = (),
    vocab_size: int = 640,
    bos: str | None,
    eos: str,
    pad: str,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on a small corpus.

    Every word in ``single_token_words`` must come out as one token both with and without a
    leading space (chat templates put answers after ``": "`` or after a newline); the
    vocabulary grows until it does, and an error is raised if it cannot.
    """
    words = sorted(set(single_token_words))
    texts = list(_BASE_TEXT) + list(corpus)
    # Repetition makes each answer word frequent enough to be merged whole.
    texts += [" ".join(f"{w} {w}" for w in words)] * 20
    texts += ["\n".join(words)] * 20
    size = vocab_size
    for _ in range(6):
        tok = _train(texts, special_tokens, size)
        split = [w for w in words for form in (w, f" {w}") if len(tok.encode(form).ids) != 1]
        if not split:
            break
        size += 128
    else:
        raise RuntimeError(f"tokenizer keeps splitting {split}; add them to the corpus")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
        extra_special_tokens=[t for t in special_tokens if t not in (bos, eos, pad)],
    )
    fast.padding_side = "right"
    return fast


def _train(texts: list[str], special_tokens: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok
