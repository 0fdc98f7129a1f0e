"""One run, end to end: config → build (process group, model, data, engine) → loop → outputs."""

from __future__ import annotations

from hpc_train.config import RunConfig
from hpc_train.data.feature_writer import flush_writers
from hpc_train.dist import DistInfo, read_dist_env
from hpc_train.train import run_outputs
from hpc_train.train.build import build_run
from hpc_train.train.trainer import TrainLoop, install_stop_signals


def run(config: RunConfig, *, evaluate_only: bool = False, info: DistInfo | None = None) -> int:
    """Build, train (unless ``evaluate_only``), export and evaluate; the exit status."""
    if evaluate_only:
        config = config.model_copy(update={"train": config.train.model_copy(update={"mode": "baseline"})})
    parts = build_run(config, info or read_dist_env())
    loop = TrainLoop(parts) if parts.training is not None else None
    # An evaluation-only run has nothing to checkpoint: a stop signal lets it finish.
    install_stop_signals(loop.request_stop if loop is not None else _ignore)
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
    return status


def _ignore(signum: int, frame: object) -> None:
    return None


__all__ = ["run"]
