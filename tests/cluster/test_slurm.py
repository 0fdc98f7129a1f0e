"""The shipped SLURM templates against a real SLURM: 2 nodes, CPU ranks (gloo)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hpc_train.train.metrics import read_metrics
from profiling.report import read_report
from tests.filesystems import read_only_dir

from .conftest import (
    ROOT,
    job_failure,
    job_state,
    log_of,
    processes_of_job,
    sbatch,
    wait_for_job,
    wait_until,
)

TEMPLATES = ("baseline", "lora", "qlora")
STEPS = 100
"""Steps of the template runs: enough that a warning sent after the first logged step lands
before the last one even on an idle machine (a tiny LoRA step on 2 ranks takes about 0.05 s, the
warning up to 1.5 s to reach the ranks: 30 steps once ended first)."""


@pytest.fixture(scope="module")
def job_args(tiny_model_dirs, synthetic_data):
    """Config overrides that point a template at the tiny model and the synthetic data."""

    def make(out: Path, *extra: str) -> list[str]:
        return [f"model.path={tiny_model_dirs['smolvlm']}", "model.preset=null", "model.dtype=fp32",
                f"data.train={synthetic_data / 'train.jsonl'}", f"data.eval={synthetic_data / 'eval.jsonl'}",
                "data.num_workers=0", "data.max_seq_len=512",
                "train.micro_batch_size=4", "train.grad_accum=1", f"train.max_steps={STEPS}", "train.log_every=1",
                "eval.max_samples=8", "eval.batch_size=4", "eval.generate=false", f"output_dir={out}",
                # The cluster's GPUs are fake: CPU runs on purpose (without it, the next test shows, the job stops).
                "train.device=cpu",
                f"profile.copy_to={out.parent / 'results' / 'profiling' / '{mode}_profiling.json'}", *extra]

    return make


def ok_job(cluster, *args: str, extra_env: dict[str, str] | None = None) -> tuple[str, dict[str, str]]:
    submitted = sbatch(cluster, "--parsable", *args, extra_env=extra_env)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    state = wait_for_job(cluster, job)
    return job, state


@pytest.fixture(scope="module")
def template_runs(cluster, job_args, tmp_path_factory):
    """Each template once on 2 nodes. baseline: a CPU-only allocation (no GPUs), plain srun
    with 2 tasks per node; lora: the template as shipped (one fake GPU per node, one rank per
    node, torchrun); qlora: the DeepSpeed launcher on 2 GPUs per node (4 ranks)."""
    runs = {}
    how = {"baseline": (["--gpus-per-node=0"], {"LAUNCHER": "srun", "NPROC_PER_NODE": "2"}),
           "lora": ([], {"PLAN_GPU": "L4"}),
           # a value with commas, which DeepSpeed's srun --export=ALL,K=V,... would cut
           "qlora": (["--gpus-per-node=2"], {"LAUNCHER": "deepspeed", "NCCL_IB_HCA": "mlx5_0,mlx5_1"})}
    for mode in TEMPLATES:
        root = tmp_path_factory.mktemp(f"slurm_{mode}")
        options, env = how[mode]
        log = ROOT / "logs" if mode == "baseline" else root
        output = [] if mode == "baseline" else [f"--output={root}/%x-%j.out"]
        job, state = ok_job(cluster, "-N", "2", *options, *output, f"slurm/{mode}.slurm",
                            *job_args(root / "out"), extra_env=env)
        path = log / f"hpc-{mode}-{job}.out"
        runs[mode] = {"job": job, "state": state, "out": root / "out", "root": root, "log": log_of(path)}
        if mode == "baseline":
            path.unlink(missing_ok=True)  # the template's own logs/ folder: leave the checkout clean
    return runs


@pytest.mark.parametrize("mode", TEMPLATES)
def test_template_completes_on_two_nodes(template_runs, mode):
    run = template_runs[mode]
    assert run["state"]["JobState"] == "COMPLETED" and run["state"]["ExitCode"] == "0:0", \
        job_failure(run["state"], run["log"])
    assert run["state"]["NumNodes"] == "2"
    report = read_report(run["out"] / "profile" / "report.json")
    assert report["environment"]["hosts"] == ["slnode1", "slnode2"]
    ranks = 2 if mode == "lora" else 4
    assert report["run"]["world_size"] == ranks and report["run"]["nodes"] == 2 and report["run"]["mode"] == mode
    assert sorted(r["host"] for r in report["per_rank"]) == sorted(["slnode1", "slnode2"] * (ranks // 2))
    assert report["environment"]["slurm_job_id"] == run["job"]
    assert read_report(run["root"] / "results" / "profiling" / f"{mode}_profiling.json") == report
    assert "nodes 2 (slnode1,slnode2)" in run["log"]
    # Every node was checked first (one srun task each, labelled): the allocation as SLURM gave it, nothing blocking.
    assert "0: hpc-train doctor: no blockers" in run["log"] and "1: hpc-train doctor: no blockers" in run["log"]
    assert re.search(rf"SLURM job +INFO +job {run['job']} \(hpc-{mode}\)", run["log"]), run["log"][-6000:]
    evaluated = json.loads((run["out"] / "eval_results.json").read_text())
    assert evaluated["samples"] == 8
    if mode == "baseline":
        assert report["workload"] == "evaluation" and not (run["out"] / "metrics.jsonl").exists()
        assert "from slurm" in run["log"]  # plain srun: ranks from SLURM_PROCID / SLURM_NTASKS
    else:
        rows = [r for r in read_metrics(run["out"] / "metrics.jsonl") if "loss" in r]
        assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
        assert (run["out"] / "adapter" / "adapter_model.safetensors").is_file()
    if mode == "lora":
        assert "[torchrun.sh] node 0 of 2" in run["log"] and "[torchrun.sh] node 1 of 2" in run["log"]
        # Planned in the batch shell for the job's 2 x 1 GPUs, and kept beside the (CPU) measurement.
        planned = json.loads((run["out"] / "plan.json").read_text())
        assert planned["fits"] and planned["nodes"] == 2 and planned["gpu"] == "L4-24GB"
        assert "peak per rank:" in run["log"] and report["run"]["plan"]["peak_allocated_gib"] == \
            planned["peak_allocated_gib"]
    if mode == "qlora":
        assert "[deepspeed.sh] 2 node(s) (slnode1 slnode2) x 2 process(es)" in run["log"]
        assert "NCCL_IB_HCA=mlx5_0,mlx5_1" in report["environment"]["network_env"]  # whole, on the ranks


def test_test_only_accepts_every_template(cluster):
    for mode in TEMPLATES:
        checked = sbatch(cluster, "--test-only", "-N", "2", f"slurm/{mode}.slurm")
        assert checked.returncode == 0, checked.stderr
        assert "to start at" in checked.stderr


@pytest.mark.parametrize(("options", "message"), [
    (["-N", "3"], "More processors requested than permitted"),
    (["--gpus-per-node=8"], "Requested node configuration is not available"),
])
def test_impossible_resources_fail_with_slurms_own_message(cluster, options, message):
    refused = sbatch(cluster, *options, "slurm/qlora.slurm")
    assert refused.returncode != 0 and refused.stdout == ""
    assert f"sbatch: error: Batch job submission failed: {message}" in refused.stderr
    checked = sbatch(cluster, "--test-only", *options, "slurm/qlora.slurm")
    assert checked.returncode != 0 and "allocation failure" in checked.stderr


def test_a_gpu_job_whose_cuda_does_not_work_stops_before_any_rank(cluster, job_args, tmp_path):
    """The template as shipped (a fake GPU per node, on which CUDA cannot work) without
    train.device=cpu: the job must not train on the CPU unnoticed. Its workers, more than the
    node's 8 CPUs allow, are lowered first, and the log says so."""
    overrides = [a for a in job_args(tmp_path / "out") if a != "train.device=cpu"] + ["data.num_workers=12"]
    job, state = ok_job(cluster, "-N", "1", f"--output={tmp_path}/%x-%j.out", "slurm/lora.slurm", *overrides)
    log = log_of(tmp_path / f"hpc-lora-{job}.out")
    assert state["JobState"] == "FAILED", log[-4000:]
    assert "data.num_workers=12 lowered to 7: 8 CPUs on this node for 1 rank(s) leave 8 per rank" in log, log[-4000:]
    assert re.search(r"(SLURM_GPUS_ON_NODE|SLURM_JOB_GPUS|CUDA_VISIBLE_DEVICES)=\S+, but", log), log[-4000:]
    assert "the run would train on the CPU" in log and "train.device=cpu" in log
    assert "hpc-train doctor found a blocker on" in log and "[torchrun.sh]" not in log
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_a_blocker_found_by_the_doctor_stops_the_job_before_any_rank(cluster, job_args, tmp_path):
    with read_only_dir(tmp_path / "ro") as ro:
        job, state = ok_job(cluster, "-N", "2", f"--output={tmp_path}/%x-%j.out", "slurm/lora.slurm",
                            *job_args(ro / "out"))
    log = log_of(tmp_path / f"hpc-lora-{job}.out")
    assert state["JobState"] == "FAILED" and state["ExitCode"] == "2:0", log[-4000:]
    assert "output dir" in log and "not writable" in log
    assert "hpc-train doctor found a blocker on" in log and "nothing was launched" in log
    assert "[torchrun.sh]" not in log and not (ro / "out").exists()


