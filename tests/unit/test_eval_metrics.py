"""The answer metrics against hand-computed values and the libraries' published examples,
multi-reference scoring, the per-kind split, auto's choice and the ``references`` field."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.bleu.bleu_scorer import cook_refs, cook_test
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from hpc_train.data.sources.records import read_records
from hpc_train.errors import DataError
from hpc_train.evaluation.metrics import (
    METRICS,
    bleu_from_counts,
    caption_tokens,
    choose_metrics,
    corpus_values,
    exact_match,
    score_rows,
    summarize,
    token_f1,
)
from hpc_train.train.evaluate import EvalResult
from hpc_train.train.generation import references_of


def rows_of(*items: tuple[str, str, list[str]]) -> list[dict]:
    return [{"id": f"r{i}", "kind": kind, "prediction": said, "references": refs}
            for i, (kind, said, refs) in enumerate(items)]


def test_exact_match_takes_any_reference_after_normalisation():
    assert exact_match("A red ball.", ["a blue ball", "a  RED ball"]) == 1.0
    assert exact_match("a red ball", ["a red balls"]) == 0.0


def test_token_f1_is_squads_by_hand():
    # articles and punctuation go: [cat, sat, on, mat] vs [cat, on, mat]: P 3/4, R 1
    assert token_f1("The cat sat on the mat.", ["a cat on a mat"]) == pytest.approx(2 * 0.75 / 1.75)
    assert token_f1("cat", ["dog", "cat cat"]) == pytest.approx(2 * 1 * 0.5 / 1.5)  # best reference
    assert token_f1("the", ["a"]) == 1.0 and token_f1("", ["dog"]) == 0.0  # both empty agree
    assert token_f1("a well-known dog", ["wellknown dog"]) == 1.0  # punctuation deleted, as SQuAD does


def test_caption_tokens_follow_treebank_rules_without_punctuation():
    assert caption_tokens('A man\'s dog (brown) doesn\'t run, "fast"...') == "a man 's dog -lrb- brown -rrb- does n't run fast"
    assert caption_tokens("A dog runs. A cat sits at 10 a.m. today.") == "a dog runs a cat sits at 10 a.m. today"


def test_bleu4_by_hand_and_as_pycocoevalcap_scores_a_corpus():
    # clipped n-gram precisions 5/6, 3/5, 2/4, 1/3, equal lengths: no brevity penalty
    rows = rows_of(("image", "the cat sat on the mat", ["the cat sat on a mat"]))
    score_rows(rows, ["bleu4"])
    assert corpus_values("bleu4", rows, np.ones((1, 1)))[0] == pytest.approx((5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25)
    rows = rows_of(("image", "a red ball on a grey floor", ["a red ball", "the red ball on the floor"]),
                   ("video", "a ball", ["a green ball moving around", "one ball"]),
                   ("image", "two dogs run", ["two dogs are running in the park"]))
    score_rows(rows, ["bleu4"])
    gts = {k: [caption_tokens(x) for x in r["references"]] for k, r in enumerate(rows)}
    res = {k: [caption_tokens(r["prediction"])] for k, r in enumerate(rows)}
    expected = Bleu(4).compute_score(gts, res, verbose=0)[0][3]
    assert corpus_values("bleu4", rows, np.ones((1, 3)))[0] == pytest.approx(expected, rel=1e-12)


def test_bleu_counts_give_the_published_example():
    """The BLEU paper's example as NLTK's sentence_bleu documents it: 0.5045..."""
    hypothesis = ("It is a guide to action which ensures that the military always obeys the commands of "
                  "the party")
    references = ["It is a guide to action that ensures that the military will forever heed Party commands",
                  "It is the guiding principle which guarantees the military forces always being under the "
                  "command of the Party",
                  "It is the practical guide for the army always to heed the directions of the party"]
    cooked = cook_test(hypothesis, cook_refs(references), eff="closest")
    counts = np.array([cooked["testlen"], cooked["reflen"], *cooked["correct"], *cooked["guess"]], dtype=float)
    assert bleu_from_counts(counts)[0] == pytest.approx(0.5045666840058485, abs=1e-9)


def test_rouge_l_by_hand_and_on_rouge_scores_published_example():
    beta2 = 1.2 ** 2
    # LCS(a b c d, a c d e f) = 3: P 3/4, R 3/5
    assert Rouge().calc_score(["a b c d"], ["a c d e f"]) == pytest.approx(
        (1 + beta2) * 0.75 * 0.6 / (0.6 + beta2 * 0.75))
    # rouge-score's README: rougeL precision 0.625, recall 0.5556 for these two; COCO weighs them by beta 1.2
    rows = rows_of(("image", "The quick brown dog jumps on the log.", ["The quick brown fox jumps over the lazy dog"]))
    score_rows(rows, ["rouge_l"])
    p, r = 0.625, 5 / 9
    assert rows[0]["scores"]["rouge_l"] == pytest.approx((1 + beta2) * p * r / (r + beta2 * p))


def test_cider_d_by_hand():
    """Two records with disjoint words (every n-gram's IDF is log 2): an exact copy scores 10;
    a copy one word short has cosines 4/(2*sqrt5), 3/(sqrt3*2), 2/(sqrt2*sqrt3), 1/sqrt2 and
    the length penalty of one bigram (exp(-1/72))."""
    rows = rows_of(("image", "a b c d", ["a b c d e"]), ("image", "f g h i", ["f g h i"]))
    score_rows(rows, ["cider"])
    cosines = [4 / (2 * math.sqrt(5)), 3 / (math.sqrt(3) * 2), 2 / (math.sqrt(2) * math.sqrt(3)), 1 / math.sqrt(2)]
    assert rows[0]["scores"]["cider"] == pytest.approx(10 * np.mean(cosines) * math.exp(-1 / 72))
    assert rows[1]["scores"]["cider"] == pytest.approx(10.0)
    gts = {k: [caption_tokens(x) for x in r["references"]] for k, r in enumerate(rows)}
    res = {k: [caption_tokens(r["prediction"])] for k, r in enumerate(rows)}
    assert summarize(rows, ["cider"])[0]["cider"] == pytest.approx(Cider().compute_score(gts, res)[0])


def test_every_reference_counts():
    one = rows_of(("image", "a dog runs on the grass", ["a cat sleeps"]), ("image", "x y", ["z w"]))
    many = rows_of(("image", "a dog runs on the grass", ["a cat sleeps", "a dog runs on the grass"]),
                   ("image", "x y", ["z w"]))
    for rows in (one, many):
        score_rows(rows, METRICS)
    first, second = summarize(one, METRICS)[0], summarize(many, METRICS)[0]
    assert all(second[m] > first[m] for m in METRICS)
    assert many[0]["scores"]["exact_match"] == 1.0 and many[0]["scores"]["f1"] == 1.0


def test_per_kind_values_are_the_kinds_own_corpora():
    rows = rows_of(("image", "a red ball", ["a red ball", "one red ball"]),
                   ("video", "a ball moving", ["a green ball moving around"]),
                   ("image", "a blue cube", ["a blue ball"]), ("video", "the video", ["a ball bounces"]))
    score_rows(rows, METRICS)
    overall, by_kind = summarize(rows, METRICS)
    assert list(by_kind) == ["image", "video"]
    for kind, values in by_kind.items():
        alone = [r for r in rows if r["kind"] == kind]
        assert values["bleu4"] == pytest.approx(corpus_values("bleu4", alone, np.ones((1, 2)))[0])
        assert values["exact_match"] == np.mean([r["scores"]["exact_match"] for r in alone])
    assert overall["exact_match"] == 0.25
    # CIDEr's IDF is the whole set's: the kinds' values average to the overall one
    assert np.mean([v["cider"] for v in by_kind.values()]) == pytest.approx(overall["cider"])


def test_weights_resample_records():
    rows = rows_of(("image", "a b", ["a b"]), ("image", "c", ["d"]))
    score_rows(rows, ["exact_match", "bleu4"])
    weights = np.array([[2, 0], [0, 2], [1, 1]])
    assert corpus_values("exact_match", rows, weights).tolist() == [1.0, 0.0, 0.5]
    bleu = corpus_values("bleu4", rows, weights)
    assert bleu[0] == pytest.approx(corpus_values("bleu4", rows[:1], np.ones((1, 1)))[0]) and bleu[1] < 1e-6


def test_auto_picks_caption_metrics_for_sentences():
    names, why = choose_metrics("auto", [["red"], ["blue", "dark blue"]])
    assert names == ["exact_match", "f1"] and "short answers" in why
    names, why = choose_metrics("auto", [["a red ball on a grey background"], ["a ball bounces across the video"]])
    assert names == list(METRICS) and "sentences" in why
    assert choose_metrics(["cider", "f1"], [["x"]])[0] == ["f1", "cider"]


def test_eval_result_keeps_accuracy_as_exact_match_by_kind():
    result = EvalResult()
    rows = rows_of(("image", "Red.", ["red"]), ("audio", "low", ["high"]), ("image", "blue", ["green"]))
    result.scored(["cider"], rows, {"records": 3})
    assert result.metrics.keys() == {"cider"} and result.accuracy == pytest.approx(1 / 3)
    assert result.accuracy_by_kind == {"image": 0.5, "audio": 0.0} and result.correct == 1
    assert set(result.metrics_by_kind) == {"image", "audio"}
    assert json.loads(json.dumps(result.to_dict()))["records"][0]["scores"]["exact_match"] == 1.0


def test_references_field_is_read_and_checked(tmp_path):
    good = {"id": "a", "conversations": [{"from": "human", "value": "Describe it."},
                                         {"from": "gpt", "value": "a red ball"}],
            "references": ["one red ball", "a red ball"]}
    path = tmp_path / "d.jsonl"
    lines = [good, {**good, "id": "b", "references": ["ok", ""]}, {**good, "id": "c", "references": "one"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    records = read_records(path)
    assert records[0].references == ("one red ball", "a red ball")
    assert references_of(records[0]) == ["a red ball", "one red ball"]  # the last answer first, each once
    for i in (1, 2):
        with pytest.raises(DataError, match=rf"d.jsonl:{i + 1} .*'references' must be a non-empty list.*Fix:"):
            records[i]


def test_generation_estimate_warns_of_hours_and_progress_follows(capsys):
    from hpc_train.dist import DistInfo
    from hpc_train.train.generation import _Progress

    progress = _Progress(DistInfo(), batches=400, max_new_tokens=120)
    progress.batch_done(12.0)  # 400 batches of 12 s: 80 min
    progress.batch_done(20.0)
    progress.batch_done(45.0)
    said = capsys.readouterr().out.splitlines()
    assert said[0].startswith("generate: the first of 400 batches per rank took 12.0 s; all of them will take "
                              "about 1.3 h -- hours. To shorten it:") and "eval.max_new_tokens, now 120" in said[0]
    assert said[1:] == ["generate: 3/400 batches, about 1.7 h left"]
    quick = _Progress(DistInfo(), batches=10, max_new_tokens=8)
    quick.batch_done(0.5)  # 5 s in all: nothing worth saying
    assert capsys.readouterr().out == ""


def test_compare_eval_is_a_command():
    from hpc_train.cli import build_parser

    args = build_parser().parse_args(["compare-eval", "a", "b", "--resamples", "50"])
    assert args.results == ["a", "b"] and args.resamples == 50 and callable(args.func)


PTB_CASES = ["a dog runs. a cat sits.", "'hi' she said", "a toy (red) on the mat", "Is it? Yes! ok",
             "A man's dog (brown) doesn't run, \"fast\"...", "A well-known chef cooks 3.5 kg of rice; then leaves.",
             "Two people -- a man and a woman -- walk.", "e-mail me at 10:30 a.m. please",
             "It's 5 o'clock & the cafe's open!", "They're playing 'catch' in the U.S. park.",
             "A man walks in. He sits down. Then he reads [a book] and {smiles}.",
             "A woman is cutting an onion.\nShe puts it in a pan.", "the kids' toys are 50% off; buy 2 get 1 free!"]


@pytest.mark.skipif(shutil.which("java") is None, reason="COCO's own tokenizer is a Java program")
def test_caption_tokens_are_cocos_java_tokenizers():
    """The Python tokens equal those of the Stanford jar pycocoevalcap ships, on multi-sentence
    captions, quotes, brackets, abbreviations with inner periods and clitics (titles such as
    'Mr.' keep their period there and lose it here: README, Evaluation)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    java = PTBTokenizer().tokenize({k: [{"caption": text}] for k, text in enumerate(PTB_CASES)})
    assert [caption_tokens(text) for text in PTB_CASES] == [java[k][0] for k in range(len(PTB_CASES))]


def test_generation_answers_in_record_order_and_skips_what_cannot_be_read(loaded_tiny, synthetic_data, tmp_path,
                                                                          capsys):
    """The first batch's two records have no image file: they are said and counted, that batch's
    generate call runs on a placeholder (every rank must join it), and the rest answer in order."""
    import torch

    from hpc_train.config import DataConfig
    from hpc_train.data.pipeline import build_pipeline
    from hpc_train.dist import DistInfo
    from hpc_train.models.families import get_family
    from hpc_train.train.generation import generate_answers

    lines = [json.loads(x) for x in (synthetic_data / "eval.jsonl").read_text().splitlines()]
    broken = [r for r in lines if r["kind"] == "image"][:2]
    for r in broken:
        r["image"] = "media/images/missing.png"
    rest = [r for r in lines if r not in broken]
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in broken + rest))
    records = list(read_records(path, media_root=synthetic_data, check_media_exists=False))
    model, processor = loaded_tiny["smolvlm"]
    pipeline = build_pipeline(DataConfig(video={"num_frames": 4}), processor, get_family("smolvlm"))
    made = generate_answers(model, records, pipeline, DistInfo(), torch.device("cpu"), batch_size=2,
                            max_new_tokens=None, synced=False)
    assert [r["id"] for r in made.rows] == [r["id"] for r in rest] and made.skipped == 2
    assert made.rows[0]["references"] == [rest[0]["answer"]]
    assert 0 < made.new_tokens <= len(rest) * made.max_new_tokens
    assert capsys.readouterr().out.count("generate: skipped") == 2
