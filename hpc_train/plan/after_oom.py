"""What an out-of-memory stop says: the run's plan on the GPU it ran on -- its peak by component
and, when it does not fit, each single change that would, re-planned. The plan runs on fake
tensors (no GPU memory), in the failing process; where it cannot, the command that runs it."""

from __future__ import annotations

from hpc_train.plan.command import format_plan, make_plan
from hpc_train.plan.gpus import Gpu, gpu_of
from hpc_train.train.trainer import OutOfMemoryStop


def plan_after_oom(stop: OutOfMemoryStop, gpu: Gpu | None = None) -> str:
    """``stop``'s message, then the plan on ``gpu`` (default: the device the run used)."""
    command = f"hpc-train plan {stop.resolved} --gpu auto"
    try:
        if gpu is None and stop.device.type == "cuda":
            gpu = gpu_of(stop.device)
        plan = make_plan(stop.config, gpu, nodes=stop.info.num_nodes, gpus_per_node=stop.info.local_world_size,
                         bf16=stop.bf16, search="auto", loader=False)
    except Exception as failed:  # the out-of-memory stop must still be said
        return (f"{stop}\nThe plan could not run in this process ({type(failed).__name__}: {failed}). For this "
                f"run's peak by component and the settings that fit: {command}")
    return f"{stop}\n{format_plan(plan)}\nAgain, for the GPU the job will get: {command}"