def test_a_run_the_plan_says_cannot_fit_stops_the_job_before_any_rank(cluster, job_args, tmp_path):
    args = [*job_args(tmp_path / "out"), "model.path=null", "model.preset=llava-onevision-7b",
            "model.family=llava_onevision", "train.mode=full"]
    job, state = ok_job(cluster, "-N", "2", f"--output={tmp_path}/%x-%j.out", "slurm/lora.slurm", *args,
                        extra_env={"CONFIG": "llava_onevision_lora", "PLAN_GPU": "A100-40GB", "DOCTOR": "0"})
    log = log_of(tmp_path / f"hpc-lora-{job}.out")
    assert state["JobState"] == "FAILED" and state["ExitCode"] == "2:0", log[-4000:]
    assert "DOES NOT FIT" in log and "train.mode=qlora" in log
    assert "the plan above does not fit the job's GPUs; nothing was launched" in log
    assert "[torchrun.sh]" not in log and not (tmp_path / "out" / "metrics.jsonl").exists()


def test_sequence_parallel_across_two_nodes_and_a_size_the_job_cannot_take(cluster, job_args, tmp_path):
    args = [*job_args(tmp_path / "out"), "train.max_steps=2"]
    job, state = ok_job(cluster, "-N", "2", f"--output={tmp_path}/%x-%j.out", "slurm/lora.slurm", *args,
                        extra_env={"SEQUENCE_PARALLEL": "2", "PLAN_GPU": "L4"})
    log = log_of(tmp_path / f"hpc-lora-{job}.out")
    assert state["JobState"] == "COMPLETED", log[-4000:]
    # the plan plays both ranks of the group (on PyTorch's fake process group), then the run trains
    assert "sequence parallelism: each micro-batch shared by 2 ranks" in log, log[-4000:]
    assert json.loads((tmp_path / "out" / "plan.json").read_text())["sequence_parallel"] == 2
    assert "sequence parallelism: 1 groups of 2 ranks" in log
    assert len(read_metrics(tmp_path / "out" / "metrics.jsonl")) >= 2
    job, state = ok_job(cluster, "-N", "2", f"--output={tmp_path}/%x-%j.out", "slurm/lora.slurm",
                        *job_args(tmp_path / "out3"), extra_env={"SEQUENCE_PARALLEL": "3"})
    log = log_of(tmp_path / f"hpc-lora-{job}.out")
    assert state["JobState"] == "FAILED" and state["ExitCode"] == "2:0", log[-4000:]
    assert "train.sequence_parallel=3 does not divide the job's 2 ranks" in log and "[torchrun.sh]" not in log


