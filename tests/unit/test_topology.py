"""Topology discovery from each launcher's variables, and the errors when they disagree."""

from __future__ import annotations

import pytest

from hpc_train.errors import ConfigError
from hpc_train.topology import DistInfo, discover, expand_nodelist

STEP = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_NNODES": "2", "SLURM_STEP_NUM_NODES": "2"}


def slurm_step(procid: int, ntasks: int, per_node: str, nodeid: int, localid: int) -> dict[str, str]:
    return {**STEP, "SLURM_PROCID": str(procid), "SLURM_NTASKS": str(ntasks), "SLURM_STEP_NUM_TASKS": str(ntasks),
            "SLURM_STEP_TASKS_PER_NODE": per_node, "SLURM_NODEID": str(nodeid), "SLURM_LOCALID": str(localid)}


def test_nothing_is_a_world_of_one():
    assert discover({}) == DistInfo()


def test_srun_tasks_read_slurm():
    info = discover(slurm_step(3, 4, "2(x2)", 1, 1), hostnames=expand_nodelist)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (3, 4, 1, 2)
    assert (info.node_rank, info.num_nodes, info.source) == (1, 2, "slurm")
    assert (info.master_addr, info.master_port) == ("gpu07", 10000 + 4242)
    assert discover({**slurm_step(0, 4, "2(x2)", 0, 0), "MASTER_PORT": "1234"},
                    hostnames=expand_nodelist).master_port == 1234


def test_a_batch_script_is_not_a_task():
    batch = {k: v for k, v in slurm_step(0, 4, "2(x2)", 0, 0).items() if k != "SLURM_STEP_ID"}
    assert discover(batch).source == "single"


def test_torchrun_inside_srun_believes_torchrun():
    env = {**slurm_step(1, 2, "1(x2)", 1, 0), "TORCHELASTIC_RUN_ID": "4242", "RANK": "5", "LOCAL_RANK": "1",
           "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1", "MASTER_ADDR": "gpu07",
           "MASTER_PORT": "29400"}
    info = discover(env)
    assert (info.rank, info.local_rank, info.world_size, info.node_rank, info.num_nodes) == (5, 1, 8, 1, 2)
    assert info.source == "torchrun" and info.as_env()["GROUP_RANK"] == "1"


def test_launchers_that_disagree_are_an_error():
    env = {**slurm_step(0, 2, "1(x2)", 0, 0), "RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "gpu07"}
    with pytest.raises(ConfigError, match=r"the environment says RANK=1 of WORLD_SIZE=2, slurm says SLURM_PROCID=0 "
                                          r"of SLURM_STEP_NUM_TASKS=2.*one launcher"):
        discover(env)
    # RANK=0 WORLD_SIZE=1 exported into a 2-task step: every task would train alone as rank 0
    alone = {**slurm_step(1, 2, "1(x2)", 1, 0), "RANK": "0", "WORLD_SIZE": "1"}
    with pytest.raises(ConfigError, match="the environment says RANK=0 of WORLD_SIZE=1, slurm says SLURM_PROCID=1"):
        discover(alone)


def test_mpi_inside_slurm():
    # mpirun in a batch job: its ranks inherit the daemon step's SLURM_PROCID (a node index)
    nested = {**slurm_step(0, 2, "1(x2)", 0, 0), "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}
    info = discover(nested, mpi=lambda: DistInfo(rank=1, world_size=2, local_world_size=2, source="mpi"))
    assert (info.rank, info.source) == (1, "mpi")
    # srun with MpiDefault=pmi2 sets PMI_RANK = SLURM_PROCID: the step says it all, no mpi4py
    pmi = {**slurm_step(3, 4, "2(x2)", 1, 1), "PMI_RANK": "3", "PMI_SIZE": "4"}
    assert discover(pmi, hostnames=expand_nodelist).source == "slurm"
    # an mpi4py built for another MPI starts every rank as a singleton: refuse, do not train alone
    with pytest.raises(ConfigError, match="mpi4py sees rank 0 of 1, but the MPI launcher says "
                                          "OMPI_COMM_WORLD_RANK=1 of OMPI_COMM_WORLD_SIZE=2"):
        discover({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}, mpi=lambda: DistInfo(source="mpi"))


@pytest.mark.parametrize(("env", "message"), [
    ({"RANK": "0"}, "WORLD_SIZE is not set while RANK is"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "rank 2 is outside world size 2"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "2"}, "local rank 3 is outside"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
])
def test_bad_variables_name_themselves(env, message):
    with pytest.raises(ConfigError, match=message):
        discover(env)


@pytest.mark.parametrize(("nodelist", "hosts"), [
    ("gpu5", ["gpu5"]),
    ("node[01-03,7],gpu5", ["node01", "node02", "node03", "node7", "gpu5"]),
    ("rack[1-2]-n[8-9]", ["rack1-n8", "rack1-n9", "rack2-n8", "rack2-n9"]),
])
def test_nodelists_expand_like_scontrol(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts
