"""Sequence parallelism's host side: the shard of a micro-batch, the loss it adds up to, the group
sizes each model allows, and the settings refused with the fix (the real ranks are in
tests/distributed/test_sequence_parallel.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hpc_train.config_file import load_config
from hpc_train.data.batching.packing import pack_samples
from hpc_train.data.batching.sequence_shard import SAMPLE_COUNTS, SHARD, SequenceShards, shard_batch
from hpc_train.data.decoding.media_share import share_bounds
from hpc_train.data.encoding.loss_positions import LOSS_POSITIONS, LOSS_TARGETS, loss_positions
from hpc_train.data.encoding.tokenize import IGNORE_INDEX, EncodedSample
from hpc_train.dist import DistInfo
from hpc_train.errors import ConfigError
from hpc_train.models.presets import PRESETS
from hpc_train.models.sequence_parallel import allowed_sizes, check_sequence_parallel
from hpc_train.train.build import build_run
from hpc_train.train.engine import PACKAGE_ROOT, resolve_ds_config, share_scale
from hpc_train.train.loss import per_sample_mean
from tests.conftest import FAMILIES

PAD = 0


def padded_batch() -> dict:
    labels = torch.tensor([[-100, -100, 7, 8, 9], [-100, 5, 6, -100, -100]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    ids = torch.tensor([[3, 4, 7, 8, 9], [3, 5, 6, PAD, PAD]])
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "num_real_tokens": 8, "num_slots": 10,
            "num_supervised": 5, "sample_ids": ["a", "b"], "num_skipped": 0, **loss_positions(labels)}


def sample(name: str, labels: list[int]) -> EncodedSample:
    lab = torch.tensor(labels)
    return EncodedSample(id=name, input_ids=torch.arange(len(labels)) + 10, labels=lab, media={},
                         num_media_tokens=0, answers=[])


def packed_batch() -> dict:
    samples = [sample("a", [-100, 1, 2]), sample("b", [-100, -100, 3, 4, 5]), sample("c", [-100, 6])]
    batch = pack_samples(samples, pad_token_id=PAD, family_name="smolvlm", pad_to=11)
    batch.update(num_real_tokens=10, num_slots=11, num_supervised=6, num_skipped=0, **loss_positions(batch["labels"]))
    return batch


def kept(batch: dict, offset: int = 0) -> list[tuple[int, int]]:
    """(row position, target) of every supervised kept position."""
    return sorted((int(p) + offset, int(t)) for row_p, row_t in zip(batch[LOSS_POSITIONS], batch[LOSS_TARGETS],
                                                                   strict=True)
                  for p, t in zip(row_p, row_t, strict=True) if t != IGNORE_INDEX)


@pytest.mark.parametrize("make", [padded_batch, packed_batch], ids=["padded", "packed"])
@pytest.mark.parametrize("size", [2, 3, 4])
def test_the_shards_hold_every_supervised_target_once_and_the_counts_add_up(make, size):
    whole = make()
    shards = [shard_batch(dict(whole), rank=r, size=size, pad_token_id=PAD, media_tokens={"image": 7})
              for r in range(size)]
    length = shards[0]["input_ids"].shape[1] * size
    assert whole["input_ids"].shape[1] <= length < whole["input_ids"].shape[1] + size
    ids = torch.cat([s["input_ids"] for s in shards], dim=1)
    assert torch.equal(ids[:, :whole["input_ids"].shape[1]], whole["input_ids"]) and not ids[:, whole["input_ids"].shape[1]:].any()
    # each placeholder's feature row (row-major order over the batch) goes to the rank holding it
    rows = [s[SHARD].feature_rows["image"].wanted[s[SHARD].rank] for s in shards]
    assert torch.cat(rows).sort().values.tolist() == list(range(int((whole["input_ids"] == 7).sum())))
    assert all(int((s["input_ids"] == 7).sum()) == len(r) for s, r in zip(shards, rows, strict=True))
    assert all("attention_mask" not in s for s in shards)  # right-padded: causal attention is exact
    assert [s[SHARD].offset for s in shards] == [r * length // size for r in range(size)]
    assert sorted(p for s in shards for p in kept(s, s[SHARD].offset)) == kept(whole)
    for key in ("num_real_tokens", "num_supervised"):
        assert sum(s[key] for s in shards) == whole[key], key
    assert sum(s["num_slots"] for s in shards) == ids.numel()
    assert {s[SHARD].loss_count for s in shards} == {whole["num_supervised"]}
    assert all(s["position_ids"].shape == s["input_ids"].shape for s in shards)
    positions = torch.cat([s["position_ids"] for s in shards], dim=1)
    if "cu_seq_lens_q" in whole:  # any padding added is a sample of its own
        bounds = shards[0]["sample_bounds"]
        assert int(shards[0]["cu_seq_lens_q"][-1]) == length == bounds[-1]
        assert all(positions[0, b] == 0 for b in bounds[:-1])
    else:
        assert positions[0].tolist() == list(range(length))


def test_shares_of_the_sample_mean_loss_add_up_to_it():
    whole = packed_batch()
    losses = torch.rand(whole["labels"].shape[1])  # a made-up loss per position
    expected = per_sample_mean(losses[whole[LOSS_POSITIONS][0]], whole[LOSS_POSITIONS][0], whole[LOSS_TARGETS][0],
                               whole["cu_seq_lens_q"])
    total = 0.0
    for rank in range(2):
        part = shard_batch(dict(whole), rank=rank, size=2, pad_token_id=PAD)
        global_positions = part[LOSS_POSITIONS][0] + part[SHARD].offset
        padded = torch.cat([losses, torch.zeros(part["input_ids"].shape[1] * 2 - len(losses))])
        total += per_sample_mean(padded[global_positions], global_positions, part[LOSS_TARGETS][0],
                                 part["cu_seq_lens_q"], counts=part[SAMPLE_COUNTS])
    assert float(total) == pytest.approx(float(expected), rel=1e-6)


def test_left_padding_is_refused():
    batch = padded_batch()
    batch["attention_mask"] = batch["attention_mask"].flip(1)
    with pytest.raises(ValueError, match="right-padded"):
        shard_batch(batch, rank=0, size=2, pad_token_id=PAD)


def test_only_the_first_rank_of_a_group_counts_the_samples():
    def collate(items):
        return {**padded_batch(), "num_skipped": 1}

    first, second = (SequenceShards(collate, rank=r, size=2, pad_token_id=PAD, media_tokens={})([]) for r in (0, 1))
    assert first["sample_ids"] == ["a", "b"] and first["num_skipped"] == 1
    assert second["sample_ids"] == [] and second["num_skipped"] == 0


# The group sizes of each published preset, as the README's table says.
PRESET_SIZES = {"smolvlm-256m": [1, 3, 9], "smolvlm-500m": [1, 5, 15], "smolvlm-2.2b": [1, 2, 4, 8, 16, 32],
                "smolvlm2-256m": [1, 3, 9], "smolvlm2-500m": [1, 5, 15], "smolvlm2-2.2b": [1, 2, 4, 8, 16, 32],
                "llava-onevision-0.5b": [1, 2, 14],
                "llava-onevision-7b": [1, 2, 4, 28]}


@pytest.mark.parametrize("name", sorted(PRESET_SIZES))
def test_group_sizes_each_preset_allows(name):
    text = PRESETS[name].build_config().text_config
    assert allowed_sizes(text) == PRESET_SIZES[name]


def test_a_size_the_heads_cannot_split_names_them_and_the_sizes_that_fit():
    text = PRESETS["smolvlm-256m"].build_config().text_config
    with pytest.raises(ConfigError, match=r"9 attention heads and 3 key/value heads.*\[1, 3, 9\]"):
        check_sequence_parallel(text, 2, world_size=4)
    with pytest.raises(ConfigError, match="does not divide the world size 4"):
        check_sequence_parallel(text, 3, world_size=4)
    check_sequence_parallel(text, 3, world_size=6)


@pytest.mark.parametrize(("count", "size"), [(10, 4), (3, 2), (1, 2), (0, 3), (16, 8)])
def test_vision_shares_cover_every_item_once(count, size):
    bounds = [share_bounds(count, r, size) for r in range(size)]
    assert [i for s, e in bounds for i in range(s, e)] == list(range(count))
    assert max(e - s for s, e in bounds) - min(e - s for s, e in bounds) <= 1


def test_deepspeed_gets_the_data_parallel_world_and_the_group_size(tmp_path):
    config = load_config("tiny_smolvlm", ["train.sequence_parallel=2", "deepspeed.config=ds_configs/zero3.json"])
    ds = resolve_ds_config(config, 2, bf16=False, hidden_size=64)
    assert ds["train_batch_size"] == config.train.micro_batch_size * 2 and ds["sequence_parallel_size"] == 2
    assert share_scale(ds, 2) == 2.0 and share_scale(resolve_ds_config(load_config("tiny_smolvlm"), 2, bf16=False,
                                                                       hidden_size=64), 1) == 1.0
    own = tmp_path / "zero3_no_rs.json"
    own.write_text(json.dumps({**json.loads((PACKAGE_ROOT / "ds_configs" / "zero3.json").read_text()),
                               "zero_optimization": {"stage": 3, "reduce_scatter": False}}))
    with pytest.raises(ConfigError, match="reduce_scatter=false"):
        resolve_ds_config(load_config("tiny_smolvlm", ["train.sequence_parallel=2", f"deepspeed.config={own}"]), 2,
                          bf16=False, hidden_size=64)


def test_a_baseline_run_refuses_sequence_parallelism_before_joining_any_group():
    config = load_config("tiny_smolvlm", ["train.mode=baseline", "train.sequence_parallel=2"])
    with pytest.raises(ConfigError, match="train.sequence_parallel=1"):
        build_run(config, DistInfo(rank=0, world_size=2, local_rank=0, local_world_size=2))


@pytest.fixture(scope="module")
def long_video_set(tmp_path_factory) -> Path:
    from hpc_train.data.sources.synthetic import SyntheticSpec, make_dataset

    out = tmp_path_factory.mktemp("long_videos")
    make_dataset(out, SyntheticSpec(n_train=2, n_eval=0, kinds=("video",), weights={"video": 1.0}, video_frames=32))
    return out / "train.jsonl"


@pytest.mark.parametrize("family", FAMILIES)
def test_the_plan_plays_each_rank_of_a_group_on_its_slice(tmp_path, long_video_set, family):
    from hpc_train.plan.command import make_plan

    args = [f"data.train={long_video_set}", "data.eval=null", "data.video.num_frames=32", "data.max_seq_len=100000",
            "train.micro_batch_size=1", f"output_dir={tmp_path}", "model.dtype=fp32"]
    whole = make_plan(load_config(f"tiny_{family}", args), None, gpus_per_node=2, bf16=False, search="off")
    # a process of its own: the plan's ranks play on PyTorch's fake process group
    done = subprocess.run([sys.executable, "-m", "hpc_train", "plan", f"tiny_{family}", *args,
                           "train.sequence_parallel=2", "--gpus-per-node", "2", "--search", "off",
                           "--json", str(tmp_path / "plan.json")], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    assert "sequence parallelism: each micro-batch shared by 2 ranks" in done.stdout
    split = json.loads((tmp_path / "plan.json").read_text())
    kinds = ("vision activations", "language-model activations", "logits, loss and temporaries")
    before = {k: whole.memory.components()[k] for k in kinds}
    after = {k: split["components_bytes"][k] for k in kinds}
    assert split["sequence_parallel"] == 2 and split["batch"]["tokens"] == whole.memory.batch.tokens
    assert sum(after.values()) <= 0.65 * sum(before.values()), (before, after)
    assert all(after[k] < before[k] for k in kinds), (before, after)


def test_a_preset_s_plan_cuts_its_batch_at_the_processor_s_media_tokens(tmp_path, long_video_set):
    """A preset's published architecture has other token ids than its processor; the plan's
    architecture has the processor's, as the run's saved preset does."""
    from hpc_train.data.pipeline import build_pipeline
    from hpc_train.models.presets import get_preset
    from hpc_train.plan.planner import Planner
    from hpc_train.plan.worst_batch import worst_batch

    args = ["model.path=null", "model.preset=smolvlm-256m", f"data.train={long_video_set}", "data.eval=null",
            "data.video.num_frames=8", "train.micro_batch_size=1", "train.grad_accum=1", f"output_dir={tmp_path}"]
    planner = Planner(load_config("smolvlm_lora", args), 3, bf16=False, on_gpu=False)
    image = planner.processor.tokenizer.convert_tokens_to_ids("<image>")
    assert get_preset("smolvlm-256m").build_config().image_token_id != image == planner.architecture.image_token_id
    config = load_config("smolvlm_lora", [*args, "train.sequence_parallel=3"])
    pipeline = build_pipeline(config.data, planner.processor, planner.family)
    batch = worst_batch(config, pipeline, planner.records, planner.lengths(config, pipeline))
    parts = planner._rank_batches(config, batch)
    rows = [p[SHARD].feature_rows["image"] for p in parts]
    placeholders = int((batch.batch["input_ids"] == planner.processor.tokenizer.convert_tokens_to_ids("<image>")).sum())
    assert placeholders > 0 and sum(len(r.wanted[r.rank]) for r in rows) == placeholders
    assert all(len(r.encoded[r.rank]) for r in rows)  # each of the 3 ranks encodes its share of the frames


def test_a_plan_refuses_to_play_ranks_in_a_process_with_a_real_world():
    import torch.distributed as dist

    from hpc_train.errors import HpcTrainError
    from hpc_train.plan.fake_world import sequence_group

    made = not dist.is_initialized()
    if made:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(HpcTrainError, match="run hpc-train plan in a process of its own"):
            sequence_group(2, 2)
    finally:
        if made:
            dist.destroy_process_group()


def test_the_flops_of_a_group_s_slices_add_up_to_the_whole_sequence_s():
    from profiling.flops import Trainability, shape_of, step_flops

    shape = shape_of(PRESETS["smolvlm-256m"].build_config())
    trains = Trainability(trains=frozenset({"llm", "head"}))
    whole = step_flops(shape, trains, tokens=30_000, samples=1, images=0)
    slices = [step_flops(shape, trains, tokens=10_000, samples=int(r == 0), images=0, context=30_000)
              for r in range(3)]
    assert sum(f.total for f in slices) == pytest.approx(whole.total, rel=1e-9)
    assert slices[1].total > step_flops(shape, trains, tokens=10_000, samples=1, images=0).total
