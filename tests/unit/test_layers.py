"""The layers of docs/architecture.md: no module imports from a layer above its own,
and ``profiling/`` imports nothing of ``hpc_train``. Read from the source (every import, also
those inside functions), so a new upward import fails here, not in a review."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

LAYERS = {
    # leaves: no hpc_train import of their own but errors
    "__init__": 0, "errors": 0, "synthetic_words": 0, "parent_death": 0, "extensions": 0, "pins": 0,
    "safe_load": 0, "slurm_outcome": 0, "env_file": 0, "evaluation": 0,
    "config": 1, "config_file": 1, "config_reference": 1,
    "topology": 2, "dist": 2, "device": 2, "lost_ranks": 2,
    "models": 3,
    "data": 4,
    "train": 5,
    # commands
    "cache_vision": 6, "check_data": 6, "cli": 6, "cli_tools": 6, "demo": 6, "doctor": 6, "plan": 6, "prepare_media": 6,
    "__main__": 6,
}


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of the project's packages in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
    return [(line, m) for line, m in found if m.split(".")[0] in ("hpc_train", "profiling")]


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_every_hpc_train_module_has_a_layer():
    missing = {layer_of(".".join(p.relative_to(ROOT).with_suffix("").parts)) for p in sources("hpc_train")}
    assert missing <= set(LAYERS), f"give these a layer in LAYERS (and docs/architecture.md): {missing - set(LAYERS)}"


@pytest.mark.parametrize("path", sources("hpc_train"), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_import_goes_up_a_layer(path):
    mine = layer_of(".".join(path.relative_to(ROOT).with_suffix("").parts))
    upward = [f"{path.relative_to(ROOT)}:{line} imports {module} ({layer_of(module)})"
              for line, module in imports(path)
              if module.startswith("hpc_train") and LAYERS[layer_of(module)] > LAYERS[mine]]
    assert not upward, f"{mine} is layer {LAYERS[mine]}: " + "; ".join(upward)


DATA_STAGES = {
    # records -> media -> tokens -> what is paid once -> samples -> batches -> the pipeline wired
    "__init__": 0, "sources": 0, "decoding": 1, "encoding": 2, "caches": 3,
    "dataset": 4, "video_on_device": 4, "deferred_videos": 4, "batching": 5, "pipeline": 6,
}


def data_stage(module: str) -> str:
    parts = module.split(".")
    return parts[2].removesuffix(".py") if len(parts) > 2 else "__init__"


def test_every_data_module_has_a_stage():
    found = {data_stage(".".join(p.relative_to(ROOT).with_suffix("").parts)) for p in sources("hpc_train/data")}
    assert found <= set(DATA_STAGES), f"give these a stage in DATA_STAGES (and docs/architecture.md): {found - set(DATA_STAGES)}"


@pytest.mark.parametrize("path", sources("hpc_train/data"), ids=lambda p: str(p.relative_to(ROOT)))
def test_data_reads_as_its_flow(path):
    """Inside ``data/`` a stage imports only from its own or an earlier one."""
    mine = data_stage(".".join(path.relative_to(ROOT).with_suffix("").parts))
    later = [f"{path.relative_to(ROOT)}:{line} imports {module}" for line, module in imports(path)
             if module.startswith("hpc_train.data.") and DATA_STAGES[data_stage(module)] > DATA_STAGES[mine]]
    assert not later, f"{mine} is stage {DATA_STAGES[mine]} of data/: " + "; ".join(later)


def test_profiling_stands_alone():
    inward = [f"{p.relative_to(ROOT)}:{line} imports {module}" for p in sources("profiling")
              for line, module in imports(p) if module.startswith("hpc_train")]
    assert not inward
