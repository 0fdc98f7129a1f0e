"""One rank of a real ZeRO-3 run of :class:`Net` (``python gather_worker.py RESULT`` under a
launcher's RANK / WORLD_SIZE / MASTER_* environment): the live tensor bytes its third step
reaches above what was live when the step began, written to RESULT (JSON).

:class:`Net` has the three ways a step meets ZeRO-3's gathering: a frozen tower run without
autograd (as the vision cache encodes), frozen layers a gradient flows back through (a
language model under LoRA), trainable layers; its parameters outweigh its activations, so the
peak is mostly what DeepSpeed holds whole."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

WIDTH, DEPTH, ROWS = 256, 4, 32
DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": 100_000,
                          "stage3_prefetch_bucket_size": 50_000, "stage3_param_persistence_threshold": 1_000,
                          "stage3_max_live_parameters": 1_000_000_000, "stage3_max_reuse_distance": 1_000_000_000},
}
"""Prefetching a fifth of a layer per fetch, biases kept whole."""


class Tower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(DEPTH))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            for layer in self.layers:
                x = torch.relu(layer(x))
        return x


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tower = Tower().requires_grad_(False)
        self.adapter = nn.Linear(WIDTH, WIDTH)
        self.body = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(DEPTH)).requires_grad_(False)
        self.head = nn.Linear(WIDTH, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.adapter(self.tower(x))
        for layer in self.body:
            h = torch.relu(layer(h))
        return self.head(h).square().mean()


def batch() -> torch.Tensor:
    return torch.randn(ROWS, WIDTH, generator=torch.Generator().manual_seed(0))


def main(result: Path) -> None:
    import deepspeed

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from profiling.live_tensors import LiveTensorBytes

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = Net()
    engine, *_ = deepspeed.initialize(model=model, config=DS_CONFIG, optimizer=torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad]))
    x = batch()
    live = LiveTensorBytes()
    with live:
        for _ in range(3):  # from the second on, DeepSpeed runs on the trace the first recorded
            live.mark()
            start = live.current
            engine.backward(engine(x))
            engine.step()
    result.write_text(json.dumps({"above_start": live.peak_since_mark - start}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