def start_training(cluster, tmp_path: Path, out: Path, args: list[str], env: dict[str, str] | None = None, *,
                   template: str = "lora", options: tuple[str, ...] = (), nodes: int = 2) -> str:
    """Submit a template on ``nodes`` nodes; its job id once the first step is logged."""
    submitted = sbatch(cluster, "--parsable", "-N", str(nodes), *options, f"--output={tmp_path}/%x-%j.out",
                       f"slurm/{template}.slurm", *args, extra_env=env)
    assert submitted.returncode == 0, submitted.stderr
    wait_until(lambda: (out / "metrics.jsonl").is_file() and read_metrics(out / "metrics.jsonl"), 300,
               "the first logged step")
    return submitted.stdout.strip()


@pytest.mark.parametrize(("template", "launcher"), [("lora", "torchrun"), ("qlora", "torchrun"), ("qlora", "deepspeed")])
def test_preempted_job_checkpoints_requeues_and_matches_the_uninterrupted_run(cluster, job_args, template_runs,
                                                                               tmp_path, template, launcher):
    """The warning before the time limit, as ``--signal=B:USR1@...`` sends it to the batch shell.
    QLoRA as the template runs it (4 ranks, as its uninterrupted run above): its 4-bit layers
    must not stop the requeued job from loading its own checkpoint."""
    out = tmp_path / "out"
    options = ("--gpus-per-node=2",) if template == "qlora" else ()
    job = start_training(cluster, tmp_path, out, job_args(out), {"LAUNCHER": launcher}, template=template,
                         options=options)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=cluster, check=True, timeout=30)
    state = wait_for_job(cluster, job)
    log = log_of(tmp_path / f"hpc-{template}-{job}.out")
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", log[-6000:]
    assert "got SIGUSR1" in log and "requeueing job" in log and "resumed from" in log
    assert "checkpoint saved" in log and "exit code 138" not in log  # nothing died of the signal itself
    if launcher == "torchrun":
        # The launcher's status is 75 too, on every node (torchrun's own is 1; the node whose
        # launcher srun ends after the first one exits says SIGTERM, and its ranks had stopped; its
        # torchrun, ended by that signal, may report -1).
        per_node = 2 if template == "qlora" else 1
        said = re.findall(rf"\[torchrun.sh\] node (\d): all {per_node} worker\(s\) stopped for a requeue after a "
                          r"checkpoint \(SIG(?:USR1|TERM), torchrun status -?\d+\); exiting 75", log)
        assert sorted(said) == ["0", "1"], log[-6000:]
        assert log.count("Exited with exit code 75") == 2, log[-6000:]
    resumed_at = int(log.split("resumed from")[1].split(" at step ")[1].split()[0])
    assert 1 <= resumed_at < STEPS  # it really stopped part-way
    final = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r][-1]
    reference = [r["loss"] for r in read_metrics(template_runs[template]["out"] / "metrics.jsonl") if "loss" in r]
    assert final == pytest.approx(reference[-1], rel=1e-5)


