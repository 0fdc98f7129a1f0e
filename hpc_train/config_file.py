"""Reading a run's configuration: a YAML file (or shipped recipe) plus ``key.sub=value`` overrides.

Unknown keys are errors that name the key, the file and line it came from, and the closest
valid key; every setting remembers where it was set (:meth:`RunConfig.origin`).
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from hpc_train.config import RunConfig
from hpc_train.errors import ConfigError

RECIPES_DIR = Path(__file__).parent / "recipes"


def resolve_recipe(name_or_path: str | Path) -> Path:
    """A config path, or the name of a shipped recipe (``tiny_smolvlm`` → recipes/tiny_smolvlm.yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = RECIPES_DIR / f"{Path(str(name_or_path)).stem}.yaml"
    if path.suffix in ("", ".yaml", ".yml") and shipped.is_file() and len(path.parts) == 1:
        return shipped
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    raise ConfigError(
        f"{name_or_path}: no such config file. Fix: give a path to a YAML file, or one of "
        f"the shipped recipes: {', '.join(names)}"
    )


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML config (or shipped recipe name), apply ``key.sub=value`` overrides, validate."""
    data: dict[str, Any] = {}
    lines: dict[str, int] = {}
    source = "<defaults>"
    if path is not None:
        file = resolve_recipe(path)
        source = str(file)
        text = file.read_text()
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{file}:{mark.line + 1}" if mark else str(file)
            raise ConfigError(f"{where}: not valid YAML ({exc}). Fix: correct the syntax") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{file}: the top level must be a mapping of keys. Fix: write `key: value` lines")
        data = loaded
        lines = _key_lines(text)
        _check_keys(data, RunConfig, prefix="", source=source, lines=lines)
    origins = {key: f"{source}:{line}" for key, line in lines.items()}
    for override in overrides:
        key, value = _parse_override(override)
        _check_keys(_nest(key, value), RunConfig, prefix="", source=f"override '{override}'", lines={})
        _set_dotted(data, key, value)
        origins[key] = f"override '{override}'"
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, source, lines, overrides)) from exc
    config._origins = origins
    return config


def with_overrides(config: RunConfig, overrides: list[str] | tuple[str, ...]) -> RunConfig:
    """``config`` with ``key.sub=value`` overrides applied (validated like a loaded config)."""
    data = config.to_dict()
    for override in overrides:
        key, value = _parse_override(override)
        _check_keys(_nest(key, value), RunConfig, prefix="", source=f"override '{override}'", lines={})
        _set_dotted(data, key, value)
    try:
        changed = RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, "<config>", {}, overrides)) from exc
    changed._origins = dict(getattr(config, "_origins", {}))
    return changed


def save_config(config: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (what the run actually used)."""
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(
            f"override '{text}': expected key=value. Fix: write for example data.max_seq_len=1024"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def _nest(key: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    _set_dotted(out, key, value)
    return out


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _section_type(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def valid_keys(model: type[BaseModel] = None, prefix: str = "") -> list[str]:  # type: ignore[assignment]
    """Every dotted key a config may set (used for suggestions and documentation)."""
    model = model or RunConfig
    keys: list[str] = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        sub = _section_type(field.annotation)
        if sub is not None:
            keys.extend(valid_keys(sub, f"{dotted}."))
    return keys


def describe_keys(model: type[BaseModel] | None = None, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, description) of every leaf setting, for docs and ``--keys``."""
    model = model or RunConfig
    rows: list[tuple[str, str, str]] = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        sub = _section_type(field.annotation)
        if sub is not None:
            rows.extend(describe_keys(sub, f"{dotted}."))
            continue
        default = json.dumps(field.default)
        rows.append((dotted, default, " ".join((field.description or "").split())))
    return rows


def _check_keys(data: dict[str, Any], model: type[BaseModel], *, prefix: str, source: str,
                lines: dict[str, int]) -> None:
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        field = model.model_fields.get(key)
        if field is None:
            where = f"{source}:{lines[dotted]}" if dotted in lines else source
            shown = _first_leaf(dotted, value)
            close = difflib.get_close_matches(shown, valid_keys(), n=1, cutoff=0.6)
            if not close:
                siblings = [f"{prefix}{k}" for k in model.model_fields]
                close = difflib.get_close_matches(dotted, siblings, n=1, cutoff=0.0)
            hint = f"did you mean '{close[0]}'?" if close else "remove it"
            raise ConfigError(f"{where}: unknown key '{shown}'. Fix: {hint}")
        sub = _section_type(field.annotation)
        if sub is not None and isinstance(value, dict):
            _check_keys(value, sub, prefix=f"{dotted}.", source=source, lines=lines)


def _first_leaf(dotted: str, value: Any) -> str:
    """``trian`` holding ``{lr: 1}`` reads best as ``trian.lr`` (the key the user meant to set)."""
    while isinstance(value, dict) and len(value) == 1:
        key, value = next(iter(value.items()))
        dotted = f"{dotted}.{key}"
    return dotted


def _key_lines(text: str) -> dict[str, int]:
    """Map each dotted key in a YAML document to its 1-based line, for error messages."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    found: dict[str, int] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                dotted = f"{prefix}{key_node.value}"
                found[dotted] = key_node.start_mark.line + 1
                walk(value_node, f"{dotted}.")

    if root is not None:
        walk(root, "")
    return found


def _explain(exc: ValidationError, source: str, lines: dict[str, int],
             overrides: list[str] | tuple[str, ...]) -> str:
    problems = []
    for err in exc.errors():
        dotted = ".".join(str(p) for p in err["loc"])
        where = source
        from_override = [o for o in overrides if o.split("=", 1)[0].strip() == dotted]
        if from_override:
            where = f"override '{from_override[-1]}'"
        elif dotted in lines:
            where = f"{source}:{lines[dotted]}"
        label = f"'{dotted}'" if dotted else "config"
        problems.append(f"{where}: {label}: {err['msg']}")
    return "\n".join(problems) + "\nFix: correct the value(s) above (see docs/configuration.md)."
