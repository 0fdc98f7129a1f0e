"""Answers by batched greedy generation, sharded over ranks, gathered for scoring.

Each rank generates for its share of the evaluation records (equal shares, see
:func:`~hpc_train.train.evaluate.shard`, so under ZeRO-3 every rank joins the same number of
``generate`` calls with ``synced_gpus``). The first batch's time gives an estimate of the
whole, said before the rest starts -- a caption set that would take hours is said to, with
the settings that shorten it -- and progress follows every half minute.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hpc_train.data.batching.collate import model_inputs
from hpc_train.data.encoding.tokenize import EncodedSample
from hpc_train.data.pipeline import DataPipeline
from hpc_train.data.sources.records import Record, Turn
from hpc_train.dist import DistInfo, all_gather, all_reduce_max, all_reduce_sum, say_on_main
from hpc_train.errors import DataError
from hpc_train.train.evaluate import shard, to_device
from hpc_train.train.gathered import gathered

PROGRESS_EVERY_S = 30.0
HOURS_WARNING_S = 3600.0
"""An estimate above this is said as a warning, with the settings that shorten it."""


@dataclass
class Generation:
    """Every rank's answers (``rows``: id, kind, prediction, references, in record order) and
    what generating them took."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    new_tokens: int = 0
    seconds: float = 0.0
    max_new_tokens: int = 0
    skipped: int = 0
    """Records whose prompt could not be built (bad media): not generated, not scored."""

    def summary(self) -> dict[str, Any]:
        records, seconds = len(self.rows), self.seconds if self.seconds > 0 else None
        return {"records": records, "skipped": self.skipped, "new_tokens": self.new_tokens,
                "max_new_tokens": self.max_new_tokens, "seconds": round(self.seconds, 3),
                "tokens_per_s": self.new_tokens / seconds if seconds else None,
                "records_per_s": records / seconds if seconds else None}


def references_of(record: Record) -> list[str]:
    """The last answer and the record's other ``references``, each once."""
    return list(dict.fromkeys([last_answer(record), *record.references]))


