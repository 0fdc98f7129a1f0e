"""Evaluation: token loss and perplexity, and answer accuracy by greedy generation.

The evaluation set is split over ranks in equal shares (the last share padded with
repeats that count for nothing), so that under ZeRO-3 every rank runs the same number of
forward passes; generation then runs with ``synced_gpus``.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from hpc_train.data.collate import Collator, model_inputs, step_inputs
from hpc_train.data.dataset import SampleDataset
from hpc_train.data.loss_positions import LOSS_TARGETS
from hpc_train.data.pipeline import DataPipeline
from hpc_train.data.records import RECORD_KINDS, Record
from hpc_train.data.tokenize import IGNORE_INDEX, EncodedSample
from hpc_train.dist import DistInfo, all_reduce_max, all_reduce_sum
from hpc_train.errors import DataError
from hpc_train.models.media_keys import HOST_KEYS
from hpc_train.train.loss import supervised_logits, token_losses
from hpc_train.train.step_timer import NoTimer, StepTimer

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed (exact match compares these)."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


@dataclass
class EvalResult:
    loss: float | None = None
    perplexity: float | None = None
    tokens: int = 0
    samples: int = 0
    accuracy: float | None = None
    correct: int = 0
    generated: int = 0
    accuracy_by_kind: dict[str, float] = field(default_factory=dict)
    """Accuracy per record kind (image, video, audio, multi_image, text)."""
    predictions: list[dict[str, str]] = field(default_factory=list)
    """Rank 0's share of predictions (id, answer, prediction) for inspection."""

    def to_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "perplexity": self.perplexity, "tokens": self.tokens,
                "samples": self.samples, "accuracy": self.accuracy, "correct": self.correct,
                "generated": self.generated, "accuracy_by_kind": self.accuracy_by_kind,
                "predictions": self.predictions[:50]}


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


def evaluate_generation(model: Any, records: Sequence[Record], pipeline: DataPipeline, info: DistInfo,
                        device: torch.device, *, batch_size: int, max_new_tokens: int | None, synced: bool,
                        dtype: torch.dtype | None = None) -> EvalResult:
    """Greedy answers to each record's last question, compared with its last answer."""
    encoder, media = pipeline.encoder, pipeline.media
    tokenizer = encoder.tokenizer
    picks = shard(len(records), info)
    prompts: list[tuple[EncodedSample | None, bool]] = []
    kinds: dict[str, str] = {}
    for index, keep in picks:
        record = records[index]
        kinds[record.id] = record.kind
        try:
            prompts.append((encoder.encode_prompt(record, media.load(record)), keep))
        except DataError:
            prompts.append((None, False))
    if max_new_tokens is None:
        longest = max((len(tokenizer(p.answers[0], add_special_tokens=False)["input_ids"])
                       for p, _ in prompts if p is not None), default=8)
        max_new_tokens = int(all_reduce_max([longest])[0]) + 2
    collate = pipeline.collator(padding_side="left")
    eos = [tokenizer.convert_tokens_to_ids(encoder.family.end_of_turn), tokenizer.eos_token_id]
    correct = generated = 0
    per_kind = {kind: [0, 0] for kind in RECORD_KINDS}
    predictions: list[dict[str, str]] = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            usable = [(p, keep) for p, keep in prompts[start:start + batch_size] if p is not None]
            if not usable:  # every rank must still join the generate call
                usable = [(next(p for p, _ in prompts if p is not None), False)]
            batch = to_device(collate([p for p, _ in usable]), device, dtype)
            inputs = {k: v for k, v in model_inputs(batch).items() if k != "labels"}
            with _gathered_loose_parameters(model):
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                     eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                                     synced_gpus=synced)
            new = out[:, batch["input_ids"].shape[1]:]
            for (prompt, keep), ids in zip(usable, new, strict=True):
                if not keep:
                    continue
                text = tokenizer.decode(ids, skip_special_tokens=True).strip()
                hit = normalize_answer(text) == normalize_answer(prompt.answers[0])
                correct += int(hit)
                generated += 1
                per_kind[kinds[prompt.id]][0] += int(hit)
                per_kind[kinds[prompt.id]][1] += 1
                if len(predictions) < 200:
                    predictions.append({"id": prompt.id, "answer": prompt.answers[0], "prediction": text})
    counts = all_reduce_sum([correct, generated, *(x for kind in RECORD_KINDS for x in per_kind[kind])])
    correct, generated = counts[:2]
    by_kind = {kind: counts[2 + 2 * k] / counts[3 + 2 * k] for k, kind in enumerate(RECORD_KINDS) if counts[3 + 2 * k]}
    return EvalResult(accuracy=correct / generated if generated else None, correct=int(correct),
                      generated=int(generated), accuracy_by_kind=by_kind, predictions=predictions)


def _gathered_loose_parameters(model: Any) -> Any:
    """Under ZeRO-3, gather parameters that container modules own directly (LLaVA-OneVision's
    ``image_newline``): generate() calls helpers such as ``get_image_features`` outside the
    owner's forward, where DeepSpeed's hooks would not gather them."""
    import contextlib

    loose = [p for m in model.modules() if any(True for _ in m.children())
             for p in m.parameters(recurse=False) if hasattr(p, "ds_id")]
    if not loose:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(loose, modifier_rank=None)


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