def test_a_rank_that_dies_fails_the_job_without_a_hang(cluster, job_args, tmp_path):
    out = tmp_path / "out"
    job = start_training(cluster, tmp_path, out, job_args(out, "train.max_steps=100000"))
    victims = processes_of_job(job, "slnode2")
    assert len(victims) == 1, victims
    os.kill(victims[0], signal.SIGKILL)
    state = wait_for_job(cluster, job, timeout=180)
    log = log_of(tmp_path / f"hpc-lora-{job}.out")
    assert state["JobState"] == "FAILED" and state["ExitCode"] != "0:0", log[-4000:]
    assert "failed with exit status" in log
    assert job_state(cluster, job)["Restarts"] == "0"  # a crash is not a preemption: no requeue


def test_our_nodelist_reading_matches_scontrol(cluster):
    from hpc_train.topology import expand_nodelist

    for nodelist in ("slnode[1-2]", "node[01-03,7],gpu5", "rack[1-2]-n[8-9]"):
        expanded = subprocess.run(["scontrol", "show", "hostnames", nodelist], env=cluster, capture_output=True,
                                  text=True, timeout=30, check=True).stdout.split()
        assert expand_nodelist(nodelist) == expanded


def test_topology_check_across_nodes_and_a_hand_exported_rank(cluster):
    checked = subprocess.run(["srun", "-N", "2", "--ntasks-per-node=1", sys.executable, "-m", "hpc_train", "topology",
                              "--check"], env=cluster, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert checked.returncode == 0, checked.stderr[-3000:]
    assert "process group OK: 2 ranks on 2 node(s): slnode1, slnode2" in checked.stdout
    assert "topology on slnode2: rank 1/2 (local 0/1, node 1/2)" in checked.stdout
    exported = subprocess.run(["srun", "-N", "2", "--ntasks-per-node=1", "--export=ALL,RANK=0,WORLD_SIZE=1",
                               sys.executable, "-m", "hpc_train", "topology"], env=cluster, cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
    assert exported.returncode != 0
    assert "the environment says RANK=0 of WORLD_SIZE=1, slurm says SLURM_PROCID=1" in exported.stderr


def test_a_failure_after_the_warning_ends_the_job_failed_not_requeued(cluster, job_args, tmp_path):
    """The save the warning asks for is refused (a read-only checkpoint folder): the ranks fail,
    and the job ends FAILED with the reason instead of requeueing into the same failure."""
    out = tmp_path / "out"
    job = start_training(cluster, tmp_path, out, job_args(out, "train.max_steps=100000"))
    with read_only_dir(out / "checkpoints"):
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=cluster, check=True, timeout=30)
        state = wait_for_job(cluster, job, timeout=180)
    log = log_of(tmp_path / f"hpc-lora-{job}.out")
    assert state["JobState"] == "FAILED" and state["Restarts"] == "0", log[-4000:]
    assert "after SIGUSR1, before a checkpoint was saved (see the ranks' messages above): not requeued" in log


def test_a_site_s_export_none_gets_its_settings_as_arguments_and_its_steps_the_job_s_environment(cluster, job_args,
                                                                                               tmp_path):
    """``sbatch --export=NONE``: the submitting shell's CONFIG / LAUNCHER never reach the job (a
    variable would be ignored and the template's default recipe train); given as arguments they
    do, and the launch steps get the batch shell's environment (the venv, OMP / NCCL settings,
    MASTER_PORT), where they would inherit SLURM_EXPORT_ENV=NONE. The site's SETUP script runs
    first (its variables reach the ranks), and a job array's task gets a folder of its own."""
    out = tmp_path / "out"
    setup = tmp_path / "site-setup.sh"
    setup.write_text('export OMP_NUM_THREADS=1\necho "site setup ran on $(hostname)"\n')
    job, state = ok_job(cluster, "--export=NONE", "--array=3", "-N", "2", f"--output={tmp_path}/%x-%A.out",
                        "slurm/lora.slurm", "CONFIG=tiny_smolvlm", "LAUNCHER=srun", "NPROC_PER_NODE=1",
                        f"SETUP={setup}", f"VENV={sys.prefix}", *job_args(out, "train.max_steps=2"),
                        extra_env={"CONFIG": "no_such_recipe"})  # would fail the job if it reached it
    log = log_of(tmp_path / f"hpc-lora-{job}.out")
    assert state["JobState"] == "COMPLETED", job_failure(state, log)
    assert "sbatch --export=NONE: the submitting shell's variables did not reach this job" in log
    assert "full, config tiny_smolvlm" in log and "launcher srun" in log  # not the template's smolvlm_lora
    assert f"setup: {setup}" in log and "site setup ran on" in log and "OMP_NUM_THREADS 1" in log
    task_out = out / f"{job}_3"
    assert f"array task 3 of job {job}: its own output folder, {task_out}" in log
    assert [r["step"] for r in read_metrics(task_out / "metrics.jsonl") if "loss" in r] == [1, 2]
    ran_with = json.loads((task_out / "profile" / "report.json").read_text())["environment"]
    assert ran_with["cpu_threads"] == 1  # SETUP's, not the 8 CPUs' (torch caps those at the machine's 2 cores)


def test_gpus_per_task_gets_one_rank_per_task_started_by_srun(cluster, job_args, tmp_path):
    """``--gpus-per-task`` with the default torchrun launcher: srun would give the node's single
    torchrun task one GPU for all its ranks (NCCL then fails on a duplicate device); the job
    starts one rank per task with srun instead, and says so."""
    out = tmp_path / "out"
    job, state = ok_job(cluster, "-N", "2", "--ntasks-per-node=2", "--gpus-per-node=2", "--gpus-per-task=1",
                        "--cpus-per-task=1", f"--output={tmp_path}/%x-%j.out",
                        "slurm/lora.slurm", *job_args(out, "train.max_steps=2"))
    log = log_of(tmp_path / f"hpc-lora-{job}.out")
    assert state["JobState"] == "COMPLETED", log[-4000:]
    assert "--gpus-per-task=1: one rank per task, started by srun (LAUNCHER=srun)" in log
    assert "x 2 process(es), launcher srun" in log and "topology: rank 0/4" in log
    # a layout where a rank would get two GPUs (and use one) is refused, with the one that works
    job, state = ok_job(cluster, "-N", "1", "--ntasks-per-node=1", "--gpus-per-node=2", "--gpus-per-task=2",
                        "--cpus-per-task=1", f"--output={tmp_path}/%x-%j.out", "slurm/lora.slurm", *job_args(out))
    log = log_of(tmp_path / f"hpc-lora-{job}.out")
    assert state["JobState"] == "FAILED" and state["ExitCode"] == "2:0", log[-4000:]
    assert "--gpus-per-task=2 with tasks per node 1: each rank is one task with one GPU" in log


def test_a_warning_that_comes_before_any_rank_started_launches_nothing(cluster, job_args, tmp_path):
    """SIGUSR1 while the batch shell still prepares (here a slow site SETUP): bash would end on a
    signal it does not trap; the job launches nothing and ends FAILED, saying why."""
    submitted = sbatch(cluster, "--parsable", "-N", "1", f"--output={tmp_path}/%x-%j.out", "slurm/lora.slurm",
                       "SETUP=sleep 4", *job_args(tmp_path / "out"))
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip()
    path = tmp_path / f"hpc-lora-{job}.out"
    wait_until(lambda: "setup: sleep 4" in log_of(path), 60, "the site setup")
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=cluster, check=True, timeout=30)
    state = wait_for_job(cluster, job)
    log = log_of(path)
    assert state["JobState"] == "FAILED" and state["ExitCode"] == "1:0", job_failure(state, log)
    assert "got SIGUSR1" in log and "SIGUSR1 came before any rank started: nothing launched" in log
    assert "[torchrun.sh]" not in log and not (tmp_path / "out" / "metrics.jsonl").exists()


