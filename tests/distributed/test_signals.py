"""Signals sent the way people really send them, and a rank that dies: with DataLoader workers
(2 per rank), under plain torchrun and under ``launch/torchrun.sh``. 2 ranks, ZeRO-2 on CPU."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from hpc_train.train.metrics import read_metrics

from .conftest import RUN_TIMEOUT_S, child_env, hpc_train_cmd, logged_steps, start_until

ROOT = Path(__file__).resolve().parents[2]
MAX_STEPS = 400  # far more than any test waits for: a run that reaches it was never stopped


def start(cmd: list[str], env: dict[str, str] | None = None, *, out: Path) -> subprocess.Popen:
    """A run in a session of its own (its pid is its process group), once it has logged 3 steps."""
    return start_until(cmd, logged_steps(out, 3), env=env, new_session=True, what="training never reached step 3")


def ranks_of(proc: subprocess.Popen) -> list[psutil.Process]:
    """The rank processes: the torchrun agent's children (their DataLoader workers are theirs)."""
    return psutil.Process(proc.pid).children()


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    found = []
    for p in processes:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def args_for(train_args, out: Path, *extra: str) -> list[str]:
    return train_args("smolvlm", out, f"train.max_steps={MAX_STEPS}", "eval.generate=false", "data.num_workers=2",
                      "train.micro_batch_size=2", "train.log_every=1", *extra)


def stopped_with_a_checkpoint(out: Path, signal_name: str) -> int:
    marker = json.loads((out / "requeue.json").read_text())
    saved = (out / "checkpoints" / "latest").read_text().strip()
    assert marker["signal"] == signal_name and marker["checkpoint"].endswith(saved), marker
    assert 3 <= marker["step"] < MAX_STEPS
    return marker["step"]


def test_a_dead_rank_ends_the_other_at_once_despite_its_workers(tmp_path, train_args):
    """The survivor's collective fails as soon as the dead rank's workers die with it (they hold
    copies of its sockets), and it shuts its own workers down without waiting for torchrun's
    30 s kill: it exits with its own error (1), not torchrun's SIGKILL (-9), and says in one
    line which rank is gone and where the same command resumes, instead of gloo's traceback."""
    out = tmp_path / "run"
    proc = start(hpc_train_cmd("train", *args_for(train_args, out, "train.save_every=2")), out=out)
    everything = psutil.Process(proc.pid).children(recursive=True)
    assert len(everything) >= 2 + 2 * 2, [p.cmdline()[:3] for p in everything]  # 2 ranks, 2 workers each
    victim = next(p for p in ranks_of(proc) if p.environ().get("RANK") == "0")
    victim.kill()
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    codes = list(dict(re.findall(r"rank\s*:\s*(\d+) \(local_rank.*?\n\s*exitcode\s*:\s*(-?\d+)", output)).values())
    # The killed rank is the one -9. The survivor exits with its own error (1), or with torchrun's
    # SIGTERM (-15) when that lands while it is already exiting (Python restores the default
    # handler at shutdown); a survivor that hung would get torchrun's SIGKILL after 30 s: a second -9.
    survivor = [code for code in codes if code != "-9"]
    assert len(codes) == 2 and len(survivor) == 1 and survivor[0] in ("1", "-15"), output[-3000:]
    said = re.search(r"error: rank 1: lost rank 0 \(its process ended or its node is unreachable\) during step "
                     r"(\d+) \(gloo: Connection (closed|reset) by peer\)\. This rank stops, and so does the job; the "
                     r"same command resumes from step (\d+) \((.*)\)", output)
    assert said, output[-3000:]
    saved = (out / "checkpoints" / "latest").read_text().strip()
    assert int(said.group(3)) == int(saved.split("-")[1]) < int(said.group(1)) and said.group(4).endswith(saved)
    assert "[rank1]: Traceback" not in output and not re.search(r'File ".*hpc_train/', output), output[-3000:]
    assert not alive(everything), [p.cmdline()[:4] for p in alive(everything)]


