"""``hpc-train plan`` says whether the loader keeps the GPU fed: the planned micro-batch's samples
timed through the run's own sample path, decoded and prepared, against the GPU's time."""

from __future__ import annotations

import pytest

from hpc_train.config_file import load_config
from hpc_train.data.mixture import read_split
from hpc_train.models.families import get_family
from hpc_train.plan.command import format_plan, make_plan, to_dict
from hpc_train.plan.gpus import gpu_named
from hpc_train.plan.loader import LoaderTime, describe_loader, loader_time
from tests.conftest import TINY_RECIPES as RECIPES


def config_for(synthetic_data, *overrides: str):
    return load_config(RECIPES["llava_onevision"], [f"data.train={synthetic_data / 'train.jsonl'}", "data.eval=null",
                                                    "data.video.num_frames=4", *overrides])


def test_a_micro_batch_with_videos_is_timed_decoded_and_prepared(loaded_tiny, synthetic_data, tmp_path):
    config = config_for(synthetic_data)
    records = [r for r in read_split(config, "train") if r.videos][:3]
    timed = loader_time(config.data, loaded_tiny["llava_onevision"][1], get_family("llava_onevision"), records)
    assert timed.seconds > 0 and timed.prepared_seconds is not None and timed.prepared_seconds > 0
    assert timed.videos == 3 and timed.workers == config.data.num_workers
    # a run that reads prepared media already is timed as it is, with nothing to add
    ready = config.data.model_copy(update={"prepared_media": str(tmp_path / "store")})
    assert loader_time(ready, loaded_tiny["llava_onevision"][1], get_family("llava_onevision"),
                       records).prepared_seconds is None


@pytest.mark.parametrize(("workers", "said_low", "fix"), [(2, "headroom 0.40-1.00", True), (8, "headroom 1.60-4.00", False),
                                                          (0, "headroom 0.20-0.50", True)])
def test_the_headroom_is_what_the_workers_deliver_over_what_the_gpu_takes(workers, said_low, fix):
    timed = LoaderTime(seconds=2.0, prepared_seconds=0.1, workers=workers, videos=4)
    lines = describe_loader(timed, (0.4, 1.0))
    assert said_low in lines[0]
    assert "with its 4 video(s) prepared (hpc-train prepare-media): 0.10 s, headroom" in lines[1]
    assert any("the GPU will wait for data. Fix: prepare the videos" in line for line in lines) == fix


def test_the_plan_says_the_loader_s_headroom_with_a_step_time(synthetic_data):
    config = config_for(synthetic_data)
    plan = make_plan(config, gpu_named("H100-80GB"), bf16=True, search="off")
    assert plan.loader is not None and "loader: this micro-batch takes" in format_plan(plan)
    assert set(to_dict(plan)["loader"]) == {"seconds_one_core", "workers", "gpu_seconds", "headroom",
                                            "prepared_seconds_one_core"}
    assert make_plan(config, gpu_named("H100-80GB"), bf16=True, search="off", loader=False).loader is None
    assert make_plan(config, None, bf16=False, search="off").loader is None  # no GPU, no step time to compare with
