"""A frozen vision tower under gradient checkpointing: its activations and its backward, with the
input embeddings made to require grad (as transformers and PEFT do when checkpointing is
enabled) against without (what the run does since its checkpointing is non-reentrant), side by
side in one process.

One training step (forward and backward) of one video sample through the run's own pipeline
and loss; LoRA on the language model, the tower and connector frozen, gradient checkpointing
on. Peak live tensor bytes (``profiling/live_tensors.py``) above the weights, and the step's
time (median of ``--steps``); the LoRA gradients of both arms must be equal.

    python benchmarks/frozen_tower.py [--model tiny-smolvlm|smolvlm-256m] [--frames 8] [--steps 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpc_train.config_file import load_config  # noqa: E402
from hpc_train.data.batching.collate import step_inputs  # noqa: E402
from hpc_train.data.pipeline import build_pipeline  # noqa: E402
from hpc_train.data.sources.mixture import read_split  # noqa: E402
from hpc_train.data.sources.synthetic import SyntheticSpec, make_dataset  # noqa: E402
from hpc_train.models.load import model_family  # noqa: E402
from hpc_train.models.tiny import build_preset, build_tiny  # noqa: E402
from hpc_train.train.loss import token_mean_loss  # noqa: E402
from hpc_train.train.trainable_model import prepare_for_training  # noqa: E402
from profiling.live_tensors import LiveTensorBytes  # noqa: E402

MODELS = {"tiny-smolvlm": ("tiny_smolvlm", None), "smolvlm-256m": ("tiny_smolvlm", "smolvlm-256m")}


def built(model: str) -> tuple[torch.nn.Module, object]:
    recipe, preset = MODELS[model]
    return build_preset(preset) if preset else build_tiny("smolvlm")


def step(model: torch.nn.Module, inputs: dict) -> tuple[int, float, dict[str, torch.Tensor]]:
    """Peak bytes above the weights, seconds, and the trained gradients of one step."""
    model.zero_grad(set_to_none=True)
    live = LiveTensorBytes()
    live.adopt([*model.parameters(), *model.buffers()])
    weights = live.current
    started = time.perf_counter()
    with live:
        token_mean_loss(model, inputs).value.backward()
    seconds = time.perf_counter() - started
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return live.peak - weights, seconds, grads


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny-smolvlm")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    opts = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="frozen-tower-") as tmp:
        make_dataset(Path(tmp), SyntheticSpec(n_train=2, n_eval=0, kinds=("video",), weights={"video": 1.0},
                                              video_frames=opts.frames))
        config = load_config(MODELS[opts.model][0], [
            f"data.train={Path(tmp) / 'train.jsonl'}", "data.eval=null", "model.dtype=fp32", "train.device=cpu",
            "train.mode=lora", "lora.target=llm", "lora.dropout=0", "train.gradient_checkpointing=true",
            "data.video.sampling=uniform", f"data.video.num_frames={opts.frames}",
            f"data.video.max_frames={opts.frames}", "data.max_seq_len=1000000"])
        family = model_family(config.model)
        _, processor = built(opts.model)
        pipeline = build_pipeline(config.data, processor, family)
        sample = pipeline.dataset(read_split(config, "train"))[0]
        inputs = step_inputs(pipeline.collator()([sample]))
    arms = {}
    for arm in ("input embeddings require grad", "ours (none)"):
        model, _ = built(opts.model)
        model = prepare_for_training(model, config, family).train()
        if arm.startswith("input"):
            model.enable_input_require_grads()  # what transformers and PEFT leave behind
        runs = [step(model, inputs) for _ in range(opts.steps)]
        arms[arm] = (max(r[0] for r in runs), statistics.median(r[1] for r in runs), runs[-1][2])
    (hooked, ours) = arms.values()
    worst = max(float((ours[2][n] - g).abs().max() / g.abs().max().clamp(min=1e-30)) for n, g in hooked[2].items())
    print(f"{opts.model}, one {opts.frames}-frame video ({inputs['input_ids'].shape[1]:,} tokens), LoRA on the "
          f"language model, frozen tower, gradient checkpointing, fp32 on the CPU, {torch.get_num_threads()} threads")
    print("| arm | peak above weights (MiB) | step (s) |")
    print("|---|---|---|")
    for name, (peak, seconds, _) in arms.items():
        print(f"| {name} | {peak / 2**20:.1f} | {seconds:.2f} |")
    print(f"ratio ours / hooked: memory {ours[0] / hooked[0]:.2f}x, time {ours[1] / hooked[1]:.2f}x; "
          f"LoRA gradients' largest relative difference {worst:.1e}")


if __name__ == "__main__":
    main()
