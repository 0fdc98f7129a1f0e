"""The training loop: optimizer steps over the parts the build step made, to the planned count.

Our own loop (not ``transformers.Trainer``) so that every phase of a step — data wait,
forward, backward, optimizer step — is a separate seam for the profiler, the number of
steps is exact before the run starts, and every rank runs the same modules every step.
The loop decides, per step: accumulation to DeepSpeed's boundary, skipping optimizer steps
(non-finite loss on a rank, nothing usable anywhere), a stop every rank agrees on after a
signal, evaluation with early stopping, and when to checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from hpc_train.data.batching.collate import FloatCast, step_inputs
from hpc_train.data.batching.sequence_shard import SHARD
from hpc_train.data.batching.worker_signals import survive_group_signals
from hpc_train.data.caches.vision_cache import VISION_FEATURES
from hpc_train.dist import all_gather, barrier, sum_over_ranks
from hpc_train.errors import HpcTrainError
from hpc_train.parent_death import signal_on_parent_death
from hpc_train.train.engine import share_scale
from hpc_train.train.evaluate import evaluate_loss, to_device
from hpc_train.train.loss import Loss
from hpc_train.train.output_dir import writing
from hpc_train.train.run_parts import (
    REQUEUE_EXIT_CODE,
    REQUEUE_MARKER,
    RunParts,
    TrainData,
    TrainingEngine,
)


class TrainingStopped(HpcTrainError):
    """The run stopped on purpose (non-finite values, out of memory); the message says why."""

    exit_code = 3


class OutOfMemoryStop(TrainingStopped):
    """A step ran out of GPU memory. The command line says so with this run's plan (peak by
    component, the settings that fit), made a layer above the loop (:mod:`hpc_train.plan.after_oom`)."""

    def __init__(self, exc: BaseException, parts: RunParts) -> None:
        super().__init__(f"Out of memory: {exc}")
        self.config, self.info, self.device = parts.config, parts.info, parts.device
        self.bf16 = parts.loaded.dtype == torch.bfloat16
        self.resolved = parts.output / "config.resolved.yaml"


class TrainLoop:
    """The optimizer steps of one training run (``parts.train`` and ``parts.training`` set)."""

    def __init__(self, parts: RunParts) -> None:
        if parts.train is None or parts.training is None:
            raise ValueError("TrainLoop needs a training run's parts (train.mode is baseline)")
        self.parts = parts
        self.data: TrainData = parts.train
        self.training: TrainingEngine = parts.training
        self.signalled: int | None = None
        """A stop signal this rank received (set by the handlers, or a test)."""
        self._parent = os.getppid()
        self.launcher_died = False
        """The signal came from the kernel because the process that started this rank died
        (see :func:`install_stop_signals`), not from the job."""
        self._share_scale = share_scale(parts.ds, parts.config.train.sequence_parallel)
        self._stop_agreed: int | None = None
        """A stop signal every rank knows of (agreed in the step's all-reduce), so all stop at
        the same step; ``signalled`` can arrive on one rank after that all-reduce."""

    def request_stop(self, signum: int, frame: object = None) -> None:
        """A signal handler (see :func:`install_stop_signals`): checkpoint and requeue at the next step."""
        self.signalled = signum
        self.launcher_died = self.launcher_died or os.getppid() != self._parent

    def train(self, micro_batches: Iterable[dict[str, Any]] | None = None) -> int:
        """Run to the planned step count; the process exit status. ``micro_batches``: collated
        batches to read instead of the run's DataLoader (a test's own)."""
        micro = iter(micro_batches) if micro_batches is not None else self._micro_batches()
        progress = _progress(self.data.total_steps, self.training.state.step, enabled=self.parts.info.is_main)
        with self.parts.timer.section("train"):
            try:
                return self._steps(micro, progress)
            finally:
                progress.close()

    def _steps(self, micro: Iterator[dict[str, Any]], progress: Any) -> int:
        state, every = self.training.state, self.parts.config.train.log_every
        while state.step < self.data.total_steps:
            started = time.perf_counter()
            self.parts.timer.step_begin()
            stats = self._optimizer_step(micro)
            state.step += 1
            step_time = time.perf_counter() - started
            progress.update(1)
            if state.step % every == 0 or state.step == self.data.total_steps:
                self.training.metrics.log(state.step, {**stats, "epoch": state.epoch, "step_time_s": step_time,
                                                  "tokens_per_s": stats["tokens"] / max(step_time, 1e-9)})
            stop = self._after_step()
            if stop is not None:
                return stop
        self.training.checkpointer.save(self.training.engine, state)
        return 0

    def _micro_batches(self) -> Iterator[dict[str, Any]]:
        cfg, state, data = self.parts.config, self.training.state, self.data
        workers, rank = cfg.data.num_workers, self.parts.info.rank
        # A generator of its own: creating the loader's iterator draws a seed, and drawing it
        # from the global RNG would shift every later dropout mask of a resumed run.
        dtype, on_gpu = self.parts.loaded.dtype, self.parts.device.type == "cuda"
        collate = data.collate if dtype == torch.float32 else FloatCast(data.collate, dtype)
        # videos the GPU decodes: the workers hand over their samples, this process collates them
        finish = data.finish
        loader = DataLoader(data.dataset, batch_sampler=data.batches, collate_fn=collate if finish is None else list,
                            pin_memory=on_gpu and finish is None,
                            num_workers=workers, persistent_workers=workers > 0,
                            worker_init_fn=survive_group_signals if workers else None,
                            generator=torch.Generator().manual_seed(cfg.train.seed + rank))
        while True:
            data.batches.position = (state.epoch, state.micro_index)
            for batch in loader:
                state.micro_index += 1
                yield batch if finish is None else collate(finish(batch))
            state.epoch += 1
            state.micro_index = 0

    def _optimizer_step(self, micro: Iterator[dict[str, Any]]) -> dict[str, float]:
        """Micro-batches until DeepSpeed's accumulation boundary, then its optimizer step.

        Nothing here waits for the device before the boundary: losses stay on it, counts come
        from the collator. At the boundary one collective agrees on the step (its non-finite
        losses, a stop signal) before the last backward; a step with a non-finite loss on any
        rank is then skipped on every rank by DeepSpeed's own overflow check.
        """
        engine, timer = self.training.engine, self.parts.timer
        engine.train()
        lrs = {f"lr_{g.get('name', i)}": g["lr"] for i, g in enumerate(self.training.optimizer.param_groups)}
        losses: list[torch.Tensor] = []
        sample_ids: list[str] = []
        counts = {"tokens": 0, "slot_tokens": 0, "supervised_tokens": 0, "samples": 0, "skipped_samples": 0,
                  "empty_micro_batches": 0, **dict.fromkeys(CACHE_COUNTS if self.parts.pipeline.vision_cache else (), 0),
                  **({"videos_unprepared": 0} if self.parts.pipeline.media.prepared is not None else {})}
        sequences = [0, 0]  # real tokens and samples of the sequences this rank's tokens belong to
        while True:
            with timer.phase("data_wait"):
                batch = next(micro)
            counts["skipped_samples"] += batch["num_skipped"]
            empty = "input_ids" not in batch
            if empty:
                batch = self._stand_in(batch)
            inputs = to_device(step_inputs(batch), self.parts.device, self.parts.loaded.dtype)
            with timer.phase("forward"):
                loss = self._forward(inputs)
            if not empty:  # a stand-in's loss is 0/0 and is not averaged
                losses.append(loss.value.detach())
            _tally(counts, batch, empty=empty)
            if "videos_unprepared" in counts:
                timer.prepared_media(unprepared=batch.get("videos_unprepared", 0))
            if VISION_FEATURES in batch:
                features = batch[VISION_FEATURES]
                timer.vision_cache(cached=features.samples_cached, computed=features.samples_computed,
                                   bytes_read=features.bytes_read)
            _tally_sequences(sequences, batch, empty=empty)
            sample_ids += batch["sample_ids"]
            boundary = engine.is_gradient_accumulation_boundary()
            agreed = self._agree(losses, counts) if boundary else None
            with timer.phase("backward"):
                engine.backward(_to_backward(loss, empty=empty, skip=agreed is not None and _unusable(agreed),
                                             scale=self._share_scale))
            with timer.phase("optimizer"):
                engine.step()
            if agreed is not None:
                break
        timer.step_done(samples=counts["samples"], tokens=counts["tokens"], slot_tokens=counts["slot_tokens"],
                        epoch=self.training.state.epoch,
                        context=sequences[0] / sequences[1] if sequences[1] else None)
        self._after_optimizer(agreed, sample_ids)
        # Under sequence parallelism each rank of a group holds a share of one micro-batch's loss.
        micro_losses = agreed["finite"] / self.parts.config.train.sequence_parallel
        loss_mean = agreed["loss_sum"] / micro_losses if micro_losses else float("nan")
        return {"loss": loss_mean, "grad_norm": self._grad_norm(), **{k: agreed[k] for k in counts},
                "skipped_step": float(not self.training.engine.was_step_applied()),
                "lr": next(iter(lrs.values())), **lrs}

    def _stand_in(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A lone blank, unsupervised, for a micro-batch whose samples were all unusable: this
        rank still runs every module, so no other rank waits for it in a collective. Collated
        by the run's own collator (a packed row when packing), so the run's loss applies."""
        # said by the rank it happened on: no other rank knows before the step's collective
        print(f"rank {self.parts.info.rank}: step {self.training.state.step + 1}: a micro-batch had no usable sample "
              f"({[s.reason for s in batch['skipped']][:2]}); it adds nothing to this step", flush=True)
        return {**self.data.collate([self.parts.pipeline.blanks[0]]), "sample_ids": [], "skipped": batch["skipped"]}

    def _agree(self, losses: list[torch.Tensor], counts: dict[str, int]) -> dict[str, float]:
        """The step's numbers summed over ranks, with its non-finite losses and stop signals:
        one collective, one read of the device per optimizer step."""
        stacked = torch.stack(losses) if losses else torch.zeros(0, device=self.parts.device)
        finite = torch.isfinite(stacked)
        device_part = torch.stack([torch.where(finite, stacked, 0.0).sum(), finite.sum(), (~finite).sum()])
        names = ("loss_sum", "finite", "nonfinite", "signalled", *counts)
        totals = sum_over_ranks(device_part, [float(self.signalled is not None), *counts.values()])
        agreed = dict(zip(names, totals, strict=True))
        if agreed["signalled"]:
            self._stop_agreed = self.signalled or signal.SIGUSR1
        return agreed

    def _after_optimizer(self, agreed: dict[str, float], sample_ids: list[str]) -> None:
        """Count a step DeepSpeed did not apply (non-finite loss or gradients on some rank)."""
        applied = self.training.engine.was_step_applied()
        if _unusable(agreed) and applied:
            raise TrainingStopped(
                f"step {self.training.state.step + 1}: a step meant to be skipped was applied by DeepSpeed, so the "
                "weights may be damaged; this DeepSpeed configuration does not check gradients for overflow")
        if applied:
            return
        # DeepSpeed leaves the schedule where it was on a skipped update; the step still
        # counts (its data is spent), so the rate moves on with it and ends where planned.
        self.training.engine.lr_scheduler.step()
        if not agreed["nonfinite"] and not agreed["finite"]:
            self.parts.say(f"step {self.training.state.step + 1}: no rank had a usable sample in this step; "
                           "optimizer step skipped")
            return
        self._bad_step(sample_ids, "non-finite loss" if agreed["nonfinite"] else "non-finite gradients")

    def _forward(self, inputs: dict[str, Any]) -> Loss:
        try:
            return self.parts.loss(self.training.engine, inputs)
        except torch.OutOfMemoryError as exc:
            raise OutOfMemoryStop(exc, self.parts) from exc

    def _grad_norm(self) -> float:
        norm = self.training.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        if self.parts.config.train.grad_clip and not math.isfinite(norm) and self.training.engine.was_step_applied():
            raise TrainingStopped(
                f"step {self.training.state.step + 1}: the gradient norm is {norm}; the weights may be damaged, so "
                f"the run stops here. The last good checkpoint is {self.training.checkpointer.latest()}. "
                "Fix: lower train.lr, raise train.warmup_steps, or check the data of this step")
        return norm

    def _bad_step(self, sample_ids: list[str], what: str) -> None:
        state, allowed = self.training.state, self.parts.config.train.max_bad_steps
        state.bad_steps += 1
        ids = [i for part in all_gather(sample_ids) for i in part]
        where = f"step {state.step + 1} (epoch {state.epoch}, micro-batch {state.micro_index})"
        if state.bad_steps > allowed:
            raise TrainingStopped(
                f"{where}: {what} on samples {ids}. The run stops (train.max_bad_steps={allowed}); "
                f"the last good checkpoint is {self.training.checkpointer.latest()}. Fix: inspect these samples "
                "(hpc-train check-data), lower train.lr, or allow skips with train.max_bad_steps=N")
        self.parts.say(f"{where}: {what} on samples {ids}; optimizer step skipped on every rank "
                       f"({state.bad_steps}/{allowed})")

    def _after_step(self) -> int | None:
        """A stop (its exit status) or None to go on; checkpoints and evaluations that fall due."""
        train, state, run = self.parts.config.train, self.training.state, self.training
        if self._stop_agreed is not None:
            return self._stop_for_signal(self._stop_agreed)
        if train.eval_every and state.step % train.eval_every == 0 and self.parts.eval is not None:
            with self.parts.timer.section("eval"):
                stop = self._evaluate_during_training()
            if stop:
                self.parts.say(f"early stopping at step {state.step}: no better eval loss in "
                               f"{train.early_stopping_patience} evaluations")
                run.checkpointer.save(run.engine, state)
                return 0
        if train.save_every and state.step % train.save_every == 0:
            run.checkpointer.save(run.engine, state)
        return None

    def _stop_for_signal(self, signum: int) -> int:
        state, output = self.training.state, self.parts.output
        path = self.training.checkpointer.save(self.training.engine, state)
        name = signal.Signals(signum).name
        if self.parts.info.is_main:
            # Launchers between us and the scheduler (torchrun) report their own status;
            # this marker tells them the stop was a requested one.
            marker = {"signal": name, "step": state.step, "checkpoint": str(path), "exit_code": REQUEUE_EXIT_CODE,
                      "cause": (f"the launcher that started the ranks died (the kernel sent {name}; plain torchrun "
                                "dies of SIGUSR1: launch/torchrun.sh passes it on)") if self.launcher_died
                      else f"{name} sent to the ranks"}
            with writing(output / REQUEUE_MARKER):
                (output / REQUEUE_MARKER).write_text(json.dumps(marker))
        # No rank exits before the marker exists: a launcher that ends the job when one
        # task exits (srun --kill-on-bad-exit) must not stop rank 0 before it writes it.
        barrier()
        self.parts.say(f"signal {name}: checkpoint {path} saved at step {state.step}; exiting with "
                       f"{REQUEUE_EXIT_CODE} so the job can be requeued")
        return REQUEUE_EXIT_CODE

    def _evaluate_during_training(self) -> bool:
        """Evaluate loss; True when early stopping says stop."""
        parts, state = self.parts, self.training.state
        assert parts.eval is not None
        result = evaluate_loss(self.training.engine, parts.eval.dataset, parts.pipeline.collator(), parts.info,
                               parts.device, batch_size=parts.config.eval.batch_size, dtype=parts.loaded.dtype)
        self.training.metrics.log(state.step, {"eval_loss": result.loss, "eval_perplexity": result.perplexity})
        if result.loss is None:
            return False
        if state.best_eval_loss is None or result.loss < state.best_eval_loss:
            state.best_eval_loss = result.loss
            state.evals_without_improvement = 0
            return False
        state.evals_without_improvement += 1
        patience = parts.config.train.early_stopping_patience
        return patience is not None and state.evals_without_improvement >= patience


