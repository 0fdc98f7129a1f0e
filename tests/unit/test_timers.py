"""Phase timers on the CPU clock, against known sleeps (generous bounds)."""

from __future__ import annotations

import time

import pytest

from profiling.stats import summarize
from profiling.timers import PhaseTimer


def run_steps(timer: PhaseTimer, steps: int, *, forward_s: float, backward_s: float) -> None:
    for _ in range(steps):
        with timer.phase("data_wait"):
            pass
        for _ in range(2):  # two micro-batches: phases add up within a step
            with timer.phase("forward"):
                time.sleep(forward_s)
            with timer.phase("backward"):
                time.sleep(backward_s)
        with timer.phase("optimizer"):
            time.sleep(0.001)
        timer.step_done(samples=4, tokens=100, slot_tokens=128)


def test_phase_times_match_sleeps_and_warmup_is_excluded():
    timer = PhaseTimer(warmup_steps=2)
    run_steps(timer, 6, forward_s=0.01, backward_s=0.02)
    timer.finish()
    assert timer.steps_seen == 6 and len(timer.records) == 4
    forward = summarize(r.phases_ms["forward"] for r in timer.records)
    backward = summarize(r.phases_ms["backward"] for r in timer.records)
    assert 20 <= forward["median"] < 60  # 2 x 10 ms
    assert 40 <= backward["median"] < 100  # 2 x 20 ms
    for r in timer.records:
        assert sum(r.phases_ms.values()) <= r.step_ms * 1.05 + 1
        assert r.step_ms >= r.phases_ms["forward"] + r.phases_ms["backward"]
        assert (r.samples, r.tokens, r.slot_tokens) == (4, 100, 128)


def test_an_exception_inside_a_phase_still_closes_it():
    timer = PhaseTimer(warmup_steps=0)
    with pytest.raises(RuntimeError), timer.phase("forward"):
        raise RuntimeError("boom")
    timer.step_done(samples=1, tokens=1, slot_tokens=1)
    assert "forward" in timer.records[0].phases_ms


class Allocator:
    """A counter with a high-water mark, read and reset as PyTorch's CUDA memory stats are."""

    def __init__(self) -> None:
        self.now = self.high = 0

    def alloc(self, n: int) -> None:
        self.now += n
        self.high = max(self.high, self.now)

    def free(self, n: int) -> None:
        self.now -= n

    def read(self) -> tuple[int]:
        return (self.high,)

    def reset(self) -> None:
        self.high = self.now


def test_each_section_gets_its_own_peak_and_the_run_the_largest():
    from profiling.memory import SectionPeaks

    memory = Allocator()
    peaks = SectionPeaks(memory.read, memory.reset)
    memory.alloc(100)  # the model, before any section
    peaks.enter("train")
    memory.alloc(50)
    memory.free(50)
    peaks.enter("eval")  # an evaluation during training: its own peak, not the training's
    memory.alloc(400)
    memory.free(400)
    peaks.leave()
    memory.alloc(20)
    memory.free(20)
    peaks.leave()
    peaks.enter("export")
    memory.alloc(10)
    peaks.leave()
    assert peaks.peaks == {"train": (150,), "eval": (500,), "export": (110,)}
    assert peaks.overall == (500,)