def test_a_one_node_deepspeed_job_is_preempted_and_requeued_once_on_the_gpu_slurm_gave_it(cluster, job_args,
                                                                                          tmp_path):
    """A real preemption (``launch/local-slurm.sh``: partition urgent preempts debug, REQUEUE,
    GraceTime 60): the grace time begins with SIGTERM to the job's steps, not its batch shell.
    On one host DeepSpeed's own launcher would run the ranks inside the batch step, where that
    never arrives, and number their GPUs from 0: here an urgent job holds the node's GPU 0, so
    the job gets GPU 1, and its ranks must see that GPU, take the signal, checkpoint, and the
    job requeue once (itself, while SLURM still has it RUNNING; SLURM's own requeue at the end
    of the grace time then finds it gone) and resume when the preemptor is done."""
    def urgent(seconds: int) -> str:
        held = sbatch(cluster, "--parsable", "-p", "urgent", "-w", "slnode1", "--gpus=1", "--cpus-per-task=1",
                      f"--output={tmp_path}/urgent-%j", "--wrap", f"sleep {seconds}")
        assert held.returncode == 0, held.stderr
        return held.stdout.strip()

    steps = 120  # more than the ranks run while the preemption is submitted and scheduled
    holder = urgent(600)
    try:
        wait_until(lambda: job_state(cluster, holder).get("JobState") == "RUNNING", 60, "the GPU 0 holder")
        out = tmp_path / "out"
        job = start_training(cluster, tmp_path, out, job_args(out, f"train.max_steps={steps}"),
                             {"LAUNCHER": "deepspeed"}, template="qlora",
                             options=("-w", "slnode1", "--cpus-per-task=4"), nodes=1)
        preemptor = urgent(3)  # needs the GPU the training job holds
        wait_until(lambda: "requeueing job" in log_of(tmp_path / f"hpc-qlora-{job}.out"), 120, "the requeue")
        # A second run into the same folder meanwhile (from outside SLURM) is refused: SLURM has the job
        # waiting to run again, or running again.
        second = subprocess.run([sys.executable, "-m", "hpc_train", "train", "smolvlm_qlora", *job_args(out)],
                                env=cluster, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert second.returncode != 0, second.stderr[-3000:]
        assert re.search(rf"is in use by SLURM job {job} \((PENDING|RUNNING|CONFIGURING)\)", second.stderr), \
            second.stderr[-3000:]
        state = wait_for_job(cluster, job)
        assert job_state(cluster, preemptor)["JobState"] == "COMPLETED"
    finally:
        subprocess.run(["scancel", holder], env=cluster, timeout=30)
    log = log_of(tmp_path / f"hpc-qlora-{job}.out")
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", job_failure(state, log)
    assert "; CUDA_VISIBLE_DEVICES=1" in log and "; CUDA_VISIBLE_DEVICES=0" not in log, log[-6000:]
    assert re.search(r"checkpoint saved at step \d+ \(\S+\) after SIGTERM; requeueing job", log), log[-6000:]
    assert "resumed from" in log
    logged = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert logged == list(range(1, steps + 1))  # the resumed job went on where the stopped one ended