def _tally(counts: dict[str, int], batch: dict[str, Any], *, empty: bool) -> None:
    """Add a micro-batch's host-side counts (a stand-in's tokens are not the data's)."""
    counts["empty_micro_batches"] += int(empty)
    if not empty:
        counts["tokens"] += batch["num_real_tokens"]
        counts["slot_tokens"] += batch["num_slots"]
        counts["supervised_tokens"] += batch["num_supervised"]
        counts["samples"] += len(batch["sample_ids"])
    if "videos_unprepared" in counts:  # decoded because the prepared media lacked them
        counts["videos_unprepared"] += batch.get("videos_unprepared", 0)
    features = batch.get(VISION_FEATURES)
    if features is not None:
        counts["vision_cached_samples"] += features.samples_cached
        counts["vision_computed_samples"] += features.samples_computed
        counts["vision_cache_bytes_read"] += features.bytes_read


CACHE_COUNTS = ("vision_cached_samples", "vision_computed_samples", "vision_cache_bytes_read")
"""A step's vision-cache counts (runs with ``data.vision_cache``): samples whose features came from
the cache, samples whose features were computed (and stored), bytes of cached features read."""


def _tally_sequences(sequences: list[int], batch: dict[str, Any], *, empty: bool) -> None:
    """Add the whole micro-batch's real tokens and samples: under sequence parallelism this
    rank's tokens are a slice of them, and their attention spans the whole sequences."""
    if empty:
        return
    facts = batch.get(SHARD)
    sequences[0] += facts.whole_tokens if facts is not None else batch["num_real_tokens"]
    sequences[1] += facts.whole_samples if facts is not None else len(batch["sample_ids"])


