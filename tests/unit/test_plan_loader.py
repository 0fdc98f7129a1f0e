"""``hpc-train plan`` says whether the loader keeps the GPU fed: the planned micro-batch's samples
timed through the run's own sample path, decoded and prepared, against the GPU's time."""

from __future__ import annotations

import pytest

from hpc_train.config_file import load_config
from hpc_train.data import dataset as dataset_module
from hpc_train.data.sources.mixture import read_split
from hpc_train.models.families import get_family
from hpc_train.plan import loader as loader_module
from hpc_train.plan.command import format_plan, make_plan, to_dict
from hpc_train.plan.gpus import gpu_named
from hpc_train.plan.loader import LoaderTime, describe_loader, job_cpus_per_gpu, loader_time
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
                                            "prepared_seconds_one_core", "cpus_per_gpu", "loading_at_once",
                                            "samples_timed", "videos_decoded_by_gpu"}
    assert make_plan(config, gpu_named("H100-80GB"), bf16=True, search="off", loader=False).loader is None
    assert make_plan(config, None, bf16=False, search="off").loader is None  # no GPU, no step time to compare with


@pytest.mark.parametrize(("budget_s", "timed"), [(600.0, 2), (0.0, 1)])
def test_each_video_is_decoded_once_and_a_slow_micro_batch_is_timed_in_part(loaded_tiny, synthetic_data,
                                                                            monkeypatch, budget_s, timed):
    """The prepared pass reads the frames the decoding pass decoded (it decodes nothing); past
    the time budget the rest of the micro-batch is estimated from the samples timed."""
    decodes = []
    real = dataset_module.load_video

    def counted(path, *args, **kwargs):
        decodes.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(dataset_module, "load_video", counted)
    monkeypatch.setattr(loader_module, "BUDGET_S", budget_s)
    config = config_for(synthetic_data)
    records = [r for r in read_split(config, "train") if r.videos and not r.images][:3]
    found = loader_time(config.data, loaded_tiny["llava_onevision"][1], get_family("llava_onevision"), records)
    assert (found.timed, found.samples) == (timed, 3) and found.prepared_seconds is not None
    assert decodes == [r.videos[0] for r in records[:timed + 1]]  # the warm-up's sample, then those timed
    said = describe_loader(found, (0.4, 1.0))[0]
    assert ("(timed on 1 of its 3 samples)" in said) == (timed == 1)


def test_workers_count_as_far_as_the_job_s_cpus_per_gpu_go(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert job_cpus_per_gpu(2) is None  # not in a job: the workers as asked
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_CPUS_ON_NODE", "8")
    assert job_cpus_per_gpu(4) == 2
    short = LoaderTime(seconds=2.0, prepared_seconds=None, workers=6, videos=0, cpus_per_gpu=2)
    assert short.loaders == 1 and short.headroom(1.0) == 0.5
    lines = describe_loader(short, (1.0, 2.0))
    assert "data.num_workers=6, of which 1 load at once on the job's 2 CPUs per GPU (one runs the rank)" in lines[0]
    assert "Fix: or 2 loading workers per GPU" not in lines[1]
    assert "2 loading workers per GPU (data.num_workers=2, with 3 CPUs per GPU: sbatch --cpus-per-task)" in lines[1]
    roomy = LoaderTime(seconds=2.0, prepared_seconds=None, workers=6, videos=0, cpus_per_gpu=16)
    assert roomy.loaders == 6 and "data.num_workers=6 on the job's 16 CPUs per GPU" in describe_loader(roomy, (1.0, 2.0))[0]


def test_videos_the_gpu_decodes_are_left_out_of_the_workers_time(loaded_tiny, synthetic_data, monkeypatch):
    decodes = []
    real = dataset_module.load_video
    monkeypatch.setattr(dataset_module, "load_video", lambda *a, **k: decodes.append(a[0]) or real(*a, **k))
    config = config_for(synthetic_data, "data.video.device=cuda")
    records = [r for r in read_split(config, "train") if r.videos and not r.images][:3]
    found = loader_time(config.data, loaded_tiny["llava_onevision"][1], get_family("llava_onevision"), records)
    assert found.on_gpu and found.prepared_seconds is None and decodes == []
    assert "(process and encode; its videos decoded by the GPU, not timed)" in describe_loader(found, (0.4, 1.0))[0]
