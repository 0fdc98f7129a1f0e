"""What a run leaves in ``output_dir`` after its steps: the exported weights, the evaluation
results, the profiling reports and the marker that says the run is complete."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import torch

from hpc_train.dist import all_reduce_max, barrier
from hpc_train.train.evaluate import EvalResult, evaluate_loss
from hpc_train.train.gathered import gathered
from hpc_train.train.generation import Generation, generate_answers
from hpc_train.train.output_dir import writing
from hpc_train.train.profile_report import (
    PROFILE_REPORT,
    describe_run,
    rank_file,
    write_profile,
    write_rank_profile,
)
from hpc_train.train.run_parts import COMPLETE_MARKER, RunParts


def evaluate(parts: RunParts) -> EvalResult | None:
    """Loss, perplexity and the generated answers' scores on ``data.eval``; written to
    eval_results.json (rank 0's result holds the scores)."""
    cfg, training = parts.config, parts.training is not None
    if parts.eval is None:
        return None
    # An evaluation-only run's steps are its evaluation batches.
    with parts.timer.section("eval"):
        result = evaluate_loss(parts.eval_model, parts.eval.dataset, parts.pipeline.collator(), parts.info,
                               parts.device, batch_size=cfg.eval.batch_size, dtype=parts.loaded.dtype,
                               timer=None if training else parts.timer)
    if cfg.eval.generate:
        module = getattr(parts.eval_model, "module", parts.eval_model)
        with parts.timer.section("generate"):
            generated = generate_answers(
                module, parts.eval.records, parts.pipeline, parts.info, parts.device,
                batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens,
                synced=parts.info.distributed and parts.zero_stage == 3, dtype=parts.loaded.dtype)
        if parts.info.is_main:  # every rank has every answer; one scores them
            _score(parts, result, generated)
    if parts.info.is_main:
        _write_eval(parts, result)
        parts.evaluation = result.report_section()
    return result


def _score(parts: RunParts, result: EvalResult, generated: Generation) -> None:
    """The answers scored; a scorer that fails keeps the loss and the answers (unscored) written."""
    try:
        result.scored(parts.config.eval.metrics, generated.rows, generated.summary())
    except Exception as exc:  # a metric library's failure must not lose the generation
        result.records, result.generation = generated.rows, generated.summary()
        result.generated = len(generated.rows)
        result.metrics_chosen = f"not scored: {type(exc).__name__}: {exc}"
        print(f"warning: the answers could not be scored ({type(exc).__name__}: {exc}); eval_results.json keeps "
              "them unscored", file=sys.stderr, flush=True)


def _write_eval(parts: RunParts, result: EvalResult) -> None:
    cfg, path = parts.config, parts.output / "eval_results.json"
    payload = {"mode": cfg.train.mode, "model": str(parts.loaded.source), "data": cfg.data.eval,
               "step": parts.step, **result.to_dict()}
    with writing(path):
        path.write_text(json.dumps(payload, indent=2))
    def shown(value: float | None, digits: int) -> str:
        return "none (no answer tokens)" if value is None else f"{value:.{digits}f}"

    parts.say(f"eval: loss {shown(result.loss, 4)}, perplexity {shown(result.perplexity, 3)}"
              + "".join(f", {name} {value:.3f}" for name, value in result.metrics.items())
              + (f" ({result.generated} answers, {result.metrics_chosen})" if result.generation else "")
              + f" -> {path}")


def export(parts: RunParts) -> None:
    """The trained weights: a LoRA adapter (safetensors) or the full model, plus the processor."""
    if parts.training is None:
        return
    with parts.timer.section("export"):
        module = parts.training.engine.module
        adapter = parts.config.train.mode in ("lora", "qlora")
        target = parts.output / ("adapter" if adapter else "model")
        params = [p for p in module.parameters() if p.requires_grad] if adapter else list(module.parameters())
        _save_gathered(parts, module, params, target)
        if parts.config.lora.merge_on_export and parts.config.train.mode == "lora":
            _save_gathered(parts, None, list(module.parameters()), parts.output / "merged")
        parts.say(f"exported {target}")


def _save_gathered(parts: RunParts, module: Any, params: list[torch.nn.Parameter], target: Any) -> None:
    """``module`` (None: the LoRA model merged into its base) saved by rank 0 with ``params``
    gathered from their ZeRO-3 partitions."""
    with gathered(params):
        if parts.info.is_main:
            model = module if module is not None else parts.training.engine.module.merge_and_unload()
            with writing(target):
                model.save_pretrained(target, safe_serialization=True)
                parts.loaded.processor.save_pretrained(target)
    barrier()


def finished_before(parts: RunParts) -> bool:
    """Collective: this run resumed at its last planned step, and an earlier run of the same
    config got to the end of it (exported, evaluated)."""
    if parts.training is None or parts.train is None:
        return False
    try:
        done = json.loads((parts.output / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        done = {}
    step = parts.training.state.step
    mine = (step >= parts.train.total_steps and isinstance(done, dict)
            and done.get("step") == step and done.get("config_hash") == parts.config.digest())
    return all_reduce_max([0.0 if mine else 1.0])[0] == 0.0  # every rank must agree


def leave_finished_run(parts: RunParts) -> None:
    assert parts.training is not None and parts.train is not None
    if parts.info.is_main:
        parts.training.metrics.close()
    parts.say(f"nothing left to do: {parts.output} finished step {parts.step} of {parts.train.total_steps} "
              "with this config, and its outputs are left as they are. Fix: raise train.max_steps (or "
              "train.epochs) to train on, or use another output_dir or train.resume=false to start over")


def mark_complete(parts: RunParts) -> None:
    if parts.training is not None and parts.info.is_main:
        marker = {"step": parts.step, "config_hash": parts.config.digest(),
                  "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with writing(parts.output / COMPLETE_MARKER):
            (parts.output / COMPLETE_MARKER).write_text(json.dumps(marker))


def finish(parts: RunParts) -> None:
    """Close the metrics and write the profiling reports (also after a signal stop)."""
    if parts.training is not None and parts.info.is_main:
        parts.training.metrics.close()
    first_step = parts.training.first_step if parts.training is not None else 1
    trained_nothing = parts.train is not None and first_step > parts.train.total_steps
    if parts.profiler is not None and trained_nothing and (parts.output / PROFILE_REPORT).is_file():
        parts.say("profile: this run trained no step; the earlier report is kept")
    elif parts.profiler is not None:
        run = describe_run(parts.config, parts.info, zero_stage=parts.zero_stage,
                           planned_steps=parts.train.total_steps if parts.train is not None else None,
                           packing_efficiency=parts.train.packing_efficiency if parts.train is not None else None,
                           packed_attention=parts.attention if parts.config.data.packing else None)
        if parts.info.is_main:
            run["plan"] = _plan_beside(parts)
        with writing(parts.output / PROFILE_REPORT):
            path = write_profile(parts.profiler, parts.config, parts.info, run, dtype=parts.loaded.dtype,
                                 first_step=first_step, evaluation=parts.evaluation)
        if path is not None:
            parts.say(f"profile -> {path} (hpc-profile show {path})")
    barrier()


def _plan_beside(parts: RunParts) -> dict | None:
    """The plan of this run beside its measured training peak (see hpc_train/train/plan_beside.py)."""
    from hpc_train.train.plan_beside import plan_beside

    memory = parts.profiler.memory() if parts.profiler is not None else {}
    measured = memory.get("gpu_train_peak_allocated_gib") or memory.get("gpu_peak_allocated_gib")
    return plan_beside(parts.config, parts.output, parts.device, parts.info.world_size, measured)


def save_rank_profile(parts: RunParts) -> None:
    """This rank's report only, without collectives: for the way out of a failed run."""
    if parts.profiler is None:
        return
    rank = parts.info.rank
    try:
        path = rank_file(parts.config, rank)
        write_rank_profile(parts.profiler, parts.config, parts.info, dtype=parts.loaded.dtype,
                           first_step=parts.training.first_step if parts.training is not None else 1)
        print(f"rank {rank}: profile of the steps so far -> {path}", file=sys.stderr, flush=True)
    except Exception as exc:  # the original error matters more than this one
        print(f"rank {rank}: no profile written ({exc})", file=sys.stderr, flush=True)


__all__ = ["evaluate", "export", "finish", "finished_before", "leave_finished_run", "mark_complete",
           "save_rank_profile"]