def generate_answers(model: Any, records: Sequence[Record], pipeline: DataPipeline, info: DistInfo,
                     device: torch.device, *, batch_size: int, max_new_tokens: int | None, synced: bool,
                     dtype: torch.dtype | None = None) -> Generation:
    """Greedy answers to each record's last question (collective: every rank calls it). Prompts
    are encoded a batch at a time, so a long-video set holds one batch's frames, not a share's."""
    tokenizer = pipeline.encoder.tokenizer
    picks = shard(len(records), info)
    if max_new_tokens is None:
        longest = max((len(tokenizer(ref, add_special_tokens=False)["input_ids"])
                       for index, _ in picks for ref in references_of(records[index])),
                      default=8)
        max_new_tokens = int(all_reduce_max([longest])[0]) + 2
    collate = pipeline.collator(padding_side="left")
    eos = [tokenizer.convert_tokens_to_ids(pipeline.encoder.family.end_of_turn), tokenizer.eos_token_id]
    rows: list[dict[str, Any]] = []
    new_tokens = skipped = 0
    progress = _Progress(info, batches=-(-len(picks) // batch_size), max_new_tokens=max_new_tokens)
    started = time.perf_counter()
    model.eval()
    with torch.no_grad():
        for start in range(0, len(picks), batch_size):
            usable, failed = _prompts(records, pipeline, picks[start:start + batch_size])
            skipped += failed
            if not usable:  # every rank must still join the generate call
                usable = [(_placeholder(pipeline), False, -1)]
            batch = to_device(collate([p for p, _, _ in usable]), device, dtype)
            inputs = {k: v for k, v in model_inputs(batch).items() if k != "labels"}
            # generate() calls helpers such as get_image_features outside their owner's forward,
            # where DeepSpeed's hooks would not gather a container's own parameters (LLaVA-OneVision's
            # image_newline)
            with gathered(p for m in model.modules() if any(True for _ in m.children())
                          for p in m.parameters(recurse=False)):
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                     eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                                     synced_gpus=synced)
            for (prompt, keep, index), ids in zip(usable, out[:, batch["input_ids"].shape[1]:], strict=True):
                if keep:
                    new_tokens += _answer_length(ids.tolist(), eos)
                    rows.append({"index": index, "id": prompt.id, "kind": records[index].kind,
                                 "prediction": tokenizer.decode(ids, skip_special_tokens=True).strip(),
                                 "references": references_of(records[index])})
            progress.batch_done(time.perf_counter() - started)
    seconds = all_reduce_max([time.perf_counter() - started])[0]
    new_tokens, skipped = (int(x) for x in all_reduce_sum([new_tokens, skipped]))
    everyone = sorted((row for share in all_gather(rows) for row in share), key=lambda r: r["index"])
    for row in everyone:
        del row["index"]
    return Generation(rows=everyone, new_tokens=new_tokens, seconds=seconds, max_new_tokens=max_new_tokens,
                      skipped=skipped)


def last_answer(record: Record) -> str:
    """The answer generation is scored against: the last assistant turn (as ``encode_prompt`` says)."""
    return next(t.text for t in reversed(record.turns) if t.role == "assistant")


def _prompts(records: Sequence[Record], pipeline: DataPipeline, picks: Sequence[tuple[int, bool]]
             ) -> tuple[list[tuple[EncodedSample, bool, int]], int]:
    """(prompt, counts, record index) of the picks whose prompt could be built, and how many
    counted ones could not (their media failed: said, and skipped)."""
    prompts: list[tuple[EncodedSample, bool, int]] = []
    skipped = 0
    for index, keep in picks:
        try:
            prompts.append((pipeline.encoder.encode_prompt(records[index], pipeline.media.load(records[index])),
                            keep, index))
        except DataError as exc:
            skipped += int(keep)
            print(f"generate: skipped {exc}", flush=True)
    return prompts, skipped


def _placeholder(pipeline: DataPipeline) -> EncodedSample:
    """A text-only prompt for a rank whose whole batch failed: it joins the call, its answer is dropped
    (the collator adds the blank media every rank's batch must have)."""
    record = Record(id="generate-placeholder", turns=(Turn("user", "."), Turn("assistant", ".")), images=(),
                    videos=(), audios=(), source=Path("<placeholder>"), line=0)
    return pipeline.encoder.encode_prompt(record, pipeline.media.load(record))


def _answer_length(ids: list[int], eos: list[int]) -> int:
    """Tokens generated up to and with the first end-of-turn (the rest is padding)."""
    return next((k + 1 for k, token in enumerate(ids) if token in eos), len(ids))


class _Progress:
    """The estimate after the first batch, then a line every :data:`PROGRESS_EVERY_S` (rank 0)."""

    def __init__(self, info: DistInfo, *, batches: int, max_new_tokens: int) -> None:
        self.info, self.batches, self.max_new_tokens = info, batches, max_new_tokens
        self.done, self.said_at = 0, 0.0

    def batch_done(self, elapsed: float) -> None:
        self.done += 1
        left = elapsed / self.done * (self.batches - self.done)
        if self.done == 1 and elapsed * self.batches >= PROGRESS_EVERY_S:
            total = elapsed * self.batches
            text = (f"generate: the first of {self.batches} batches per rank took {elapsed:.1f} s; all of them "
                    f"will take about {_duration(total)}")
            if total > HOURS_WARNING_S:
                text += (f" -- hours. To shorten it: evaluate fewer records (eval.max_samples), generate fewer "
                         f"tokens (eval.max_new_tokens, now {self.max_new_tokens}), raise eval.batch_size, or "
                         "score loss and perplexity only (eval.generate=false)")
            say_on_main(self.info, text)
            self.said_at = elapsed
        elif elapsed - self.said_at >= PROGRESS_EVERY_S and self.done < self.batches:
            say_on_main(self.info, f"generate: {self.done}/{self.batches} batches, about {_duration(left)} left")
            self.said_at = elapsed


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"