def test_sigterm_to_every_process_checkpoints_and_keeps_the_workers_until_then(tmp_path, train_args):
    """As SLURM signals a job step: every process, DataLoader workers included. The workers ignore
    it (only their own rank may stop them), the ranks checkpoint at the next step and exit 75."""
    out = tmp_path / "run"
    proc = start(hpc_train_cmd("train", *args_for(train_args, out)), out=out)
    everything = psutil.Process(proc.pid).children(recursive=True)
    for p in [psutil.Process(proc.pid), *everything]:
        if p.cmdline() and "torch.distributed.run" not in " ".join(p.cmdline()):
            p.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert "DataLoader worker" not in output, output[-3000:]
    assert set(re.findall(r"exitcode\s*:\s*(-?\d+)", output)) <= {"75", "-15"}, output[-3000:]
    stopped_with_a_checkpoint(out, "SIGTERM")
    assert not alive(everything)


def test_usr1_to_a_plain_torchrun_group_stops_its_ranks_with_a_checkpoint(tmp_path, train_args):
    """torchrun puts each rank in a session of its own, so ``kill -USR1 -PGID`` reaches the agent
    alone, which dies of it; its ranks then get SIGTERM from the kernel (parent death) and stop
    with a checkpoint instead of training on unsupervised."""
    out = tmp_path / "run"
    proc = start(hpc_train_cmd("train", *args_for(train_args, out)), out=out)
    everything = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGUSR1)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGUSR1  # the agent itself: torchrun's code, not ours
    deadline = time.monotonic() + 300
    while alive(everything):
        assert time.monotonic() < deadline, "ranks left running after their agent died"
        time.sleep(0.2)
    step = stopped_with_a_checkpoint(out, "SIGTERM")
    assert len(read_metrics(out / "metrics.jsonl")) == step
    # what reached the ranks, said as it was: not the USR1 the agent died of
    assert json.loads((out / "requeue.json").read_text())["cause"].startswith("the launcher that started the ranks "
                                                                           "died (the kernel sent SIGTERM;")


def test_usr1_to_the_launch_script_group_is_forwarded_by_a_surviving_agent(tmp_path, train_args):
    """The README's training command (``launch/torchrun.sh``): the agent ignores USR1, the script
    passes it to the ranks, they checkpoint and exit 75, and so does the script (torchrun itself
    reports them as failed)."""
    out = tmp_path / "run"
    proc = start(*launch_script(train_args, out), out=out)
    everything = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGUSR1)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, output[-3000:]
    assert "[torchrun.sh] node 0: all 2 worker(s) stopped for a requeue after a checkpoint (SIGUSR1, torchrun " \
           "status 1); exiting 75" in output, output[-3000:]
    stopped_with_a_checkpoint(out, "SIGUSR1")
    assert json.loads((out / "requeue.json").read_text())["cause"] == "SIGUSR1 sent to the ranks"
    assert not alive(everything)


def launch_script(train_args, out: Path) -> tuple[list[str], dict[str, str]]:
    """``launch/torchrun.sh`` training 2 ranks on this machine, on a free port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"NPROC_PER_NODE": "2", "MASTER_PORT": str(port), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return [str(ROOT / "launch" / "torchrun.sh"), "train", *args_for(train_args, out)], env


def test_sigterm_to_every_process_of_the_launch_script_checkpoints_as_a_preemption_needs(tmp_path, train_args):
    """A preemption sends SIGTERM to every process of the job, torchrun's agent included; the
    agent passes it on and waits STOP_TIMEOUT (not its own 30 s) for the ranks, which checkpoint
    and exit 75, and so does the script."""
    out = tmp_path / "run"
    proc = start(*launch_script(train_args, out), out=out)
    everything = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in everything:
        p.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, output[-3000:]
    stopped_with_a_checkpoint(out, "SIGTERM")
    assert not alive(everything[1:])


def test_usr1_while_the_ranks_load_is_kept_and_stops_them_after_one_step(tmp_path, train_args):
    """Under ``launch/torchrun.sh`` the ranks start with SIGUSR1 ignored (torchrun's agent must
    ignore it). A warning that comes while they load the model used to be lost, and the run
    trained on past the time limit; now it stops them after their first step, with a checkpoint
    beyond the one they began from, and the script exits 75."""
    out = tmp_path / "run"
    cmd, env = launch_script(train_args, out)
    proc = subprocess.Popen(cmd, env={**child_env(), **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, cwd=ROOT)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not (out / "config.resolved.yaml").exists():  # every rank joined the group: now loading
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-4000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGUSR1)  # the script passes it to the ranks, as under srun
    output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 75, output[-4000:]
    marker = json.loads((out / "requeue.json").read_text())
    assert marker["signal"] == "SIGUSR1" and marker["step"] == 1, marker
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == [1]
