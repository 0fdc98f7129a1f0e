"""Every training mode resumes to the uninterrupted run: a world of one, the real tiny model, real
DeepSpeed, real checkpoints and the run's own DataLoader. The interrupted run is the
uninterrupted one's folder as a kill after its step-2 checkpoint leaves it (the checkpoint
alone); it must train steps 3 and 4 to the same losses and the same weights."""

from __future__ import annotations

import shutil

import pytest
import torch

from hpc_train.train.checkpoint import LATEST, tag_for
from hpc_train.train.metrics import read_metrics
from hpc_train.train.trainer import TrainLoop

MODES = {
    "full": ["train.mode=full"],
    "full-vision-frozen": ["train.mode=full", "model.freeze=[vision]"],
    "lora": ["train.mode=lora"],
    "qlora": ["train.mode=qlora"],
    "lora-vision-cache": ["train.mode=lora", "data.vision_cache={cache}"],
    "full-zero3": ["train.mode=full", "deepspeed.config=ds_configs/zero3.json"],
    # SmolVLM2's LoRA recipe: the frozen tower's features from the cache
    "smolvlm2-lora-vision-cache": ["model.family=smolvlm2", "model.path={smolvlm2}", "train.mode=lora",
                                   "data.vision_cache={cache}"],
}


def metrics(parts) -> list[dict]:
    return read_metrics(parts.output / "metrics.jsonl")


def trained(parts) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in parts.training.engine.module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", list(MODES))
def test_a_run_resumed_from_its_checkpoint_trains_on_as_if_never_stopped(build, tiny_model_dirs, tmp_path, capsys, mode):
    setting = [s.format(cache=tmp_path / "vision_cache", smolvlm2=tiny_model_dirs["smolvlm2"]) for s in MODES[mode]]
    steps = ["train.max_steps=4", "train.save_every=2", "data.max_seq_len=512", "lora.dropout=0.1"]
    whole = build(*steps, *setting)
    assert TrainLoop(whole).train() == 0
    expected, weights = metrics(whole)[2:], trained(whole)
    assert [r["step"] for r in expected] == [3, 4]

    stopped = tmp_path / "stopped"
    saved = whole.output / "checkpoints" / tag_for(2)
    shutil.copytree(saved, stopped / "checkpoints" / tag_for(2))
    (stopped / "checkpoints" / LATEST).write_text(tag_for(2))
    capsys.readouterr()
    resumed = build(*steps, *setting, f"output_dir={stopped}")
    assert f"resumed from {stopped / 'checkpoints' / tag_for(2)} at step 2" in capsys.readouterr().out
    assert TrainLoop(resumed).train() == 0
    got = metrics(resumed)
    assert [r["step"] for r in got] == [3, 4]
    for key in ("loss", "grad_norm", "lr"):
        assert [r[key] for r in got] == pytest.approx([r[key] for r in expected], rel=1e-6), key
    after = trained(resumed)
    assert after.keys() == weights.keys()
    assert all(torch.allclose(after[n], weights[n], rtol=1e-6, atol=1e-7) for n in weights)
