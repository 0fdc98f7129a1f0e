"""The training loop: optimizer steps over the parts the build step made, to the planned count.

Our own loop (not ``transformers.Trainer``) so that every phase of a step — data wait,
forward, backward, optimizer step — is a separate seam for the profiler, the number of
steps is exact before the run starts, and every rank runs the same modules every step.
The loop decides, per step: accumulation to DeepSpeed's boundary, skipping micro-batches
(non-finite loss, nothing usable on a rank), a stop every rank agrees on after a signal,
evaluation with early stopping, and when to checkpoint.
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

from hpc_train.data.collate import FloatCast, model_inputs
from hpc_train.data.tokenize import IGNORE_INDEX
from hpc_train.data.worker_signals import survive_group_signals
from hpc_train.dist import all_gather, all_reduce_max, all_reduce_sum, barrier
from hpc_train.errors import HpcTrainError
from hpc_train.parent_death import signal_on_parent_death
from hpc_train.train.evaluate import evaluate_loss, to_device
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
        self._stop_agreed: int | None = None
        """A stop signal every rank knows of (agreed in the step's all-reduce), so all stop at
        the same step; ``signalled`` can arrive on one rank after that all-reduce."""

    def request_stop(self, signum: int, frame: object = None) -> None:
        """A signal handler (see :func:`install_stop_signals`): checkpoint and requeue at the next step."""
        self.signalled = signum

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
        loader = DataLoader(data.dataset, batch_sampler=data.batches, collate_fn=collate, pin_memory=on_gpu,
                            num_workers=workers, persistent_workers=workers > 0,
                            worker_init_fn=survive_group_signals if workers else None,
                            generator=torch.Generator().manual_seed(cfg.train.seed + rank))
        while True:
            data.batches.position = (state.epoch, state.micro_index)
            for batch in loader:
                state.micro_index += 1
                yield batch
            state.epoch += 1
            state.micro_index = 0

    def _optimizer_step(self, micro: Iterator[dict[str, Any]]) -> dict[str, float]:
        """Micro-batches until DeepSpeed's accumulation boundary, then its optimizer step."""
        engine, timer = self.training.engine, self.parts.timer
        engine.train()
        lrs = {f"lr_{g.get('name', i)}": g["lr"] for i, g in enumerate(self.training.optimizer.param_groups)}
        losses: list[float] = []
        counts = {"tokens": 0, "slot_tokens": 0, "supervised_tokens": 0, "samples": 0, "skipped_samples": 0}
        while True:
            with timer.phase("data_wait"):
                batch = next(micro)
            counts["skipped_samples"] += batch["num_skipped"]
            empty = "input_ids" not in batch
            if empty:
                # Every sample was unusable. This rank still runs a forward (a lone blank, no
                # labels) so the others are not left waiting in a collective, then all skip.
                pipeline = self.parts.pipeline
                batch = {**pipeline.collator()([pipeline.blanks[0]]), "sample_ids": [], "skipped": batch["skipped"]}
            inputs = to_device(model_inputs(batch), self.parts.device, self.parts.loaded.dtype)
            loss = self._agreed_loss(inputs, batch, empty=empty)
            if loss is None:
                continue
            boundary = engine.is_gradient_accumulation_boundary()
            with timer.phase("backward"):
                engine.backward(loss)
            with timer.phase("optimizer"):
                engine.step()
            losses.append(float(loss.detach()))
            counts["tokens"] += batch["num_real_tokens"]
            counts["slot_tokens"] += batch["num_slots"]
            counts["supervised_tokens"] += int((inputs["labels"] != IGNORE_INDEX).sum())
            counts["samples"] += len(batch["sample_ids"])
            if boundary:
                break
        timer.step_done(samples=counts["samples"], tokens=counts["tokens"], slot_tokens=counts["slot_tokens"],
                        epoch=self.training.state.epoch)
        loss_sum, count, *totals = all_reduce_sum([sum(losses), len(losses), *counts.values()])
        return {"loss": loss_sum / max(count, 1), "grad_norm": self._grad_norm(),
                **dict(zip(counts, totals, strict=True)), "lr": next(iter(lrs.values())), **lrs}

    def _agreed_loss(self, inputs: dict[str, Any], batch: dict[str, Any], *, empty: bool) -> torch.Tensor | None:
        """The micro-batch's loss, or None when every rank skips it (agreed in one all-reduce,
        which also spreads a stop signal)."""
        with self.parts.timer.phase("forward"):
            loss = self._forward(inputs)
        nonfinite, anyone_empty, signalled = all_reduce_max(
            [float(not empty and not torch.isfinite(loss)), float(empty), float(self.signalled is not None)])
        if signalled:
            self._stop_agreed = self.signalled or signal.SIGUSR1
        if nonfinite:
            self._bad_micro_batch(batch["sample_ids"])
            return None
        if anyone_empty:  # data.on_bad_sample=skip left a rank nothing: skip it everywhere
            self.parts.say(f"step {self.training.state.step + 1}: a micro-batch had no usable sample "
                           f"({[s.reason for s in batch['skipped']][:2]}); skipped on every rank")
            return None
        return loss

    def _forward(self, inputs: dict[str, Any]) -> torch.Tensor:
        try:
            return self.parts.loss(self.training.engine, inputs)
        except torch.OutOfMemoryError as exc:
            raise TrainingStopped(_oom_message(self.parts, exc)) from exc

    def _grad_norm(self) -> float:
        norm = self.training.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        if self.parts.config.train.grad_clip and not math.isfinite(norm):
            raise TrainingStopped(
                f"step {self.training.state.step + 1}: the gradient norm is {norm}; the weights may be damaged, so "
                f"the run stops here. The last good checkpoint is {self.training.checkpointer.latest()}. "
                "Fix: lower train.lr, raise train.warmup_steps, or check the data of this step")
        return norm

    def _bad_micro_batch(self, sample_ids: list[str]) -> None:
        state, allowed = self.training.state, self.parts.config.train.max_bad_steps
        state.bad_steps += 1
        ids = [i for part in all_gather(sample_ids) for i in part]
        where = f"step {state.step + 1} (epoch {state.epoch}, micro-batch {state.micro_index})"
        if state.bad_steps > allowed:
            raise TrainingStopped(
                f"{where}: non-finite loss on samples {ids}. The run stops (train.max_bad_steps={allowed}); "
                f"the last good checkpoint is {self.training.checkpointer.latest()}. Fix: inspect these samples "
                "(hpc-train check-data), lower train.lr, or allow skips with train.max_bad_steps=N")
        self.parts.say(f"{where}: non-finite loss on samples {ids}; micro-batch skipped ({state.bad_steps}/{allowed})")

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
            marker = {"signal": name, "step": state.step, "checkpoint": str(path), "exit_code": REQUEUE_EXIT_CODE}
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


def install_stop_signals(handler: Callable[[int, Any], None]) -> None:
    """SIGUSR1 / SIGTERM (SLURM's warning before a time limit or preemption) go to ``handler``."""
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, handler)
    if "TORCHELASTIC_RUN_ID" in os.environ:
        # torchrun starts each rank in a session of its own, so a signal to the agent's
        # process group (kill -USR1 -PGID) kills the agent alone: its ranks then stop here
        # too, with a checkpoint, instead of training on unsupervised.
        signal_on_parent_death(signal.SIGTERM)


def _oom_message(parts: RunParts, exc: BaseException) -> str:
    from hpc_train.train.memory_estimate import run_shape
    from hpc_train.train.oom_advice import format_oom_advice, rank_oom_advice

    shape = run_shape(parts.loaded.model, parts.config, parts.info.world_size, parts.ds, parts.family)
    available = None
    if torch.cuda.is_available():
        available = torch.cuda.get_device_properties(parts.device).total_memory / 2**30
    return format_oom_advice(shape, rank_oom_advice(shape, available_gib=available), available_gib=available,
                             error=str(exc))


def _progress(total: int, done: int, *, enabled: bool) -> Any:
    from tqdm import tqdm

    # Logs (not terminals) get a line every 30 s instead of a bar redrawn in place.
    return tqdm(total=total, initial=done, disable=not enabled, desc="train", unit="step",
                mininterval=0.5 if sys.stderr.isatty() else 30, dynamic_ncols=True)


__all__ = ["REQUEUE_EXIT_CODE", "TrainLoop", "TrainingStopped", "install_stop_signals"]
