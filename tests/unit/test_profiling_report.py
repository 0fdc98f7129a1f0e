"""The JSON report: building, merging ranks, schema validation, round trip, docs coverage."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from hpc_train.config_file import load_config
from hpc_train.dist import DistInfo
from hpc_train.train.evaluate import EvalResult
from hpc_train.train.generation import Generation
from hpc_train.train.profile_report import describe_run
from profiling.environment import collect_environment
from profiling.flops import Trainability, peak_tflops, shape_of
from profiling.profiler import Profiler
from profiling.report import (
    ReportError,
    build_rank_report,
    flops_section,
    merge_reports,
    read_report,
    validate,
    write_json,
)
from profiling.timers import StepRecord
from tests.conftest import FAMILIES

PROFILING_DOCS = Path(__file__).resolve().parents[2] / "docs" / "profiling.md"
MEMORY = {"gpu_peak_allocated_gib": None, "gpu_peak_reserved_gib": None, "gpu_total_gib": None,
          "host_peak_rss_gib": 1.5}


def records(step_ms: list[float], *, tokens: int = 100, backward: bool = True) -> list[StepRecord]:
    phases = {"data_wait": 1.0, "forward": 3.0, **({"backward": 4.0, "optimizer": 1.0} if backward else {})}
    return [StepRecord(ms, dict(phases), samples=4, tokens=tokens, slot_tokens=128, images=2) for ms in step_ms]


def rank_report(rank: int, step_ms: list[float], *, world: int = 2, host: str = "node-a",
                workload: str = "training", memory: dict | None = None) -> dict:
    recs = records(step_ms, backward=workload == "training")
    return build_rank_report(recs, warmup_excluded=1, rank=rank, local_rank=rank, world_size=world, host=host,
                             device="cpu", device_name="cpu", workload=workload, memory=memory or MEMORY,
                             flops=flops_section(recs, None, Trainability(), peak_tflops(None, "bf16")),
                             wall_s={"total": 9.0, "epochs": [{"epoch": 0, "steps": len(step_ms) + 1, "wall_s": 1}]})


def merged(run: dict | None = None, environment: dict | None = None) -> dict:
    ranks = [rank_report(0, [10.0, 12.0, 11.0], host="node-a"),
             rank_report(1, [14.0, 9.0, 13.0], host="node-b", memory={**MEMORY, "host_peak_rss_gib": 2.5})]
    return merge_reports(ranks, run=run or {"mode": "lora", "model": "m"}, environment=environment or {"torch": "2"})


def test_rank_report_statistics():
    report = rank_report(0, [10.0, 20.0, 30.0, 40.0])
    assert report["step_ms"]["mean"] == 25.0 and report["step_ms"]["median"] == 25.0
    assert report["steps"] == {"seen": 5, "warmup_excluded": 1, "measured": 4, "first": 1, "last": 5}
    assert report["totals"]["tokens"] == 400 and report["totals"]["measured_s"] == pytest.approx(0.1)
    assert report["throughput"]["tokens_per_s"] == pytest.approx(4000.0)
    assert report["throughput"]["images_per_s"] == pytest.approx(80.0)
    assert report["padding_efficiency"] == pytest.approx(100 / 128)
    assert report["phase_coverage"] == pytest.approx(9 * 4 / 100)
    assert list(report["phases_ms"]) == ["data_wait", "forward", "backward", "optimizer"]


def test_merge_names_the_slowest_rank_and_sums_throughput():
    report = merged()
    assert report["kind"] == "report" and report["run"]["world_size"] == 2 and report["run"]["nodes"] == 2
    assert report["environment"]["hosts"] == ["node-a", "node-b"]
    assert report["slowest_rank"]["rank"] == 1 and report["slowest_rank"]["host"] == "node-b"
    assert report["slowest_rank"]["fastest_rank"] == 0
    # a step lasts as long as its slowest rank: per-step maxima 14, 12, 13
    assert report["step_ms"]["mean"] == pytest.approx(13.0) and report["step_ms"]["max"] == 14.0
    assert report["throughput"]["tokens_per_s"] == pytest.approx(600 / 0.036)
    assert report["memory"]["host_peak_rss_gib"] == 2.5 and report["memory"]["gpu_peak_allocated_gib"] is None
    assert [r["rank"] for r in report["per_rank"]] == [0, 1] and "series" not in report["per_rank"][0]
    validate(report, "report")


def test_merge_notes_ranks_with_different_step_counts():
    report = merge_reports([rank_report(0, [10.0, 12.0, 11.0]), rank_report(1, [9.0, 13.0])], run={},
                           environment={})
    assert report["step_ms"]["count"] == 2 and report["step_ms"]["max"] == 13.0
    assert report["notes"] == ["ranks measured different numbers of steps (3, 2); step_ms takes the per-step "
                               "maximum over the first 2"]
    assert merged()["notes"] == []


def test_merge_refuses_missing_or_mixed_ranks():
    with pytest.raises(ReportError, match=r"do not cover ranks 0..2"):
        merge_reports([rank_report(0, [1.0], world=3), rank_report(2, [1.0], world=3)], run={}, environment={})
    with pytest.raises(ReportError, match="mix workloads"):
        merge_reports([rank_report(0, [1.0]), rank_report(1, [1.0], workload="evaluation")], run={},
                      environment={})


def test_json_round_trip(tmp_path):
    report = merged()
    path = write_json(tmp_path / "profile" / "report.json", report)
    assert read_report(path) == json.loads(json.dumps(report))
    assert not list(path.parent.glob(".report.json.*"))  # no temporary left behind


@pytest.mark.parametrize(("edit", "message"), [
    (lambda r: r.pop("throughput"), "field 'throughput' is missing"),
    (lambda r: r.update(schema_version=99), "schema_version is 99; this hpc-profile reads version 1"),
    (lambda r: r.update(step_ms={"mean": 1.0}), r"step_ms.count is missing"),
    (lambda r: r.update(workload="inference"), "workload 'inference'"),
    (lambda r: r["per_rank"][1].pop("host"), r"per_rank\[1\]: field 'host' is missing"),
    (lambda r: r.update(per_rank={}), "field 'per_rank' has type dict"),
])
def test_validation_names_the_bad_field(tmp_path, edit, message):
    report = merged()
    edit(report)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(report))
    with pytest.raises(ReportError, match=message) as err:
        read_report(path)
    assert str(path) in str(err.value)


def test_unreadable_files_get_clear_errors(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{\n  "schema_version": 1,\n  oops\n}')
    with pytest.raises(ReportError, match=r"broken.json:3: not valid JSON"):
        read_report(broken)
    rank = tmp_path / "rank0.json"
    write_json(rank, rank_report(0, [1.0]))
    with pytest.raises(ReportError, match="is a 'rank' file, expected 'report'.*hpc-profile merge"):
        read_report(rank)
    other = tmp_path / "metrics.json"
    other.write_text('{"loss": 1.0}')
    with pytest.raises(ReportError, match="is this a profiling report"):
        read_report(other)
    with pytest.raises(ReportError, match="cannot read"):
        read_report(tmp_path / "missing.json")
    hollow = rank_report(0, [1.0])
    hollow["series"] = {}
    write_json(rank, hollow)
    with pytest.raises(ReportError, match="series.step_ms must be a list of numbers"):
        read_report(rank, "rank")


def report_fields(report: dict) -> set[str]:
    """Dotted field names of a report, with per-phase and per-stat levels collapsed."""
    names: set[str] = set()

    def walk(value: object, path: str) -> None:
        if path:
            names.add(path)
        if isinstance(value, dict) and not path.endswith(("phases_ms", "step_ms")):
            for key, sub in value.items():
                walk(sub, f"{path}.{key}" if path else key)

    walk(report, "")
    return names


def test_docs_document_every_report_field(loaded_tiny):
    report = merged(run=describe_run(load_config("tiny_smolvlm"), DistInfo(), zero_stage=2, planned_steps=10,
                                     packing_efficiency=0.9),
                    environment=collect_environment(torch.device("cpu"), Path(__file__).parent))
    shape = shape_of(loaded_tiny["smolvlm"][0].config)
    report["flops"] = flops_section(records([5.0]), shape, Trainability(), peak_tflops(None, "bf16"))
    evaluated = EvalResult(loss=1.0, perplexity=2.7, samples=2)
    evaluated.scored("auto", [{"id": "a", "kind": "image", "prediction": "red", "references": ["red"]}],
                     Generation(seconds=1.0).summary())
    report["evaluation"] = evaluated.report_section()
    text = PROFILING_DOCS.read_text()
    section = text[text.index("## The profiling report"):]
    end = section.find("\n## ", 4)
    section = section if end < 0 else section[:end]
    documented = set(re.findall(r"`([a-z_0-9.]+)`", section))
    missing = sorted(f for f in report_fields(report) | report_fields(rank_report(0, [1.0]))
                     if f not in documented and not f.startswith(("wall_s.epochs", "per_rank.", "evaluation.metrics.",
                                                                  "evaluation.metrics_by_kind.")))
    assert not missing, f"docs/profiling.md's profiling report section lacks: {missing}"


class Tower(torch.nn.Module):
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return pixel_values.flatten(1).sum(1)


def test_profiler_counts_images_in_forward_only_and_times_sections():
    profiler = Profiler(torch.device("cpu"), warmup_steps=0)
    tower = Tower()
    profiler.count_images(tower)
    with profiler.section("setup"):
        tower(torch.zeros(5, 3, 4, 4))  # not in a step's forward: not counted
    for epoch, frames in ((0, 3), (0, 2), (1, 4)):
        profiler.step_begin()
        with profiler.phase("forward"):
            tower(pixel_values=torch.zeros(frames, 3, 4, 4))
        with profiler.phase("backward"):
            tower(torch.zeros(7, 3, 4, 4))  # gradient-checkpointing recompute: not counted
        profiler.step_done(samples=1, tokens=10, slot_tokens=10, epoch=epoch)
    report = profiler.rank_report()
    assert [r.images for r in profiler.timer.records] == [3, 2, 4]
    assert report["totals"]["images"] == 9
    assert [(e["epoch"], e["steps"]) for e in report["wall_s"]["epochs"]] == [(0, 2), (1, 1)]
    assert report["wall_s"]["setup"] >= 0 and report["wall_s"]["total"] >= report["wall_s"]["setup"]
    assert report["flops"]["mfu"] is None and "described" in " ".join(report["flops"]["notes"])
    assert report["memory"]["host_peak_rss_gib"] > 0.01
    tower(torch.zeros(2, 3, 4, 4))  # the hook is gone after the report
    with profiler.phase("forward"):
        tower(torch.zeros(2, 3, 4, 4))
    assert profiler._vision.images == 0


def test_a_step_that_never_closed_leaves_nothing_in_the_next():
    profiler = Profiler(torch.device("cpu"), warmup_steps=0)
    profiler.step_begin()
    with profiler.phase("data_wait"):  # an evaluation batch that turned out empty: no step_done
        pass
    profiler.step_begin()
    with profiler.phase("forward"):
        pass
    profiler.step_done(samples=1, tokens=1, slot_tokens=1)
    assert list(profiler.timer.records[0].phases_ms) == ["forward"]


@pytest.mark.parametrize("family", FAMILIES)
def test_profiler_counts_the_real_towers_images(loaded_tiny, synthetic_data, family):
    """Through the real model of the installed transformers (which changed how it hands image
    features around in 5.24): one count per tile (SmolVLM, padding tiles not) or per anyres patch
    and video frame (LLaVA-OneVision) of a mixed batch."""
    from hpc_train.data.batching.collate import Collator, model_inputs
    from hpc_train.models.families import get_family
    from hpc_train.train.profile_report import vision_tower
    from tests.conftest import mixed_samples

    model, processor = loaded_tiny[family]
    samples = mixed_samples(loaded_tiny, synthetic_data, family)
    # A sample's tensor is (tiles, C, H, W) for SmolVLM, (images | videos, patches | frames, C, H, W)
    # for LLaVA-OneVision: every leading dimension is a picture the tower encodes.
    expected = sum(t.shape[:-3].numel() for s in samples for key, t in s.media.items()
                   if key in ("pixel_values", "pixel_values_videos") and t.dim() > 2)
    # LLaVA-OneVision-1.5's are patch rows: its grids count its images and frames
    expected += sum(int(t[:, 0].sum()) for s in samples for key, t in s.media.items() if key.endswith("grid_thw"))
    profiler = Profiler(torch.device("cpu"), warmup_steps=0)
    profiler.count_images(vision_tower(model, get_family(family)))
    profiler.step_begin()
    with profiler.phase("forward"), torch.no_grad():
        model(**model_inputs(Collator(get_family(family), processor.tokenizer.pad_token_id)(samples)),
              use_cache=False)
    profiler.step_done(samples=len(samples), tokens=1, slot_tokens=1, epoch=0)
    assert profiler.rank_report()["totals"]["images"] == expected > 0


def test_wall_total_counts_from_the_process_start():
    """Imports and start-up before the profiler existed are part of a run's wall time."""
    from profiling.profiler import process_age_s

    lived = process_age_s()
    assert lived is not None and lived > 1.0  # this test process imported torch, at least
    report = Profiler(torch.device("cpu"), warmup_steps=0).rank_report()
    assert report["wall_s"]["total"] >= lived
