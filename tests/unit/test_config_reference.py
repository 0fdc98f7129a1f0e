"""The configuration reference page is the schema's: regenerated, it is the committed page."""

from __future__ import annotations

from pathlib import Path

from hpc_train.cli import main
from hpc_train.config_file import describe_keys
from hpc_train.config_reference import COMMAND, PAGE, render_reference, type_name

ROOT = Path(__file__).resolve().parents[2]


def test_the_committed_page_is_what_the_schema_generates():
    committed = (ROOT / PAGE).read_text()
    assert committed == render_reference(), f"{PAGE} is out of date with hpc_train/config.py. Fix: {COMMAND}"


def test_every_key_has_its_row_with_a_meaning():
    page = render_reference()
    for key, _, text in describe_keys():
        row = next((line for line in page.splitlines() if line.startswith(f"| `{key}` |")), None)
        assert row is not None, key
        assert text and row.rstrip(" |").endswith(text.replace("``", "`").replace("|", "\\|")[-40:]), key


def test_types_read_as_values_are_written():
    from typing import Literal

    assert type_name(int | None) == "int | null"
    assert type_name(list[Literal["vision", "llm"]]) == 'list of "vision" | "llm"'
    assert type_name(dict[str, float]) == "map of str to float"


def test_the_command_prints_the_page(capsys):
    assert main(["show-config", "--reference"]) == 0
    assert capsys.readouterr().out == render_reference()
