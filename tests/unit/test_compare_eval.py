"""compare-eval: the paired bootstrap's coverage, verdicts, pairing by id and the command's outputs.

The inputs are written the way an evaluation writes them: rows scored by ``metrics.score_rows``
and totals by ``metrics.summarize``, saved as eval_results.json in a run folder.
"""

from __future__ import annotations

import argparse
import json
import random

import numpy as np
import pytest

from hpc_train.errors import HpcTrainError
from hpc_train.evaluation import metrics
from hpc_train.evaluation.bootstrap import Difference, draw_counts, paired_bootstrap
from hpc_train.evaluation.compare import HELP, compare_files, main, register

ANSWERS = ["red", "blue", "green", "yellow", "ball", "cube", "left", "right", "up", "down"]
SCENES = ["a red ball rolls across the wooden table", "a small blue cube slides to the left side",
          "the green ball bounces twice near the wall", "a yellow cube falls off the edge of the shelf",
          "two balls roll toward each other and stop"]


def short_rows(n: int, right: float, seed: int) -> list[dict]:
    """``n`` short-answer records of two kinds; the system answers a share ``right`` of them."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        answer = ANSWERS[i % len(ANSWERS)]
        said = answer if rng.random() < right else ANSWERS[(i + 3) % len(ANSWERS)]
        rows.append({"id": f"r{i}", "kind": "image" if i % 3 else "video", "prediction": said,
                     "references": [answer]})
    return rows


def caption_rows(n: int, seed: int) -> list[dict]:
    """Sentence records, every other prediction a mangled caption, so BLEU and CIDEr vary."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        refs = [SCENES[i % len(SCENES)], SCENES[(i + 1) % len(SCENES)]]
        words = refs[0].split()
        if rng.random() < 0.5:
            rng.shuffle(words)
            words = words[: rng.randint(3, len(words))]
        rows.append({"id": f"c{i}", "kind": ("image", "video")[i % 2], "prediction": " ".join(words),
                     "references": refs})
    return rows


def write_eval(folder, rows: list[dict], names=metrics.METRICS):
    rows = [dict(r) for r in rows]
    metrics.score_rows(rows, names)
    overall, by_kind = metrics.summarize(rows, names)
    payload = {"mode": "qlora", "model": "tiny", "data": "eval.jsonl", "step": 100, "metrics": overall,
               "metrics_by_kind": by_kind, "records": rows}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "eval_results.json"
    path.write_text(json.dumps(payload))
    return path


def line(comparison, metric: str, kind: str = "all"):
    return next(x for x in comparison.lines if x.metric == metric and x.kind == kind)


@pytest.mark.parametrize("kind", ["normal", "bernoulli"])
def test_the_interval_covers_the_true_difference_in_about_95_percent_of_trials(kind):
    rng = np.random.default_rng(7)
    trials, n, covered = 200, 200, 0
    for trial in range(trials):
        if kind == "normal":  # correlated scores, true mean difference 0.05
            a = rng.normal(0.5, 0.2, n)
            b, true = a + 0.05 + rng.normal(0.0, 0.1, n), 0.05
        else:  # B keeps A's answer 80% of the time, else is right with p 0.7: 0.54 - 0.5
            a = (rng.random(n) < 0.5).astype(float)
            b, true = np.where(rng.random(n) < 0.8, a, (rng.random(n) < 0.7).astype(float)), 0.04
        rows_a = [{"scores": {"f1": x}} for x in a]
        rows_b = [{"scores": {"f1": x}} for x in b]
        diff = paired_bootstrap(rows_a, rows_b, ["f1"], seed=trial)["f1"]
        assert diff.value == pytest.approx(b.mean() - a.mean())
        covered += diff.low <= true <= diff.high
    assert 0.90 <= covered / trials <= 0.99


def test_draw_counts_takes_every_draw_whole_in_chunks():
    chunks = list(draw_counts(7, 25, np.random.default_rng(0), chunk_cells=7 * 10))
    assert [c.shape for c in chunks] == [(10, 7), (10, 7), (5, 7)]
    assert all((c.sum(axis=1) == 7).all() for c in chunks)


def test_difference_verdicts():
    assert Difference(0.1, 0.02, 0.2, 10).verdict == "better"
    assert Difference(-0.1, -0.2, -0.01, 10).verdict == "worse"
    assert Difference(0.0, -0.1, 0.1, 10).within_noise
    # BLEU's smoothing: two systems without a matching 4-gram differ by ~1e-5, which is no difference
    assert Difference(3e-5, 2e-5, 4e-5, 10).verdict == "within noise"


def test_one_word_answers_score_no_bleu_difference(tmp_path):
    a = write_eval(tmp_path / "a", short_rows(40, 0.05, seed=3))
    b = write_eval(tmp_path / "b", short_rows(40, 0.9, seed=3))
    (comparison,) = compare_files([a, b], resamples=200)
    assert line(comparison, "exact_match").verdict == "better"
    assert line(comparison, "bleu4").verdict == "within noise"


