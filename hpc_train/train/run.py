"""One run, end to end: config → build (process group, model, data, engine) → loop → outputs."""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from hpc_train.config import RunConfig
from hpc_train.data.caches.feature_writer import flush_writers
from hpc_train.dist import DistInfo, barrier, read_dist_env
from hpc_train.errors import HpcTrainError
from hpc_train.lost_ranks import lost_ranks, peer_gone, store_host_is_rank_0
from hpc_train.train import run_outputs
from hpc_train.train.build import build_run
from hpc_train.train.checkpoint import Checkpointer
from hpc_train.train.output_owner import release, this_run
from hpc_train.train.run_parts import REQUEUE_EXIT_CODE, RunParts, note_requeue_stop
from hpc_train.train.trainer import TrainLoop, install_stop_signals


class PeerLost(HpcTrainError):
    """A collective failed because another rank of the job is gone; the message names it."""

    exit_code = 1


def run(config: RunConfig, *, evaluate_only: bool = False, info: DistInfo | None = None) -> int:
    """Build, train (unless ``evaluate_only``), export and evaluate; the exit status. A rank lost
    on the way stops this one with :class:`PeerLost`."""
    if evaluate_only:
        config = config.model_copy(update={"train": config.train.model_copy(update={"mode": "baseline"})})
    info = info or read_dist_env()
    built: list[RunParts] = []
    try:
        status = _run(config, info, built)
    except Exception as exc:
        words = peer_gone(exc) if info.world_size > 1 else None
        if words is None:
            raise
        raise PeerLost(lost_peer_message(config, info, words, step=built[0].step if built else None)) from None
    if status == 0 and info.is_main:
        release(Path(config.output_dir), this_run())  # finished: the folder is anyone's to continue
    return status


def _run(config: RunConfig, info: DistInfo, built: list[RunParts]) -> int:
    # A signal while the model loads (a resume's checks included) is kept for the loop, not lost:
    # under torchrun the ranks start with SIGUSR1 ignored, as its agent must.
    early: list[int] = []
    install_stop_signals(lambda signum, frame: early.append(signum))
    parts = build_run(config, info)
    built.append(parts)
    loop = TrainLoop(parts) if parts.training is not None else None
    # An evaluation-only run has nothing to checkpoint: a stop signal lets it finish.
    install_stop_signals(loop.request_stop if loop is not None else _ignore)
    if early and loop is not None:
        loop.request_stop(early[-1])  # stops after its first step, with a checkpoint beyond the one it began from
    if run_outputs.finished_before(parts):
        run_outputs.leave_finished_run(parts)
        return 0
    try:
        status = loop.train() if loop is not None else 0
        if status == 0:
            run_outputs.export(parts)
            run_outputs.evaluate(parts)
    except BaseException:
        run_outputs.save_rank_profile(parts)  # what was measured up to the failure (hpc-profile merge)
        if parts.training is not None:
            parts.training.metrics.close()  # TensorBoard's buffered steps too: the process exits at once
        raise
    flush_writers()  # the features this rank computed last, before the run says it is done
    run_outputs.finish(parts)
    if status == 0:
        run_outputs.mark_complete(parts)
    if status == REQUEUE_EXIT_CODE:
        # A launcher that ends the job when one task exits (srun --kill-on-bad-exit) must not
        # stop a rank still writing its outputs; then each node's launcher learns that all its
        # ranks stopped for a requeue (launch/torchrun.sh exits 75 for them).
        barrier()
        note_requeue_stop(info.rank)
    return status


def lost_peer_message(config: RunConfig, info: DistInfo, words: str, *, step: int | None) -> str:
    """Which rank is gone, that the job stops, and where the same command resumes."""
    lost = lost_ranks(info.rank, info.world_size)
    if lost is None and store_host_is_rank_0():
        who = "lost rank 0 (it held the process group's store, which no longer answers)"
    elif lost is None:
        who = "lost the process group's store too (torchrun's agent on the first node): a node may be down"
    elif lost:
        who = f"lost rank{'s' if len(lost) > 1 else ''} {', '.join(map(str, lost))} (its process ended or its node " \
              "is unreachable)"
    else:
        who = "a peer closed its connection while every rank still answers (see the other ranks' errors)"
    when = f" during step {step + 1}" if step is not None else ""
    latest = Checkpointer(Path(config.output_dir) / "checkpoints", info).latest()
    resume = (f"the same command resumes from step {int(latest.name.split('-')[1])} ({latest})" if latest
              else "the same command starts again from step 0 (no checkpoint was saved yet)")
    backend = dist.get_backend() if dist.is_initialized() else "the process group"
    return f"rank {info.rank}: {who}{when} ({backend}: {words}). This rank stops, and so does the job; {resume}"


def _ignore(signum: int, frame: object) -> None:
    return None


__all__ = ["PeerLost", "lost_peer_message", "run"]
