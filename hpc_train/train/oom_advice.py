"""Out-of-memory advice: which settings would make a run fit, ranked by the memory estimate.

Each remedy re-estimates the run with exactly one setting changed (:func:`dataclasses.replace`)
and is kept when it saves memory, largest saving first; when none fits alone, the best are
stacked until the estimate fits.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from hpc_train.train.memory_estimate import RunShape, default_lora_params, estimate_memory

# Below this, halving max_seq_len would cut most real samples (media alone often need more).
_MIN_SEQ_LEN_TO_HALVE = 512

ZERO3_CONFIG = "ds_configs/zero3.json"
ZERO3_OFFLOAD_CONFIG = "ds_configs/zero3_offload.json"

@dataclass(frozen=True)
class Advice:
    """One setting that would lower per-GPU memory, with its estimated effect."""

    setting: str  # a config override a user can paste
    saving_gib: float  # estimated per-GPU saving vs the current shape
    new_total_gib: float
    why: str  # one short sentence


def _freeze_setting(shape: RunShape) -> str:
    # The override replaces the whole list, so it must repeat groups already frozen.
    groups = ["vision"]
    if shape.freeze_connector:
        groups.append("connector")
    if shape.freeze_llm:
        groups.append("llm")
    return f"model.freeze=[{','.join(groups)}]"


Candidate = tuple[str, RunShape, str]
"""(setting, changed shape, why)."""


def _candidates(shape: RunShape) -> list[Candidate]:
    """Every knob that applies to ``shape``: what a sample holds first, then how it is trained."""
    return _sample_candidates(shape) + _training_candidates(shape)


def _sample_candidates(shape: RunShape) -> list[Candidate]:
    """Smaller batches, quantization, a frozen tower, fewer frames, shorter samples."""
    out: list[Candidate] = []
    trains = shape.mode != "baseline"

    if shape.micro_batch > 1:
        new = max(1, shape.micro_batch // 2)
        factor = shape.micro_batch / new
        out.append((
            f"train.micro_batch_size={new}", replace(shape, micro_batch=new),
            f"Activations and logits scale with the micro-batch; multiply train.grad_accum "
            f"by {factor:g} to keep the global batch.",
        ))

    if shape.mode in ("full", "lora") and shape.params_llm > 0:
        lora = shape.lora_params or default_lora_params(shape)
        why = ("Stores the LLM's linear weights in 4-bit and trains only low-rank adapters."
               if shape.mode == "full" else "Stores the LLM's frozen linear weights in 4-bit.")
        out.append(("train.mode=qlora", replace(shape, mode="qlora", lora_params=lora), why))

    if trains and not shape.freeze_vision and shape.params_vision > 0:
        why = ("No vision-tower gradients, optimizer states or backward activations."
               if shape.mode == "full" else "The vision tower keeps no activations for backward.")
        out.append((_freeze_setting(shape), replace(shape, freeze_vision=True), why))

    if shape.frames_per_sample > 1:
        frames = shape.frames_per_sample
        new = max(1, frames // 2)
        # The worst-case sample fills max_seq_len; dropping frames shortens it by their tokens.
        media = min(frames * shape.lm_tokens_per_frame, shape.seq_len)
        seq = max(1, shape.seq_len - round(media * (frames - new) / frames))
        out.append((
            f"data.video.max_frames={new}", replace(shape, frames_per_sample=new, seq_len=seq),
            f"Fewer frames ({frames} -> {new} per sample) shrink vision-tower work and the "
            f"LM sequence.",
        ))

    if shape.seq_len > _MIN_SEQ_LEN_TO_HALVE:
        new = shape.seq_len // 2
        out.append((
            f"data.max_seq_len={new}", replace(shape, seq_len=new),
            "Activations and logits scale with tokens per sample; longer samples are dropped.",
        ))
    return out


def _training_candidates(shape: RunShape) -> list[Candidate]:
    """Gradient checkpointing, ZeRO-3, optimizer offload."""
    out: list[Candidate] = []
    trains = shape.mode != "baseline"
    if trains and not shape.gradient_checkpointing:
        out.append((
            "train.gradient_checkpointing=true", replace(shape, gradient_checkpointing=True),
            "Keeps only each layer's input and recomputes the rest in backward (~30% slower).",
        ))

    if shape.zero_stage < 3:
        # zero3.json does not offload, so this models the config exactly as it would be pasted.
        out.append((
            f"deepspeed.config={ZERO3_CONFIG}",
            replace(shape, zero_stage=3, offload_optimizer=False),
            f"Shards weights, gradients and optimizer states over {shape.world_size} GPUs.",
        ))

    if not (shape.zero_stage == 3 and shape.offload_optimizer) and trains:
        out.append((
            f"deepspeed.config={ZERO3_OFFLOAD_CONFIG}",
            replace(shape, zero_stage=3, offload_optimizer=True),
            "Shards weights and gradients and keeps Adam states in CPU memory (slower steps).",
        ))
    return out


def _ranked(shape: RunShape) -> list[tuple[Advice, RunShape]]:
    current = estimate_memory(shape).total_gib
    ranked = []
    for setting, changed, why in _candidates(shape):
        new_total = estimate_memory(changed).total_gib
        saving = current - new_total
        if saving > 1e-9:
            ranked.append((Advice(setting, saving, new_total, why), changed))
    # Stable sort: equal savings keep the order above (cheapest-to-apply knobs first).
    ranked.sort(key=lambda pair: -pair[0].saving_gib)
    return ranked


def rank_oom_advice(shape: RunShape, *, available_gib: float | None = None) -> list[Advice]:
    """Knobs that apply to ``shape`` and save memory, largest estimated saving first.

    Each is estimated by changing that one setting only. ``available_gib`` does not change
    the order: the new total is the current total minus the saving, so every knob that fits
    already ranks ahead of every one that does not; it is accepted so callers can pass the
    same arguments here and to :func:`format_oom_advice`.
    """
    if available_gib is not None and available_gib <= 0:
        raise ValueError(f"available_gib {available_gib}: expected a positive number")
    return [advice for advice, _ in _ranked(shape)]


def _combination_that_fits(shape: RunShape, available_gib: float) -> list[str] | None:
    """Greedily stack the best remaining knob until the estimate fits (None if it never does)."""
    chosen: list[str] = []
    current = shape
    while estimate_memory(current).total_gib > available_gib:
        ranked = [pair for pair in _ranked(current) if pair[0].setting.split("=")[0]
                  not in {c.split("=")[0] for c in chosen}]
        if not ranked:
            return None
        advice, current = ranked[0]
        chosen.append(advice.setting)
    return chosen


def format_oom_advice(shape: RunShape, advice: list[Advice], *, available_gib: float | None = None,
                      error: str | None = None) -> str:
    """A readable out-of-memory report: the estimate, the ranked knobs, and what would fit."""
    est = estimate_memory(shape)
    lines: list[str] = []
    if error:
        lines.append(f"Out of memory: {error.strip().splitlines()[0]}")
    have = f" of {available_gib:.1f} GiB available" if available_gib is not None else ""
    lines.append(
        f"Estimated per-GPU memory for this step: {est.total_gib:.1f} GiB{have} "
        f"(weights {est.weights_gib:.1f}, gradients {est.gradients_gib:.1f}, "
        f"optimizer {est.optimizer_gib:.1f}, activations {est.activations_gib:.1f}, "
        f"logits {est.logits_gib:.1f}; mode {shape.mode}, ZeRO-{shape.zero_stage}"
        f"{' + CPU offload' if shape.offload_optimizer else ''}, {shape.world_size} GPU(s), "
        f"micro-batch {shape.micro_batch}, seq {shape.seq_len})."
    )
    if not advice:
        lines.append("No single setting is estimated to save memory for this run.")
        return "\n".join(lines)

    width = max(len(a.setting) for a in advice)
    lines.append("Settings that would lower it, largest estimated saving first:")
    lines.append(f"  {'setting':<{width}}  {'saves':>10}  {'new total':>10}  why")
    for a in advice:
        lines.append(f"  {a.setting:<{width}}  {a.saving_gib:>6.1f} GiB  {a.new_total_gib:>6.1f} GiB"
                     f"  {a.why}")

    if available_gib is not None:
        if est.total_gib <= available_gib:
            # The model misses what it does not count (fragmentation, workspaces, other
            # processes), so an OOM below the estimate still calls for headroom.
            lines.append("The estimate is under the available memory, so the shortfall is in "
                         "what it does not count (fragmentation, workspaces); any saving helps.")
        fits = next((a for a in advice if a.new_total_gib <= available_gib), None)
        if fits is not None:
            lines.append(f"Would fit in {available_gib:.1f} GiB with one change: {fits.setting} "
                         f"(estimated {fits.new_total_gib:.1f} GiB).")
        else:
            combo = _combination_that_fits(shape, available_gib)
            if combo:
                lines.append(f"No single change fits in {available_gib:.1f} GiB; together these "
                             f"should: {' '.join(combo)}")
            else:
                lines.append(f"Even every change above, each applied once, is estimated above "
                             f"{available_gib:.1f} GiB; use more GPUs or a smaller model.")
    lines.append("Estimates are approximate (model in hpc_train/train/memory_estimate.py); "
                 "pass the settings as overrides.")
    return "\n".join(lines)
