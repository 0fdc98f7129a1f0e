"""The words of the synthetic dataset: ball colours, tone pitches, the questions, the captions,
and the text a tiny model's tokenizer is trained on. A leaf module (nothing of ours imported), so
the tiny models (``models/``) and the dataset generator (``data/``) share it without one importing
the other.
"""

from __future__ import annotations

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 190),
    "orange": (240, 140, 30),
}
PITCHES: dict[str, float] = {"low": 220.0, "middle": 440.0, "high": 880.0, "highest": 1760.0}

QUESTION_COLOUR = "What colour is the ball?"
QUESTION_PITCH = "How high is the tone?"
QUESTION_SECOND = "What colour is the ball in the second picture?"
QUESTION_FIRST = "What colour is the ball in the first picture?"
QUESTION_DESCRIBE_IMAGE = "Describe the picture."
QUESTION_DESCRIBE_VIDEO = "Describe the video."
# Caption sentences per media kind; "{}" is the ball's colour, the only word that varies.
# Lower case, no full stop, 7-10 tokens with the tiny tokenizers.  Not in vocabulary_text():
# that would retrain every tiny tokenizer, whose token ids reference tests pin.
CAPTIONS: dict[str, tuple[str, ...]] = {
    "image": ("a {} ball on a grey background", "there is one {} ball in the picture",
              "the picture shows a {} ball"),
    "video": ("a {} ball moves around", "a {} ball bounces around the video",
              "the video shows a {} ball"),
}

_COLOUR_LIST = ", ".join(COLOURS)
_PITCH_LIST = ", ".join(PITCHES)
QUESTION_COLOUR_AFTER = "Which colour comes after {} in the list " + _COLOUR_LIST + "?"
QUESTION_COLOUR_BEFORE = "Which colour comes before {} in the list " + _COLOUR_LIST + "?"
QUESTION_PITCH_AFTER = "Which tone comes after {} in the list " + _PITCH_LIST + "?"


def vocabulary_text() -> list[str]:
    """Sentences covering every question, answer word and chat word of the dataset.

    Answer words occur many times with a leading space (" red") so a small BPE tokenizer
    trained on this text merges each of them into a single token.
    """
    lines = [
        QUESTION_COLOUR, QUESTION_PITCH, QUESTION_SECOND, QUESTION_FIRST,
        "User: <image>\n" + QUESTION_COLOUR, "User: <video>\n" + QUESTION_COLOUR,
        "User: <speech>\n" + QUESTION_PITCH, "User: <image>\n<image>\n" + QUESTION_SECOND,
        "System: You are a helpful assistant. User: Assistant: <end_of_utterance>",
    ]
    names = list(COLOURS)
    for a, b in zip(names, names[1:], strict=False):
        lines += [QUESTION_COLOUR_AFTER.format(a), QUESTION_COLOUR_BEFORE.format(b)]
    pitches = list(PITCHES)
    lines += [QUESTION_PITCH_AFTER.format(p) for p in pitches[:-1]]
    for word in [*names, *pitches]:
        for _ in range(20):
            lines += [f"Assistant: {word}", f"The answer is {word}.", f"It is {word} and {word}."]
    return lines
