"""No record, and no file, crashes check-data: every problem is a message in the
``file:line [id ...]: problem. Fix: ...`` form, never a traceback (see tests/fuzz_datasets.py)."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import pytest

from hpc_train.check_data import AuditReport, audit_dataset
from hpc_train.config_file import load_config
from hpc_train.data.pipeline import build_pipeline
from hpc_train.errors import DataError
from hpc_train.models.families import get_family
from hpc_train.models.load import load_processor
from tests.fuzz_datasets import FILE_FAMILIES, RECORD_FAMILIES

CASES = 250
MESSAGE = re.compile(r"^/\S.*?(:\d+)?( \[id .*?\])?: .+\. Fix: .+", re.S)


@pytest.fixture(scope="module")
def fuzz_setup(synthetic_data, tmp_path_factory):
    """A copy of the synthetic set (its media resolve), its valid records and one pipeline."""
    root = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(synthetic_data, root / "data")
    base = [json.loads(line) for line in (root / "data" / "train.jsonl").read_text().splitlines()]
    config = load_config("tiny_smolvlm", [f"data.train={root / 'data' / 'train.jsonl'}"])
    pipeline = build_pipeline(config.data, load_processor(config.model), get_family("smolvlm"))
    return root / "data", base, config, pipeline


def audit(config, pipeline, path: Path) -> AuditReport:
    config = config.model_copy(update={"data": config.data.model_copy(update={"train": str(path)})})
    return audit_dataset(config, progress=False, pipeline=pipeline)


def assert_messages(report: AuditReport, what: str) -> None:
    for message in report.errors + report.over_max_seq_len:
        assert MESSAGE.match(message), f"{what}: not in the file:line [id]: ... Fix: form: {message[:500]}"
        assert "unexpected" not in message, f"{what}: {message[:1000]}"
    assert report.usable + len(report.errors) + len(report.over_max_seq_len) == report.records, what


@pytest.mark.parametrize("family", sorted(RECORD_FAMILIES))
@pytest.mark.parametrize("layout", ["jsonl", "json"])
def test_no_record_crashes_the_audit(fuzz_setup, family, layout):
    folder, base, config, pipeline = fuzz_setup
    rng = random.Random(f"{family}:{layout}")
    lines = [RECORD_FAMILIES[family](base, rng) for _ in range(CASES)]
    path = folder / f"fuzz-{family}.{layout}"
    path.write_text("\n".join(lines) + "\n" if layout == "jsonl" else "[\n" + ",\n".join(lines) + "\n]\n")
    report = audit(config, pipeline, path)
    assert report.records == CASES
    assert_messages(report, f"{family} ({layout})")
    assert len(report.errors) > CASES // 3, "the generator should break most records"


@pytest.mark.parametrize("family", sorted(FILE_FAMILIES))
def test_no_file_crashes_the_audit(fuzz_setup, family):
    folder, base, config, pipeline = fuzz_setup
    rng = random.Random(family)
    refused = 0
    for k in range(CASES):
        path = folder / f"fuzz-{family}-{k}.jsonl"
        path.write_bytes(FILE_FAMILIES[family](base, rng))
        try:
            report = audit(config, pipeline, path)
        except DataError as exc:  # the whole file is unusable: one message for it
            assert MESSAGE.match(str(exc)), f"{family} case {k}: {str(exc)[:500]}"
            refused += 1
            continue
        assert_messages(report, f"{family} case {k}")
        path.unlink()
    if family != "line_endings":  # bad line endings break records, not whole files
        assert refused > CASES // 4, "the generator should make most files unreadable"
