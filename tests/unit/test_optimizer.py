"""The optimizer a run builds: torch's fused AdamW where every weight allows it, stepping as the
unfused one does."""

from __future__ import annotations

import torch
from torch import nn

from hpc_train.config_file import load_config
from hpc_train.train.engine import build_optimizer, fused_allowed


def _groups(model: nn.Module) -> list[dict]:
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [{"params": weights, "lr": 1e-2, "weight_decay": 0.1, "name": "w"},
            {"params": biases, "lr": 3e-2, "weight_decay": 0.0, "name": "b"}]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))


def test_a_run_on_the_cpu_steps_with_the_fused_kernel():
    optimizer = build_optimizer(_groups(_model()), load_config("tiny_smolvlm", []), {})
    assert all(group["fused"] for group in optimizer.param_groups)


def test_weights_the_kernel_cannot_take_get_the_unfused_step():
    on_meta = [{"params": list(nn.Linear(4, 4, device="meta").parameters())}]
    assert not fused_allowed(on_meta) and fused_allowed(_groups(_model()))
    optimizer = build_optimizer(on_meta, load_config("tiny_smolvlm", []), {})
    assert not any(group["fused"] for group in optimizer.param_groups)


def test_the_fused_step_is_the_unfused_one():
    config = load_config("tiny_smolvlm", ["train.betas=[0.9,0.95]"])
    fused_model, plain_model = _model(), _model()
    fused = build_optimizer(_groups(fused_model), config, {})
    plain = torch.optim.AdamW(_groups(plain_model), lr=config.train.lr, betas=tuple(config.train.betas))
    inputs = torch.randn(8, 16)
    for _ in range(5):
        for model, optimizer in ((fused_model, fused), (plain_model, plain)):
            optimizer.zero_grad()
            model(inputs).square().mean().backward()
            optimizer.step()
    for a, b in zip(fused_model.parameters(), plain_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(fused_model[0].weight, _model()[0].weight)  # the steps moved the weights