def test_a_kind_with_few_records_gets_no_verdict(tmp_path):
    rows = short_rows(40, 0.1, seed=4)
    rows[0]["kind"] = "audio"  # one audio record, answered right only by b
    better = [dict(r, prediction=r["references"][0]) for r in rows]
    (comparison,) = compare_files([write_eval(tmp_path / "a", rows), write_eval(tmp_path / "b", better)],
                                  resamples=100)
    assert line(comparison, "exact_match", "audio").verdict == "too few records"
    assert line(comparison, "exact_match").verdict == "better"
    assert any("fewer than 10 paired records" in n for n in comparison.notes)


def test_identical_files_differ_by_nothing(tmp_path):
    rows = caption_rows(40, seed=1)
    paths = [write_eval(tmp_path / name, rows) for name in ("base", "same")]
    (comparison,) = compare_files(paths, resamples=200)
    assert comparison.metrics == metrics.METRICS
    assert {x.kind for x in comparison.lines} == {"all", "image", "video"}
    for x in comparison.lines:
        assert (x.difference.value, x.difference.low, x.difference.high) == (0.0, 0.0, 0.0)
        assert x.difference.verdict == "within noise"


def test_a_clearly_better_system_is_better_and_reversed_worse(tmp_path):
    weak = write_eval(tmp_path / "weak", short_rows(300, 0.3, seed=1), metrics.SHORT_ANSWER)
    strong = write_eval(tmp_path / "strong", short_rows(300, 0.9, seed=2), metrics.SHORT_ANSWER)
    (up,) = compare_files([weak, strong])
    (down,) = compare_files([strong, weak])
    for metric in metrics.SHORT_ANSWER:
        for kind in ("all", "image", "video"):
            assert line(up, metric, kind).difference.verdict == "better"
            assert line(up, metric, kind).difference.low > 0
            assert line(down, metric, kind).difference.verdict == "worse"
            assert line(down, metric, kind).difference.high < 0
    exact = line(up, "exact_match")
    assert exact.difference.value == pytest.approx(exact.other - exact.baseline)
    assert 0.5 < exact.difference.value < 0.7


def test_bleu_is_recomputed_from_summed_counts(tmp_path):
    rows_b = caption_rows(50, seed=3)
    paths = [write_eval(tmp_path / "a", caption_rows(50, seed=2)), write_eval(tmp_path / "b", rows_b)]
    (comparison,) = compare_files(paths, resamples=300)
    bleu = line(comparison, "bleu4")
    base, other = (json.loads(p.read_text())["records"] for p in paths)
    ones = np.ones((1, 50))
    assert bleu.baseline == pytest.approx(metrics.corpus_values("bleu4", base, ones)[0])
    assert bleu.other == pytest.approx(json.loads(paths[1].read_text())["metrics"]["bleu4"])
    assert bleu.difference.value == pytest.approx(metrics.corpus_values("bleu4", other, ones)[0]
                                                  - metrics.corpus_values("bleu4", base, ones)[0])
    # a corpus value, not the mean of sentence BLEUs
    per_record = metrics.bleu_from_counts(np.array([r["bleu"] for r in other], dtype=float)).mean()
    assert bleu.other != pytest.approx(per_record)
    assert bleu.difference.low <= bleu.difference.value <= bleu.difference.high


def test_records_are_paired_by_id_whatever_their_order(tmp_path):
    rows_a, rows_b = short_rows(60, 0.5, seed=1), short_rows(60, 0.7, seed=2)
    a = write_eval(tmp_path / "a", rows_a, metrics.SHORT_ANSWER)
    b = write_eval(tmp_path / "b", rows_b, metrics.SHORT_ANSWER)
    shuffled = json.loads(b.read_text())
    random.Random(0).shuffle(shuffled["records"])
    (tmp_path / "b2").mkdir()
    (tmp_path / "b2" / "eval_results.json").write_text(json.dumps(shuffled))
    (straight,) = compare_files([a, b], ["a", "b"], resamples=300)
    (mixed,) = compare_files([a, tmp_path / "b2"], ["a", "b"], resamples=300)
    assert [x.to_dict() for x in straight.lines] == [x.to_dict() for x in mixed.lines]


def test_a_partial_overlap_is_compared_on_the_common_ids_and_said(tmp_path):
    rows = short_rows(60, 0.5, seed=1)
    a = write_eval(tmp_path / "a", rows[:50], metrics.SHORT_ANSWER)
    b = write_eval(tmp_path / "b", rows[5:], metrics.SHORT_ANSWER)
    (comparison,) = compare_files([a, b], resamples=100)
    assert comparison.paired == 45 and comparison.left_out == (5, 10)
    assert line(comparison, "f1").records == 45
    assert any("5 of a's 50 records and 10 of b's 55" in n and "45 paired" in n for n in comparison.notes)


