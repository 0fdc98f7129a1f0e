"""``slurm/prepare_media.slurm`` on the real SLURM: an array job decodes each video once, a
share per task, into the store the training run then reads."""

from __future__ import annotations

from hpc_train.config_file import load_config
from hpc_train.data.caches.feature_store import FeatureStore
from hpc_train.prepare_media import run_videos

from .conftest import job_failure, log_of, sbatch, wait_for_job


def test_an_array_job_prepares_every_video_once_a_share_per_task(cluster, synthetic_data, tmp_path):
    store = tmp_path / "prepared"
    overrides = [f"data.train={synthetic_data / 'train.jsonl'}", f"data.eval={synthetic_data / 'eval.jsonl'}",
                 "data.video.num_frames=4", f"data.prepared_media={store}"]
    submitted = sbatch(cluster, "--parsable", "--array=0-1", "--cpus-per-task=2", f"--output={tmp_path}/%x-%A_%a.out",
                       "slurm/prepare_media.slurm", "CONFIG=tiny_smolvlm2", *overrides)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip()
    stored = 0
    for task in (0, 1):
        state = wait_for_job(cluster, f"{job}_{task}")
        log = log_of(tmp_path / f"hpc-prepare-media-{job}_{task}.out")
        assert state["JobState"] == "COMPLETED", job_failure(state, log)
        assert f"array task {task} of 2" in log and f"shard {task + 1} of 2:" in log and "2 worker process(es)" in log
        stored += int(log.split(" decoded and stored")[0].rsplit(" ", 1)[1])
    videos = run_videos(load_config("tiny_smolvlm2", overrides))
    entries = list(FeatureStore(store).root.rglob("*.safetensors"))
    assert stored == len(videos) == len(entries) > 0  # each video once, none twice
