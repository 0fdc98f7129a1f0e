"""Values a launcher could not pass whole (``launch/deepspeed.sh``), restored by each rank."""

from __future__ import annotations

import pytest

from hpc_train.env_file import ENV_FILE, restore_environment


def test_a_rank_gets_back_the_values_with_commas(tmp_path):
    path = tmp_path / "env"
    path.write_text("NCCL_IB_HCA=mlx5_0,mlx5_1\nUCX_NET_DEVICES=mlx5_0:1,mlx5_1:1\nnot a line\n")
    env = {ENV_FILE: str(path), "NCCL_IB_HCA": "mlx5_0"}  # as srun's cut would have left it
    assert restore_environment(env) == ["NCCL_IB_HCA", "UCX_NET_DEVICES"]
    assert env["NCCL_IB_HCA"] == "mlx5_0,mlx5_1" and env["UCX_NET_DEVICES"] == "mlx5_0:1,mlx5_1:1"
    assert restore_environment({}) == []


def test_a_file_the_node_cannot_see_stops_the_rank_with_the_fix(tmp_path):
    with pytest.raises(SystemExit, match="cannot be read .*Fix: keep the hpc-train checkout on a filesystem every node"):
        restore_environment({ENV_FILE: str(tmp_path / "elsewhere")})
