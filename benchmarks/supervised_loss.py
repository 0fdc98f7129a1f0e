"""Logits of supervised positions only vs logits of every position: peak memory, step time and
the loss, side by side, on a published preset (random weights).

One training step (forward and backward, gradient checkpointing on, as a long-row run would)
of one text row of T tokens, of which a share are answer tokens (supervised) in spans; the
rest stand for media and prompt tokens. The weights are frozen and gradients flow from the
input embeddings on (as under LoRA), so the peak is the step's activations. Each variant runs
in a fresh process, so its peak is its own: the growth of the process's peak resident set
over the step (glibc returns large tensors to the system when they are freed, so it follows
the live tensors; PyTorch's memory profiler holds the same numbers at 2k tokens but needs
more memory than the machine has at 8k). The goal: the supervised-only step saves at least the
unsupervised share of the full step's fp32 logits, and its loss equals the full loss to 1e-6
relative.

    python benchmarks/supervised_loss.py [--preset smolvlm-256m] [--lengths 2048 8192] [--supervised 0.2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpc_train.data.encoding.loss_positions import loss_positions  # noqa: E402
from hpc_train.data.encoding.tokenize import IGNORE_INDEX  # noqa: E402
from hpc_train.models.attention import use_varlen_attention  # noqa: E402
from hpc_train.models.presets import build_model  # noqa: E402
from hpc_train.train.loss import full_logits_loss, token_mean_loss  # noqa: E402


def row(length: int, supervised: float, vocab: int, answer_len: int = 64) -> dict[str, torch.Tensor]:
    """One row with answers of ``answer_len`` tokens spread so that ``supervised`` of it is labelled."""
    generator = torch.Generator().manual_seed(length)
    ids = torch.randint(0, vocab, (1, length), generator=generator)
    labels = torch.full_like(ids, IGNORE_INDEX)
    period = int(answer_len / supervised)
    for start in range(period - answer_len, length - answer_len + 1, period):
        labels[0, start:start + answer_len] = ids[0, start:start + answer_len]
    return {"input_ids": ids, "labels": labels, **loss_positions(labels)}


def peak_rss() -> tuple[int, int]:
    """(resident, peak resident) bytes of this process."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def one_variant(preset: str, length: int, supervised: float, variant: str) -> dict[str, float]:
    """In this (fresh) process: the loss, step seconds and peak growth of one variant's step."""
    torch.manual_seed(0)
    model = build_model(preset)
    model.requires_grad_(False)
    model.enable_input_require_grads()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    use_varlen_attention(model)
    model.train()
    loss_fn = LOSSES[variant]
    loss_fn(model, row(256, supervised, model.config.text_config.vocab_size)).backward()  # warm-up
    inputs = row(length, supervised, model.config.text_config.vocab_size)
    before, _ = peak_rss()
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current size
    started = time.perf_counter()
    loss = loss_fn(model, inputs)
    loss.backward()
    seconds = time.perf_counter() - started
    return {"loss": float(loss.detach()), "seconds": seconds, "peak": peak_rss()[1] - before,
            "supervised": int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum()), "vocab": model.config.text_config.vocab_size}


def measured(preset: str, length: int, supervised: float, variant: str) -> dict[str, float]:
    done = subprocess.run([sys.executable, __file__, "--preset", preset, "--lengths", str(length), "--supervised",
                           str(supervised), "--variant", variant], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


LOSSES = {"full": full_logits_loss, "ours": lambda model, inputs: token_mean_loss(model, inputs).value}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="smolvlm-256m")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--supervised", type=float, default=0.2, help="labelled share of the row")
    parser.add_argument("--variant", choices=sorted(LOSSES), help=argparse.SUPPRESS)  # one step, in this process
    args = parser.parse_args(argv)
    if args.variant:
        print(json.dumps(one_variant(args.preset, args.lengths[0], args.supervised, args.variant)))
        return
    print(f"{args.preset} (frozen, gradients from the input embeddings on), fp32 on CPU, "
          f"{torch.get_num_threads()} threads, gradient checkpointing on")
    print("| row tokens | supervised | full logits: peak | step | ours: peak | step | saved | "
          "goal (unsupervised share of fp32 logits) | saved / goal | loss rel. diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for length in args.lengths:
        full = measured(args.preset, length, args.supervised, "full")
        ours = measured(args.preset, length, args.supervised, "ours")
        saved = full["peak"] - ours["peak"]
        goal = (length - ours["supervised"]) * ours["vocab"] * 4
        print(f"| {length:,} | {ours['supervised'] / length:.0%} | {full['peak'] / 2**30:.2f} GiB | "
              f"{full['seconds']:.1f} s | {ours['peak'] / 2**30:.2f} GiB | {ours['seconds']:.1f} s | "
              f"{saved / 2**30:.2f} GiB | {goal / 2**30:.2f} GiB | {saved / goal:.2f} | "
              f"{abs(ours['loss'] - full['loss']) / abs(full['loss']):.1e} |", flush=True)


if __name__ == "__main__":
    main()
