"""The training recipe: ``setup()`` → ``train()`` → ``finish()``, around a DeepSpeed engine.

Our own loop (not ``transformers.Trainer``) so that every phase of a step — data wait,
forward, backward, optimizer step — is a separate seam for the profiler, the number of
steps is exact before the run starts, and every rank runs the same modules every step.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from hpc_train.config import RunConfig, save_config
from hpc_train.data.collate import Collator, model_inputs
from hpc_train.data.dataset import MediaLoader, SampleDataset
from hpc_train.data.frame_counts import FrameCounts
from hpc_train.data.lengths import SampleShapes, sample_shapes
from hpc_train.data.mixture import read_split
from hpc_train.data.packing import PackedCollator, PlannedPacks, drop_too_long
from hpc_train.data.tokenize import IGNORE_INDEX, ChatEncoder
from hpc_train.data.worker_signals import survive_group_signals
from hpc_train.dist import (
    DistInfo,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    device_for,
    init_distributed,
    read_dist_env,
)
from hpc_train.errors import HpcTrainError
from hpc_train.models.adapters import (
    build_param_groups,
    describe_param_groups,
    describe_quantization,
    param_census,
)
from hpc_train.models.attention import use_varlen_attention
from hpc_train.parent_death import signal_on_parent_death
from hpc_train.train.checkpoint import Checkpointer, TrainState
from hpc_train.train.data_order import PlannedBatches, total_steps
from hpc_train.train.engine import (
    build_optimizer,
    resolve_ds_config,
    zero_stage,
)
from hpc_train.train.evaluate import EvalResult, evaluate_generation, evaluate_loss, to_device
from hpc_train.train.loss import loss_for
from hpc_train.train.memory_estimate import run_shape
from hpc_train.train.metrics import MetricsLogger
from hpc_train.train.output_dir import (
    OutputError,
    agreed,
    checkpoint_bytes,
    free_bytes,
    output_problem,
    room_problem,
    writing,
)
from hpc_train.train.profile_report import (
    PROFILE_REPORT,
    describe_run,
    rank_file,
    trainability,
    vision_tower,
    write_profile,
    write_rank_profile,
)
from hpc_train.train.schedule import build_scheduler, lr_multiplier
from hpc_train.train.step_timer import NoTimer, StepTimer
from hpc_train.train.trainable_model import LoadedModel, load_training_model
from profiling.profiler import Profiler

REQUEUE_EXIT_CODE = 75
"""Exit status after a signal-triggered checkpoint (EX_TEMPFAIL): the job should be requeued."""
REQUEUE_MARKER = "requeue.json"
COMPLETE_MARKER = "run_complete.json"
"""Written when a training run has trained, exported and evaluated: the same command again then
does nothing (and says so) instead of rewriting its outputs."""
"""Written to ``output_dir`` by rank 0 next to that exit; removed when the run starts again."""


class TrainingStopped(HpcTrainError):
    """The run stopped on purpose (non-finite values, out of memory); the message says why."""

    exit_code = 3


class Trainer:
    """One training (or evaluation-only) run of a :class:`RunConfig`."""

    def __init__(self, config: RunConfig, *, info: DistInfo | None = None) -> None:
        self.config = config
        self.info = info or read_dist_env()
        self.profiler: Profiler | None = None
        self.timer: StepTimer = NoTimer()
        self.output = Path(config.output_dir)
        self.loss = loss_for(config.data)
        self._signal: int | None = None
        self._stop_agreed: int | None = None
        """A stop signal every rank knows of (agreed in the step's all-reduce), so all stop at
        the same step; the local ``_signal`` can arrive on one rank after that all-reduce."""
        self._first_step = 1

    # -- setup ---------------------------------------------------------------------------

    def setup(self) -> None:
        cfg, info = self.config, self.info
        init_distributed(info)
        self._say(f"topology: {info.describe()}")
        torch.manual_seed(cfg.train.seed + info.rank)
        self.device = device_for(info)
        self.training = cfg.train.mode != "baseline"
        if cfg.profile.enabled:
            self.profiler = Profiler(self.device, warmup_steps=cfg.profile.warmup_steps, rank=info.rank,
                                     local_rank=info.local_rank, world_size=info.world_size,
                                     workload="training" if self.training else "evaluation")
            self.timer = self.profiler
        with self.timer.section("setup"):
            problem = agreed(output_problem(self.output))  # before minutes of loading, on every rank
            if problem:
                raise OutputError(problem)
            if info.is_main:
                with writing(self.output / "config.resolved.yaml"):
                    save_config(cfg, self.output / "config.resolved.yaml")
                (self.output / REQUEUE_MARKER).unlink(missing_ok=True)
            self.ds: dict[str, Any] | None = None
            self.loaded: LoadedModel
            self._setup_model()
            self._setup_data()
            self.eval_model = self.loaded.model
            if self.training:
                self._setup_engine()
                self.eval_model = self.engine
            elif self.ds is not None:
                # Evaluation under ZeRO-3: the engine gathers each layer's partitions as it runs.
                import deepspeed

                self.eval_model = deepspeed.initialize(model=self.loaded.model, config=self.ds)[0]
            self._install_signal_handlers()
        if self.profiler is not None:
            self.profiler.describe_model(self.loaded.model.config, trainability(self.loaded.model, self.family))
            tower = vision_tower(self.loaded.model, self.family)
            if tower is not None:
                self.profiler.count_images(tower)

    def _setup_model(self) -> None:
        from hpc_train.models.load import model_family
        from hpc_train.train.trainable_model import hidden_size, model_source

        cfg = self.config
        self.family = model_family(cfg.model)
        source = model_source(cfg, self.info)
        if self.training or _wants_zero3(cfg):
            self.ds = resolve_ds_config(cfg, self.info.world_size, bf16=_bf16(cfg),
                                        hidden_size=hidden_size(source))
        self.loaded = load_training_model(cfg, self.info, self.device, source, self.ds)
        self.encoder = ChatEncoder(self.loaded.processor, self.family, system_prompt=cfg.data.system_prompt)
        self.blanks = self.encoder.blank_media()
        self.collate = Collator(self.family, self.encoder.tokenizer.pad_token_id, blanks=self.blanks)

    def _setup_data(self) -> None:
        cfg = self.config
        media = MediaLoader(cfg.data)
        self.media = media
        self.train_set = None
        if self.training:
            if cfg.data.train is None:
                raise HpcTrainError("data.train is not set. Fix: pass data.train=PATH")
            records = read_split(cfg, "train")
            self.train_set = SampleDataset(records, self.encoder, media, cfg.data)
            if cfg.data.packing:
                self._setup_packing(records)
            else:
                self.total_steps = total_steps(len(records), micro_batch=cfg.train.micro_batch_size,
                                               world_size=self.info.world_size,
                                               grad_accum=cfg.train.grad_accum, epochs=cfg.train.epochs,
                                               max_steps=cfg.train.max_steps)
        self.eval_records = None
        if cfg.data.eval is not None:
            self.eval_records = read_split(cfg, "eval")
            if cfg.eval.max_samples is not None:
                self.eval_records = [self.eval_records[i]
                                     for i in range(min(cfg.eval.max_samples, len(self.eval_records)))]
            self.eval_set = SampleDataset(self.eval_records, self.encoder, media, cfg.data)

    def _setup_packing(self, records: Any) -> None:
        """Lengths (computed once by rank 0, cached), the plan, and the exact step count."""
        cfg = self.config
        use_varlen_attention(self.loaded.model)
        cache = self.output / "lengths"
        # Rank 0 measures and caches; the others read its cache instead of measuring again.
        if self.info.is_main:
            shapes = sample_shapes(records, self.encoder, cfg.data, cache_dir=cache, source=cfg.data.train)
        barrier()
        if not self.info.is_main:
            shapes = sample_shapes(records, self.encoder, cfg.data, cache_dir=cache, source=cfg.data.train)
        lengths = shapes.lengths
        if not self.family.video_as_images:  # LLaVA-OneVision stacks a row's videos
            self._refuse_mixed_frame_counts(records, shapes)
        if cfg.data.truncation == "drop":
            lengths, dropped = drop_too_long(lengths, cfg.data.max_seq_len)
            if dropped:
                self._say(f"packing: {dropped} samples over data.max_seq_len={cfg.data.max_seq_len} dropped")
        self.packs = PlannedPacks(lengths, cfg.data.max_seq_len, seed=cfg.train.seed, rank=self.info.rank,
                                  world_size=self.info.world_size, rows_per_micro=cfg.train.micro_batch_size,
                                  grad_accum=cfg.train.grad_accum)
        per_epoch = self.packs.steps_per_epoch()
        if per_epoch == 0:
            raise HpcTrainError("packing made fewer rows than one optimizer step needs. Fix: lower "
                                "train.micro_batch_size / train.grad_accum, or add data")
        self.total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * per_epoch))
        plan = self.packs.plan(0)
        unusable = len(lengths) - len(self.packs.usable)
        self._say(f"packing: {len(plan.rows)} rows of {cfg.data.max_seq_len} tokens from "
                  f"{len(self.packs.usable)} samples ({unusable} unusable), efficiency "
                  f"{100 * plan.efficiency:.1f}%, {per_epoch} optimizer steps per epoch")
        self.packing_efficiency = plan.efficiency

    def _refuse_mixed_frame_counts(self, records: Any, shapes: SampleShapes) -> None:
        """Before step 1, not at it: videos that cannot share a packed row."""
        frames = FrameCounts()
        for i, (n, counts) in enumerate(zip(shapes.lengths, shapes.video_frames, strict=True)):
            if 0 <= n <= self.config.data.max_seq_len:
                frames.add(i, counts)
        error = frames.mixing_error(lambda i: records[i].where, path=self.config.data.train, packing=True,
                                    batch_size=self.config.train.micro_batch_size)
        if error is not None:
            raise error

    def _setup_engine(self) -> None:
        import deepspeed

        cfg, model = self.config, self.loaded.model
        per_checkpoint = self._check_room(checkpoint_bytes(model))
        groups = build_param_groups(model, self.family, cfg)
        optimizer = build_optimizer([g.as_optimizer_group() for g in groups], cfg, self.ds,
                                    main=self.info.local_rank == 0)
        scheduler = build_scheduler(optimizer, total_steps=self.total_steps,
                                    warmup_steps=cfg.train.warmup_steps, min_ratio=cfg.train.min_lr_ratio)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds)
        self.checkpointer = Checkpointer(self.output / "checkpoints", self.info,
                                         keep=cfg.train.keep_checkpoints, expected_bytes=per_checkpoint)
        self.state = TrainState(world_size=self.info.world_size)
        for said in self.checkpointer.prepare(resume=cfg.train.resume):
            self._say(said)
        latest = None
        if cfg.train.resume:
            latest, notes = self.checkpointer.resume_point()
            for note in notes:
                self._say(f"checkpoints: {note}")
        if latest is not None:
            self.state = self.checkpointer.load(self.engine, latest)
            self._first_step = self.state.step + 1
            self._say(f"resumed from {latest} at step {self.state.step}")
        self.metrics = MetricsLogger(self.output, enabled=self.info.is_main,
                                     resume_step=self.state.step if latest is not None else None)
        multiplier = lr_multiplier(self.state.step, total_steps=self.total_steps,
                                   warmup_steps=cfg.train.warmup_steps, min_ratio=cfg.train.min_lr_ratio)
        self._say(f"{cfg.train.mode} training, ZeRO-{zero_stage(self.ds)}, world size {self.info.world_size}, "
                  f"{self.total_steps} optimizer steps "
                  f"(micro-batch {cfg.train.micro_batch_size} x accumulation {cfg.train.grad_accum} "
                  f"x {self.info.world_size} ranks)\n{describe_param_groups(param_census(model, self.family), groups)}\n"
                  f"learning rate at step {self.state.step}: "
                  + ", ".join(f"{g.name} {g.lr * multiplier:.3g}" for g in groups))
        quantized = describe_quantization(model, self.family)
        if quantized:
            self._say(quantized)

    def _check_room(self, per_checkpoint: int) -> int:
        """Stop before the engine starts when not even one checkpoint fits; say so when fewer
        than the run keeps (plus the one written before the oldest goes) do."""
        root = self.output / "checkpoints"
        problem = agreed(room_problem(root, per_checkpoint, "one checkpoint"))
        if problem:
            raise OutputError(problem)
        keep = self.config.train.keep_checkpoints
        room = free_bytes(root) // max(per_checkpoint, 1)
        if room < keep + 1:
            self._say(f"disk: room for {room} checkpoint(s) of about {per_checkpoint / 2**20:.1f} MiB in {root}; "
                      f"the run keeps {keep} (train.keep_checkpoints) and writes the next before removing the "
                      "oldest, so it will stop for space before that. Fix: free space, lower "
                      "train.keep_checkpoints, or use a larger output_dir")
        return per_checkpoint

    def _install_signal_handlers(self) -> None:
        def request_checkpoint(signum: int, frame: object) -> None:
            self._signal = signum

        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, request_checkpoint)
        if "TORCHELASTIC_RUN_ID" in os.environ:
            # torchrun starts each rank in a session of its own, so a signal to the agent's
            # process group (kill -USR1 -PGID) kills the agent alone: its ranks then stop here
            # too, with a checkpoint, instead of training on unsupervised.
            signal_on_parent_death(signal.SIGTERM)

    # -- training ------------------------------------------------------------------------

    def train(self) -> int:
        """Run to the planned step count; returns the process exit status."""
        if not self.training:
            return 0
        micro = self._micro_batches()
        progress = _progress(self.total_steps, self.state.step, enabled=self.info.is_main)
        with self.timer.section("train"):
            return self._train_loop(micro, progress)

    def _train_loop(self, micro: Iterator[dict[str, Any]], progress: Any) -> int:
        cfg, state = self.config, self.state
        while state.step < self.total_steps:
            started = time.perf_counter()
            self.timer.step_begin()
            stats = self._optimizer_step(micro)
            state.step += 1
            step_time = time.perf_counter() - started
            progress.update(1)
            if state.step % cfg.train.log_every == 0 or state.step == self.total_steps:
                self._log_step(stats, step_time)
            stop = self._after_step()
            if stop is not None:
                progress.close()
                return stop
        progress.close()
        self.checkpointer.save(self.engine, state)
        return 0

    def _micro_batches(self) -> Iterator[dict[str, Any]]:
        cfg, state = self.config, self.state
        if cfg.data.packing:
            planned: Any = self.packs
            collate: Any = PackedCollator(
                self.family.name, self.encoder.tokenizer.pad_token_id, blanks=self.blanks,
                pad_to=cfg.data.max_seq_len * cfg.train.micro_batch_size)
        else:
            planned = PlannedBatches(len(self.train_set), seed=cfg.train.seed, rank=self.info.rank,
                                     world_size=self.info.world_size, micro_batch=cfg.train.micro_batch_size,
                                     grad_accum=cfg.train.grad_accum)
            collate = self.collate
        workers = cfg.data.num_workers
        # A generator of its own: creating the loader's iterator draws a seed, and drawing it
        # from the global RNG would shift every later dropout mask of a resumed run.
        loader = DataLoader(self.train_set, batch_sampler=planned, collate_fn=collate,
                            num_workers=workers, persistent_workers=workers > 0,
                            worker_init_fn=survive_group_signals if workers else None,
                            generator=torch.Generator().manual_seed(cfg.train.seed + self.info.rank))
        while True:
            planned.position = (state.epoch, state.micro_index)
            for batch in loader:
                state.micro_index += 1
                yield batch
            state.epoch += 1
            state.micro_index = 0

    def _optimizer_step(self, micro: Iterator[dict[str, Any]]) -> dict[str, float]:
        """Micro-batches until DeepSpeed's accumulation boundary, then its optimizer step."""
        engine, timer = self.engine, self.timer
        engine.train()
        lrs = {f"lr_{g.get('name', i)}": g["lr"] for i, g in enumerate(self.optimizer.param_groups)}
        losses: list[float] = []
        tokens = slot_tokens = supervised = samples = skipped = 0
        while True:
            with timer.phase("data_wait"):
                batch = next(micro)
            skipped += batch["num_skipped"]
            empty = "input_ids" not in batch
            if empty:
                # Every sample was unusable. This rank still runs a forward (a lone blank, no
                # labels) so the others are not left waiting in a collective, then all skip.
                batch = {**self.collate([self.blanks[0]]), "sample_ids": [], "skipped": batch["skipped"]}
            inputs = to_device(model_inputs(batch), self.device, self.loaded.dtype)
            with timer.phase("forward"):
                loss = self._forward(inputs)
            nonfinite, anyone_empty, signalled = all_reduce_max(
                [float(not empty and not torch.isfinite(loss)), float(empty), float(self._signal is not None)])
            if signalled:
                self._stop_agreed = self._signal or signal.SIGUSR1
            if nonfinite:
                self._bad_micro_batch(batch["sample_ids"])
                continue
            if anyone_empty:  # data.on_bad_sample=skip left a rank nothing: skip it everywhere
                self._say(f"step {self.state.step + 1}: a micro-batch had no usable sample "
                          f"({[s.reason for s in batch['skipped']][:2]}); skipped on every rank")
                continue
            boundary = engine.is_gradient_accumulation_boundary()
            with timer.phase("backward"):
                engine.backward(loss)
            with timer.phase("optimizer"):
                engine.step()
            losses.append(float(loss.detach()))
            tokens += batch["num_real_tokens"]
            slot_tokens += batch["num_slots"]
            supervised += int((inputs["labels"] != IGNORE_INDEX).sum())
            samples += len(batch["sample_ids"])
            if boundary:
                break
        self.timer.step_done(samples=samples, tokens=tokens, slot_tokens=slot_tokens, epoch=self.state.epoch)
        loss_sum, count, tokens, slots, supervised, samples, skipped = all_reduce_sum(
            [sum(losses), len(losses), tokens, slot_tokens, supervised, samples, skipped])
        norm = engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        if self.config.train.grad_clip and not math.isfinite(norm):
            raise TrainingStopped(
                f"step {self.state.step + 1}: the gradient norm is {norm}; the weights may be damaged, so "
                f"the run stops here. The last good checkpoint is {self.checkpointer.latest()}. "
                "Fix: lower train.lr, raise train.warmup_steps, or check the data of this step")
        return {"loss": loss_sum / max(count, 1), "grad_norm": norm, "tokens": tokens, "slot_tokens": slots,
                "supervised_tokens": supervised, "samples": samples, "skipped_samples": skipped,
                "lr": next(iter(lrs.values())), **lrs}

    def _forward(self, inputs: dict[str, Any]) -> torch.Tensor:
        try:
            return self.loss(self.engine, inputs)
        except torch.OutOfMemoryError as exc:
            raise TrainingStopped(self._oom_message(exc)) from exc

    def _bad_micro_batch(self, sample_ids: list[str]) -> None:
        state = self.state
        state.bad_steps += 1
        everyone: list[Any] = [sample_ids]
        if dist.is_initialized():
            everyone = [None] * self.info.world_size
            dist.all_gather_object(everyone, sample_ids)
        ids = [i for part in everyone for i in part]
        where = f"step {state.step + 1} (epoch {state.epoch}, micro-batch {state.micro_index})"
        if state.bad_steps > self.config.train.max_bad_steps:
            raise TrainingStopped(
                f"{where}: non-finite loss on samples {ids}. The run stops (train.max_bad_steps="
                f"{self.config.train.max_bad_steps}); the last good checkpoint is "
                f"{self.checkpointer.latest()}. Fix: inspect these samples (hpc-train check-data), lower "
                "train.lr, or allow skips with train.max_bad_steps=N")
        self._say(f"{where}: non-finite loss on samples {ids}; micro-batch skipped "
                  f"({state.bad_steps}/{self.config.train.max_bad_steps})")

    def _log_step(self, stats: dict[str, float], step_time: float) -> None:
        self.metrics.log(self.state.step, {
            **stats, "epoch": self.state.epoch,
            "step_time_s": step_time, "tokens_per_s": stats["tokens"] / max(step_time, 1e-9)})

    def _after_step(self) -> int | None:
        cfg, state = self.config, self.state
        if self._stop_agreed is not None:
            path = self.checkpointer.save(self.engine, state)
            name = signal.Signals(self._stop_agreed).name
            if self.info.is_main:
                # Launchers between us and the scheduler (torchrun) report their own status;
                # this marker tells them the stop was a requested one.
                marker = {"signal": name, "step": state.step, "checkpoint": str(path),
                          "exit_code": REQUEUE_EXIT_CODE}
                with writing(self.output / REQUEUE_MARKER):
                    (self.output / REQUEUE_MARKER).write_text(json.dumps(marker))
            # No rank exits before the marker exists: a launcher that ends the job when one
            # task exits (srun --kill-on-bad-exit) must not stop rank 0 before it writes it.
            barrier()
            self._say(f"signal {name}: checkpoint {path} saved at step {state.step}; exiting with "
                      f"{REQUEUE_EXIT_CODE} so the job can be requeued")
            return REQUEUE_EXIT_CODE
        if cfg.train.eval_every and state.step % cfg.train.eval_every == 0 and self.eval_records is not None:
            with self.timer.section("eval"):
                stop = self._evaluate_during_training()
            if stop:
                self._say(f"early stopping at step {state.step}: no better eval loss in "
                          f"{cfg.train.early_stopping_patience} evaluations")
                self.checkpointer.save(self.engine, state)
                return 0
        if cfg.train.save_every and state.step % cfg.train.save_every == 0:
            self.checkpointer.save(self.engine, state)
        return None

    def _evaluate_during_training(self) -> bool:
        """Evaluate loss; True when early stopping says stop."""
        cfg, state = self.config, self.state
        result = evaluate_loss(self.engine, self.eval_set, self.collate, self.info, self.device,
                               batch_size=cfg.eval.batch_size, dtype=self.loaded.dtype)
        self.metrics.log(state.step, {"eval_loss": result.loss, "eval_perplexity": result.perplexity})
        if result.loss is None:
            return False
        if state.best_eval_loss is None or result.loss < state.best_eval_loss:
            state.best_eval_loss = result.loss
            state.evals_without_improvement = 0
            return False
        state.evals_without_improvement += 1
        patience = cfg.train.early_stopping_patience
        return patience is not None and state.evals_without_improvement >= patience

    # -- end -----------------------------------------------------------------------------

    def evaluate(self) -> EvalResult | None:
        """Loss, perplexity and answer accuracy on ``data.eval``; written to eval_results.json."""
        cfg = self.config
        if self.eval_records is None:
            return None
        # An evaluation-only run's steps are its evaluation batches.
        with self.timer.section("eval"):
            result = evaluate_loss(self.eval_model, self.eval_set, self.collate, self.info, self.device,
                                   batch_size=cfg.eval.batch_size, dtype=self.loaded.dtype,
                                   timer=None if self.training else self.timer)
        if cfg.eval.generate:
            module = getattr(self.eval_model, "module", self.eval_model)
            with self.timer.section("generate"):
                generated = evaluate_generation(
                    module, self.eval_records, self.encoder, self.media, self.info, self.device,
                    batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens,
                    synced=self.info.distributed and _wants_zero3(cfg), blanks=self.blanks,
                    dtype=self.loaded.dtype)
            result.accuracy, result.correct = generated.accuracy, generated.correct
            result.generated, result.predictions = generated.generated, generated.predictions
            result.accuracy_by_kind = generated.accuracy_by_kind
        if self.info.is_main:
            payload = {"mode": cfg.train.mode, "model": str(self.loaded.source), "data": cfg.data.eval,
                       "step": getattr(getattr(self, "state", None), "step", 0), **result.to_dict()}
            with writing(self.output / "eval_results.json"):
                (self.output / "eval_results.json").write_text(json.dumps(payload, indent=2))
            self._say(f"eval: loss {result.loss:.4f}, perplexity {result.perplexity:.3f}"
                      + (f", accuracy {result.accuracy:.3f} ({result.correct}/{result.generated})"
                         if result.accuracy is not None else "")
                      + f" -> {self.output / 'eval_results.json'}")
        return result

    def export(self) -> None:
        """The trained weights: a LoRA adapter (safetensors) or the full model, plus the processor."""
        if not self.training:
            return
        with self.timer.section("export"):
            self._export()

    def _export(self) -> None:
        cfg = self.config
        module = self.engine.module
        target = self.output / ("adapter" if cfg.train.mode in ("lora", "qlora") else "model")
        params = [p for p in module.parameters() if p.requires_grad] if target.name == "adapter" \
            else list(module.parameters())
        with _gathered(params, zero_stage(self.ds) == 3):
            if self.info.is_main:
                with writing(target):
                    module.save_pretrained(target, safe_serialization=True)
                    self.loaded.processor.save_pretrained(target)
        barrier()
        if cfg.lora.merge_on_export and cfg.train.mode == "lora":
            with _gathered(list(module.parameters()), zero_stage(self.ds) == 3):
                if self.info.is_main:
                    merged = module.merge_and_unload()
                    with writing(self.output / "merged"):
                        merged.save_pretrained(self.output / "merged", safe_serialization=True)
                        self.loaded.processor.save_pretrained(self.output / "merged")
            barrier()
        self._say(f"exported {target}")

    def finished_before(self) -> bool:
        """Collective: this run resumed at its last planned step, and an earlier run of the same
        config got to the end of it (exported, evaluated)."""
        if not self.training:
            return False
        try:
            done = json.loads((self.output / COMPLETE_MARKER).read_text())
        except (OSError, ValueError):
            done = {}
        mine = (self.state.step >= self.total_steps and isinstance(done, dict)
                and done.get("step") == self.state.step and done.get("config_hash") == self.config.digest())
        return all_reduce_max([0.0 if mine else 1.0])[0] == 0.0  # every rank must agree

    def leave_finished_run(self) -> None:
        if self.info.is_main:
            self.metrics.close()
        self._say(f"nothing left to do: {self.output} finished step {self.state.step} of {self.total_steps} "
                  "with this config, and its outputs are left as they are. Fix: raise train.max_steps (or "
                  "train.epochs) to train on, or use another output_dir or train.resume=false to start over")

    def mark_complete(self) -> None:
        if self.training and self.info.is_main:
            marker = {"step": self.state.step, "config_hash": self.config.digest(),
                      "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            with writing(self.output / COMPLETE_MARKER):
                (self.output / COMPLETE_MARKER).write_text(json.dumps(marker))

    def finish(self) -> None:
        """Close the metrics and write the profiling reports (also after a signal stop)."""
        if self.training and self.info.is_main:
            self.metrics.close()
        trained_nothing = self.training and self._first_step > self.total_steps
        if self.profiler is not None and trained_nothing and (self.output / PROFILE_REPORT).is_file():
            self._say("profile: this run trained no step; the earlier report is kept")
        elif self.profiler is not None:
            run = describe_run(self.config, self.info, zero_stage=zero_stage(self.ds) if self.ds else None,
                               planned_steps=getattr(self, "total_steps", None),
                               packing_efficiency=getattr(self, "packing_efficiency", None))
            with writing(self.output / PROFILE_REPORT):
                path = write_profile(self.profiler, self.config, self.info, run, dtype=self.loaded.dtype,
                                     first_step=self._first_step)
            if path is not None:
                self._say(f"profile -> {path} (hpc-profile show {path})")
        barrier()

    def save_rank_profile(self) -> None:
        """This rank's report only, without collectives: for the way out of a failed run."""
        if self.profiler is None:
            return
        try:
            path = rank_file(self.config, self.info.rank)
            write_rank_profile(self.profiler, self.config, self.info, dtype=self.loaded.dtype,
                               first_step=self._first_step)
            print(f"rank {self.info.rank}: profile of the steps so far -> {path}", file=sys.stderr, flush=True)
        except Exception as exc:  # the original error matters more than this one
            print(f"rank {self.info.rank}: no profile written ({exc})", file=sys.stderr, flush=True)

    # -- helpers -------------------------------------------------------------------------

    def _say(self, text: str) -> None:
        if self.info.is_main:
            print(text, flush=True)

    def _oom_message(self, exc: BaseException) -> str:
        from hpc_train.train.memory_estimate import format_oom_advice, rank_oom_advice

        shape = run_shape(self.loaded.model, self.config, self.info.world_size, self.ds, self.family)
        available = None
        if torch.cuda.is_available():
            available = torch.cuda.get_device_properties(self.device).total_memory / 2**30
        return format_oom_advice(shape, rank_oom_advice(shape, available_gib=available),
                                 available_gib=available, error=str(exc))


def _wants_zero3(config: RunConfig) -> bool:
    from hpc_train.train.engine import read_ds_config

    return zero_stage(read_ds_config(config.deepspeed.config)[0]) == 3


def _bf16(config: RunConfig) -> bool:
    from hpc_train.train.trainable_model import compute_dtype

    return compute_dtype(config) == torch.bfloat16


def _gathered(params: list[torch.nn.Parameter], zero3: bool) -> AbstractContextManager[Any]:
    if not zero3:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _progress(total: int, done: int, *, enabled: bool) -> Any:
    from tqdm import tqdm

    # Logs (not terminals) get a line every 30 s instead of a bar redrawn in place.
    return tqdm(total=total, initial=done, disable=not enabled, desc="train", unit="step",
                mininterval=0.5 if sys.stderr.isatty() else 30, dynamic_ncols=True)


def run(config: RunConfig, *, evaluate_only: bool = False) -> int:
    """Set up, train (unless ``evaluate_only``), export and evaluate; the exit status."""
    if evaluate_only:
        config = config.model_copy(update={"train": config.train.model_copy(update={"mode": "baseline"})})
    trainer = Trainer(config)
    trainer.setup()
    if trainer.finished_before():
        trainer.leave_finished_run()
        return 0
    try:
        status = trainer.train()
        if status == 0:
            trainer.export()
            trainer.evaluate()
    except BaseException:
        trainer.save_rank_profile()  # what was measured up to the failure (hpc-profile merge)
        raise
    trainer.finish()
    if status == 0:
        trainer.mark_complete()
    return status


__all__ = ["REQUEUE_EXIT_CODE", "Trainer", "TrainingStopped", "run"]