def test_cider_is_scored_again_over_the_paired_records(tmp_path):
    """Each file's CIDEr had the IDF of its own set; over the common records both get theirs."""
    rows = caption_rows(40, seed=2)
    a = write_eval(tmp_path / "a", rows)
    b = write_eval(tmp_path / "b", rows[10:])
    (comparison,) = compare_files([a, b], resamples=50)
    alone = [dict(r) for r in rows[10:]]
    metrics.score_rows(alone, ["cider"])
    expected = metrics.summarize(alone, ["cider"])[0]["cider"]
    assert line(comparison, "cider").baseline == pytest.approx(expected) == line(comparison, "cider").other
    assert line(comparison, "cider").difference.value == pytest.approx(0.0, abs=1e-12)
    other_refs = [dict(r, references=["something else entirely"]) for r in rows]
    (comparison,) = compare_files([a, write_eval(tmp_path / "c", other_refs)], resamples=50)
    assert any("40 paired records have other references" in n for n in comparison.notes)


def test_metrics_only_one_file_computed_are_skipped_with_a_note(tmp_path):
    rows = caption_rows(20, seed=1)
    a = write_eval(tmp_path / "a", rows, metrics.METRICS)
    b = write_eval(tmp_path / "b", rows, ("exact_match", "bleu4"))
    (comparison,) = compare_files([a, b], resamples=50)
    assert comparison.metrics == ("exact_match", "bleu4")
    assert comparison.skipped == {"f1": "only in a", "rouge_l": "only in a", "cider": "only in a"}
    assert "f1 not compared: only in a" in comparison.notes


def test_unusable_inputs_name_the_file_and_a_fix(tmp_path):
    good = write_eval(tmp_path / "good", short_rows(10, 0.5, seed=1), metrics.SHORT_ANSWER)
    old = tmp_path / "old" / "eval_results.json"
    old.parent.mkdir()
    old.write_text(json.dumps({"mode": "qlora", "accuracy": 0.4}))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    other = [dict(r, id=f"x{i}") for i, r in enumerate(short_rows(10, 0.5, seed=1))]
    elsewhere = write_eval(tmp_path / "elsewhere", other, metrics.SHORT_ANSWER)
    cases = [([good, tmp_path / "nowhere"], "nowhere", "Fix: pass an eval_results.json"),
             ([good, old], str(old), "re-run `hpc-train eval`"),
             ([good, broken], str(broken), "not readable as JSON"),
             ([good], str(good), "Fix: pass the baseline"),
             ([good, elsewhere], str(elsewhere), "no record id in common")]
    for paths, named, fix in cases:
        with pytest.raises(HpcTrainError) as caught:
            compare_files(paths, resamples=10)
        assert named in str(caught.value) and fix in str(caught.value)
        assert "Fix:" in str(caught.value)


def test_the_command_prints_the_table_and_writes_json_and_a_plot(tmp_path, capsys):
    base = write_eval(tmp_path / "baseline", caption_rows(30, seed=1))
    tuned = write_eval(tmp_path / "qlora", caption_rows(30, seed=2))
    out_json, out_png = tmp_path / "out" / "cmp.json", tmp_path / "out" / "cmp.png"
    assert main([str(base.parent), str(tuned), "--resamples", "100", "--json", str(out_json),
                 "--plot", str(out_png)]) == 0
    text = capsys.readouterr().out
    header = text.splitlines()[1].split()
    assert header == ["metric", "kind", "records", "baseline", "qlora", "difference", "95%", "interval", "verdict"]
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(out_json.read_text())
    assert saved["resamples"] == 100 and saved["baseline"]["label"] == "baseline"
    (comparison,) = saved["comparisons"]
    assert comparison["label"] == "qlora" and comparison["paired_records"] == 30
    assert comparison["kinds"] == ["image", "video"] and len(comparison["rows"]) == 5 * 3
    assert set(comparison["rows"][0]) == {"metric", "kind", "records", "baseline", "other", "difference", "low",
                                          "high", "draws", "verdict"}
    assert main([str(base), str(tuned), "--labels", "before,after", "--markdown", "--resamples", "50"]) == 0
    assert "| metric | kind | records | before | after | difference | 95% interval | verdict |" \
        in capsys.readouterr().out
    assert main([str(base)]) == 2
    assert "Fix:" in capsys.readouterr().err


def test_register_adds_the_subcommand():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    register(sub)
    args = parser.parse_args(["compare-eval", "a", "b"])
    assert (args.resamples, args.seed, args.plot, args.json, args.markdown) == (1000, 0, None, None, False)
    assert callable(args.func)
    assert sub.choices["compare-eval"].description == HELP
