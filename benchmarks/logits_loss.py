"""Our supervised-only head against DeepSpeed's tiled fused logits-loss (ALST's
``TiledFusedLogitsLoss``): peak live tensor bytes, time and the loss of one forward and
backward of the head and the loss, side by side in one process.

The input is a long row's last hidden states (1, T, hidden) of a published preset's size
(its vocabulary and hidden width, random weights), a share of whose positions are supervised
(answer tokens); the head is frozen and the hidden states take the gradient, as under LoRA.
Arms:

- ``supervised only`` (ours, :mod:`hpc_train.train.loss`): the head runs on the supervised
  positions alone, one fp32 logits tensor of (supervised, vocab).
- ``DeepSpeed tiled, every position``: ``TiledFusedLogitsLoss`` over the whole row in tiles of
  ``--tile`` positions (the unsupervised ones ignored by the loss), backward inside its forward.
- ``the loop's head``: what the training loop runs (:mod:`hpc_train.train.logits_tiles`): ours
  while the supervised positions' fp32 logits fit ``--tile-mib`` (``train.logits_tile_mib``),
  past that DeepSpeed's tiled loss over those positions, in tiles of that size.

Peaks are measured by :class:`profiling.live_tensors.LiveTensorBytes` above what is live before
the arm (the hidden states and the head). The goal decides which head the training loop uses:
the lower peak at the supervised shares users train (answers of tens to thousands of tokens
after a long video), at equal loss (1e-6 relative).

    python benchmarks/logits_loss.py [--preset smolvlm-256m] [--tokens 8192] [--supervised 0.01 0.1 0.5 1]
        [--tile 1024] [--tile-mib 256]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpc_train.data.encoding.tokenize import IGNORE_INDEX  # noqa: E402
from hpc_train.models.presets import PRESETS  # noqa: E402
from hpc_train.train.logits_tiles import logits_tiles, tiled_weighted_loss  # noqa: E402
from hpc_train.train.loss import token_losses  # noqa: E402
from profiling.live_tensors import LiveTensorBytes  # noqa: E402


def ours(head: torch.nn.Linear, hidden: torch.Tensor, targets: torch.Tensor, tile: int, tile_mib: float = 0
         ) -> torch.Tensor:
    keep = (targets[0] != IGNORE_INDEX).nonzero().squeeze(1)
    logits = head(hidden[:, keep])
    return token_losses(logits, targets[:, keep]).sum() / len(keep)


def _tiled(head: torch.nn.Linear, hidden: torch.Tensor, targets: torch.Tensor, tile: int) -> torch.Tensor:
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss

    def loss_sum(module: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(module(x).float(), y, ignore_index=IGNORE_INDEX, reduction="sum")

    shards = max(1, -(-hidden.shape[1] // tile))
    total = TiledFusedLogitsLoss.apply(loss_sum, head, hidden, targets, None, shards, [head.weight], "sum")
    return total / int((targets != IGNORE_INDEX).sum())


def deepspeed_every_position(head: torch.nn.Linear, hidden: torch.Tensor, targets: torch.Tensor, tile: int,
                             tile_mib: float = 0) -> torch.Tensor:
    return _tiled(head, hidden, targets, tile)


def loops_head(head: torch.nn.Linear, hidden: torch.Tensor, targets: torch.Tensor, tile: int, tile_mib: float
               ) -> torch.Tensor:
    keep = (targets[0] != IGNORE_INDEX).nonzero().squeeze(1)
    tiles = logits_tiles(len(keep), head.out_features, tile_mib)
    if tiles == 1:
        return ours(head, hidden, targets, tile)
    weights = torch.full((1, len(keep)), 1 / len(keep))
    return tiled_weighted_loss(head, hidden[:, keep], targets[:, keep], weights, tiles, tied=False)


ARMS: dict[str, Callable[..., torch.Tensor]] = {
    "supervised only (ours)": ours,
    "DeepSpeed tiled, every position": deepspeed_every_position,
    "the loop's head": loops_head,
}


def targets_of(tokens: int, supervised: float, vocab: int, answer: int = 64) -> torch.Tensor:
    """(1, T) next-token targets, answers of ``answer`` tokens spread to make ``supervised`` of them."""
    generator = torch.Generator().manual_seed(tokens)
    targets = torch.full((1, tokens), IGNORE_INDEX)
    period = max(answer, int(answer / supervised))
    for start in range(period - answer, tokens - answer + 1, period):
        targets[0, start:start + answer] = torch.randint(0, vocab, (answer,), generator=generator)
    return targets


def measure(arm: Callable[..., torch.Tensor], head: torch.nn.Linear, hidden: torch.Tensor, targets: torch.Tensor,
            tile: int, tile_mib: float) -> dict[str, float]:
    x = hidden.detach().clone().requires_grad_(True)
    with LiveTensorBytes() as live:
        live.adopt([x, head.weight])
        live.mark()
        start = live.current
        began = time.perf_counter()
        loss = arm(head, x, targets, tile, tile_mib)
        loss.backward()
        seconds = time.perf_counter() - began
        peak = live.peak_since_mark - start
    return {"loss": float(loss.detach()), "peak": peak, "seconds": seconds, "grad": x.grad}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="smolvlm-256m", choices=sorted(PRESETS))
    parser.add_argument("--tokens", type=int, default=8192, help="positions of the row")
    parser.add_argument("--supervised", type=float, nargs="+", default=[0.01, 0.1, 0.5, 1.0])
    parser.add_argument("--tile", type=int, default=1024, help="positions per tile of DeepSpeed's loss")
    parser.add_argument("--tile-mib", type=float, default=256.0, help="the loop's train.logits_tile_mib")
    args = parser.parse_args(argv)
    text = PRESETS[args.preset].build_config().text_config
    torch.manual_seed(0)
    head = torch.nn.Linear(text.hidden_size, text.vocab_size, bias=False).requires_grad_(False)
    hidden = torch.randn(1, args.tokens, text.hidden_size)
    print(f"{args.preset} head ({text.hidden_size} x {text.vocab_size:,}, frozen), {args.tokens:,} positions, "
          f"fp32 on the CPU, {torch.get_num_threads()} threads; DeepSpeed tiles of {args.tile} positions, "
          f"the loop's of {args.tile_mib:g} MiB")
    print("| supervised | " + " | ".join(f"{name}: peak MiB, s" for name in ARMS) + " | loss, gradient rel. diff |")
    print("|---|" + "---|" * (len(ARMS) + 1))
    for share in args.supervised:
        targets = targets_of(args.tokens, share, text.vocab_size)
        results = [measure(arm, head, hidden, targets, args.tile, args.tile_mib) for arm in ARMS.values()]
        base = results[0]
        diff = max(max(abs(r["loss"] - base["loss"]) / abs(base["loss"]),
                       float((r["grad"] - base["grad"]).abs().max() / base["grad"].abs().max())) for r in results[1:])
        cells = " | ".join(f"{r['peak'] / 2**20:.0f}, {r['seconds']:.2f}" for r in results)
        count = int((targets != IGNORE_INDEX).sum())
        print(f"| {count:,} ({count / args.tokens:.0%}) | {cells} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
