"""The configuration reference page (``docs/configuration.md``), generated from the config
schema: every key with its type, default and docstring, a section per table. Written by
``hpc-train show-config --reference``; a test fails when the committed page and the schema
differ, so the page cannot drift from the code."""

from __future__ import annotations

import inspect
import json
import re
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel

from hpc_train.config import RunConfig

PAGE = "docs/configuration.md"
COMMAND = f"hpc-train show-config --reference > {PAGE}"


def type_name(annotation: Any) -> str:
    """A field's type as a user writes the value: ``int``, ``"auto" | "bf16"``, ``list of str``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin in (list, tuple):
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict:
        return f"map of {type_name(args[0])} to {type_name(args[1])}" if args else "map"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: Any) -> str:
    value = field.get_default(call_default_factory=True)
    return json.dumps(value.model_dump() if isinstance(value, BaseModel) else value)


def _cell(text: str) -> str:
    """Text a Markdown table cell can hold: one line, pipes escaped, reST's double backticks as code."""
    return " ".join(text.split()).replace("``", "`").replace("|", "\\|")


def _sections(model: type[BaseModel], prefix: str = "") -> list[tuple[str, type[BaseModel], list[list[str]]]]:
    """(dotted section, its class, rows of key / type / default / meaning), depth first."""
    rows: list[list[str]] = []
    nested: list[tuple[str, type[BaseModel], list[list[str]]]] = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            nested += _sections(field.annotation, f"{dotted}.")
            continue
        rows.append([f"`{dotted}`", f"`{_cell(type_name(field.annotation))}`", f"`{_cell(_default(field))}`",
                     _cell(field.description or "")])
    return [(prefix.rstrip("."), model, rows), *nested]


def render_reference() -> str:
    """The whole page, as committed in :data:`PAGE`."""
    lines = ["# Configuration reference", "",
             "Every key a run's YAML (or a `key=value` override) may set, with its type, default and meaning. "
             f"Generated from the schema in `hpc_train/config.py` by `{COMMAND}`; "
             "`tests/unit/test_config_reference.py` fails when this page and the schema differ. How a config "
             "is read, overridden and checked: [training](training.md).", ""]
    for section, model, rows in _sections(RunConfig):
        if not rows:
            continue
        doc = re.sub(r":\w+:`([^`]+)`", r"`\1`", inspect.cleandoc(model.__doc__ or "").split("\n\n")[0])
        lines += [f"## `{section}`" if section else "## Top level", "", _cell(doc), "", "| key | type | default | meaning |", "|---|---|---|---|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines.append("")
    return "\n".join(lines)