def _unusable(agreed: dict[str, float]) -> bool:
    """A step no rank may apply: a non-finite loss somewhere, or no usable micro-batch anywhere."""
    return bool(agreed["nonfinite"]) or not agreed["finite"]


def _to_backward(loss: Loss, *, empty: bool, skip: bool, scale: float = 1.0) -> torch.Tensor:
    """What the micro-batch sends back: its loss; for a stand-in, zero through the logits it
    used (every module joins the backward, as ZeRO-3 needs, and adds nothing); for a step no
    rank may apply, NaN through those logits, so the gradients are NaN and DeepSpeed's
    overflow check (over all weights and ranks) skips the update. ``scale``:
    :func:`~hpc_train.train.engine.share_scale`."""
    if skip:
        return loss.logits.float().sum() * float("nan")
    if empty:
        return loss.logits.float().sum() * 0.0
    return loss.value * scale if scale != 1.0 else loss.value


def install_stop_signals(handler: Callable[[int, Any], None]) -> None:
    """SIGUSR1 / SIGTERM (SLURM's warning before a time limit or preemption) go to ``handler``."""
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, handler)
    if "TORCHELASTIC_RUN_ID" in os.environ:
        # torchrun starts each rank in a session of its own, so a signal to the agent's
        # process group (kill -USR1 -PGID) kills the agent alone: its ranks then stop here
        # too, with a checkpoint, instead of training on unsupervised.
        signal_on_parent_death(signal.SIGTERM)


def _progress(total: int, done: int, *, enabled: bool) -> Any:
    from tqdm import tqdm

    # Logs (not terminals) get a line every 30 s instead of a bar redrawn in place.
    return tqdm(total=total, initial=done, disable=not enabled, desc="train", unit="step",
                mininterval=0.5 if sys.stderr.isatty() else 30, dynamic_ncols=True)


__all__ = ["REQUEUE_EXIT_CODE", "OutOfMemoryStop", "TrainLoop", "TrainingStopped", "install_stop_signals"]
