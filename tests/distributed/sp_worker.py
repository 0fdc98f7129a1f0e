"""A training run that also records every trained parameter's full gradient at each optimizer
step (DeepSpeed's ``safe_get_full_grad``, a collective under ZeRO-3), for the
sequence-parallel tests. Run by torchrun: ``sp_worker.py GRADS_FILE RECIPE key=value ...``;
rank 0 writes ``{step: {name: gradient}}`` to GRADS_FILE, every rank the number of tiles / frames
its vision tower encoded in training and the video frames it decoded to ``GRADS_FILE.rank<r>``; the losses are in the run's metrics.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from deepspeed.utils import safe_get_full_grad

from hpc_train.config_file import load_config
from hpc_train.dist import cleanup, read_dist_env
from hpc_train.train.build import build_run
from hpc_train.train.profile_report import vision_tower
from hpc_train.train.trainer import TrainLoop


def main(grads_file: str, recipe: str, *overrides: str) -> None:
    parts = build_run(load_config(recipe, list(overrides)), read_dist_env())
    assert parts.training is not None
    engine = parts.training.engine
    recorded: dict[int, dict[str, torch.Tensor]] = {}
    step = engine.step

    def recording_step() -> None:
        if engine.is_gradient_accumulation_boundary():
            recorded[len(recorded) + 1] = {name: safe_get_full_grad(p).detach().clone()
                                           for name, p in engine.module.named_parameters() if p.requires_grad}
        step()

    engine.step = recording_step
    encoded = [0]

    def count(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        pixels = args[0] if args else kwargs["pixel_values"]
        encoded[0] += pixels.shape[0] if module.training else 0

    vision_tower(parts.loaded.model, parts.loaded.family).register_forward_pre_hook(count, with_kwargs=True)
    decoded = [0]
    assert parts.train is not None
    media = parts.train.dataset.media
    load = media.load

    def counting_load(record: object) -> object:
        loaded = load(record)
        decoded[0] += sum(len(v.frames) if v.decoded is None else v.decoded[1] - v.decoded[0] for v in loaded.videos)
        return loaded

    media.load = counting_load
    TrainLoop(parts).train()
    Path(f"{grads_file}.rank{parts.info.rank}").write_text(f"{encoded[0]} {decoded[0]}")
    if parts.info.rank == 0:
        torch.save(recorded, grads_file)


if __name__ == "__main__":
    try:
        main(*sys.argv[1:])
    finally:
        # As the CLI does: gloo's threads left to interpreter exit sometimes abort the process
        # (status -6, "terminate called without an active exception") after a run that succeeded.
        cleanup()
