"""Evaluation: token loss and perplexity, and the result a run writes (with the generated
answers' scores from :mod:`hpc_train.train.generation` and :mod:`hpc_train.evaluation.metrics`).

The evaluation set is split over ranks in equal shares (the last share padded with
repeats that count for nothing), so that under ZeRO-3 every rank runs the same number of
forward passes; generation then runs with ``synced_gpus``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from hpc_train.data.batching.collate import Collator, step_inputs
from hpc_train.data.dataset import SampleDataset
from hpc_train.data.encoding.loss_positions import LOSS_TARGETS
from hpc_train.data.encoding.tokenize import IGNORE_INDEX, EncodedSample
from hpc_train.dist import DistInfo, all_reduce_sum
from hpc_train.models.media_keys import HOST_KEYS
from hpc_train.train.loss import supervised_logits, token_losses
from hpc_train.train.step_timer import NoTimer, StepTimer


@dataclass
class EvalResult:
    loss: float | None = None
    perplexity: float | None = None
    tokens: int = 0
    samples: int = 0
    accuracy: float | None = None
    """Exact match of the generated answers (``metrics.exact_match``), kept under its old name."""
    correct: int = 0
    generated: int = 0
    accuracy_by_kind: dict[str, float] = field(default_factory=dict)
    """Accuracy per record kind (image, video, audio, multi_image, text)."""
    metrics: dict[str, float] = field(default_factory=dict)
    metrics_by_kind: dict[str, dict[str, float]] = field(default_factory=dict)
    metrics_chosen: str | None = None
    """Why these metrics (``eval.metrics``: auto's choice, or the list given)."""
    generation: dict[str, Any] | None = None
    """What generating took: records, new tokens, seconds, rates (:meth:`Generation.summary`)."""
    records: list[dict[str, Any]] = field(default_factory=list)
    """Every scored record: id, kind, prediction, references, scores (``hpc-train compare-eval``)."""

    def to_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "perplexity": self.perplexity, "tokens": self.tokens,
                "samples": self.samples, "accuracy": self.accuracy, "correct": self.correct,
                "generated": self.generated, "accuracy_by_kind": self.accuracy_by_kind,
                "metrics": self.metrics, "metrics_by_kind": self.metrics_by_kind,
                "metrics_chosen": self.metrics_chosen, "generation": self.generation, "records": self.records}

    def report_section(self) -> dict[str, Any]:
        """The profiling report's ``evaluation`` block: the figures, without the records (a loss
        that is not finite is null there: the report's JSON allows no NaN)."""
        def finite(value: float | None) -> float | None:
            return value if value is not None and math.isfinite(value) else None

        return {"loss": finite(self.loss), "perplexity": finite(self.perplexity), "samples": self.samples,
                "metrics": self.metrics, "metrics_by_kind": self.metrics_by_kind,
                "metrics_chosen": self.metrics_chosen, "generation": self.generation}

    def scored(self, setting: str | list[str], rows: list[dict[str, Any]], generation: dict[str, Any]) -> None:
        """Fill the generation part from every rank's ``rows`` (see :mod:`hpc_train.evaluation.metrics`)."""
        from hpc_train.evaluation.metrics import choose_metrics, score_rows, summarize

        names, self.metrics_chosen = choose_metrics(setting, [r["references"] for r in rows])
        scoring = list(dict.fromkeys(["exact_match", *names]))  # exact match is also the accuracy
        score_rows(rows, scoring)
        overall, by_kind = summarize(rows, scoring)
        self.records, self.generation = rows, generation
        self.metrics = {m: overall[m] for m in names if m in overall}
        self.metrics_by_kind = {k: {m: v[m] for m in names} for k, v in by_kind.items()}
        self.generated = len(rows)
        self.correct = int(sum(r["scores"]["exact_match"] for r in rows))
        self.accuracy = overall.get("exact_match")
        self.accuracy_by_kind = {k: v["exact_match"] for k, v in by_kind.items()}


def shard(count: int, info: DistInfo) -> list[tuple[int, bool]]:
    """This rank's (index, counts) pairs: equal length on every rank, repeats flagged False."""
    per_rank = math.ceil(count / info.world_size) if count else 0
    out = []
    for k in range(per_rank):
        index = k * info.world_size + info.rank
        out.append((index, True) if index < count else (index % max(count, 1), False))
    return out


def evaluate_loss(model: Any, dataset: SampleDataset, collate: Collator, info: DistInfo,
                  device: torch.device, *, batch_size: int, dtype: torch.dtype | None = None,
                  timer: StepTimer | None = None) -> EvalResult:
    """Token-weighted mean loss over the (sharded) dataset, and its perplexity.

    With a ``timer``, each batch is a profiled step (data wait and forward phases).
    """
    timer = timer or NoTimer()
    picks = shard(len(dataset), info)
    loss_sum = 0.0
    tokens = 0
    samples = 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(picks), batch_size):
            timer.step_begin()
            chunk = picks[start:start + batch_size]
            with timer.phase("data_wait"):
                items = [dataset[i] for i, _ in chunk]
                batch = collate(items)
            counted = [isinstance(s, EncodedSample) and keep for s, (_, keep) in zip(items, chunk, strict=True)]
            if "input_ids" not in batch:
                continue
            batch = to_device(batch, device, dtype)
            with timer.phase("forward"):
                per_token = token_losses(supervised_logits(model, step_inputs(batch)), batch[LOSS_TARGETS])
            real = [c for s, c in zip(items, counted, strict=True) if isinstance(s, EncodedSample)]
            weights = torch.tensor(real, dtype=per_token.dtype, device=per_token.device)[:, None]
            valid = (batch[LOSS_TARGETS] != IGNORE_INDEX).to(per_token.dtype) * weights
            loss_sum += float((per_token * valid).sum())
            # the float() above waited for the GPU: the step's wall time includes its work
            timer.step_done(samples=len(batch["sample_ids"]), tokens=batch["num_real_tokens"],
                            slot_tokens=batch["num_slots"])
            tokens += int(valid.sum())
            samples += int(sum(real))
    loss_sum, tokens, samples = all_reduce_sum([loss_sum, tokens, samples])
    result = EvalResult(tokens=int(tokens), samples=int(samples))
    if tokens:
        result.loss = loss_sum / tokens
        result.perplexity = math.exp(min(result.loss, 50.0))
    return result


def to_device(batch: dict[str, Any], device: torch.device, dtype: torch.dtype | None = None
              ) -> dict[str, Any]:
    """Tensors to ``device``; floating-point ones (pixels) also to the model's dtype, cast before
    the copy (half the bytes for bf16); pinned ones (a DataLoader's ``pin_memory``) copied without
    waiting. Media metadata the model reads on the host stays there (``HOST_KEYS``)."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and key not in HOST_KEYS:
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            value = value.to(device, non_blocking=device.type == "cuda" and value.is_pinned())
        out[key] = value
    return out
