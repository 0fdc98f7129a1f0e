"""A YAML mixture of several datasets, each sampled by a fraction or repeated.

::

    datasets:
      - path: a.jsonl        # relative to this YAML file's folder
        media_root: media/   # optional, relative to this YAML file's folder
        fraction: 0.5        # 0 < fraction <= 1 of the file's records (default 1.0)
      - path: b.json
        repeat: 2            # integer >= 1: every record twice (exclusive with fraction)
        ids_file: ids.txt    # optional id filter, one id per line

The sampled subset depends only on the seed and the entry's position, so a run is
reproducible. The mixture is the entries' records concatenated in file order (the
trainer's sampler shuffles); it holds index arrays, never parsed records.
"""

from __future__ import annotations

import collections.abc
import difflib
import operator
import random
from array import array
from dataclasses import dataclass
from pathlib import Path

import yaml

from hpc_train.config import RunConfig
from hpc_train.data.sources.records import Record, RecordFile, read_id_filter
from hpc_train.errors import DataError

_KEYS = ("path", "media_root", "fraction", "repeat", "ids_file")
_EXAMPLE = "e.g.\ndatasets:\n  - path: train.jsonl\n    fraction: 0.5"


@dataclass(frozen=True)
class MixtureSource:
    """One ``datasets`` entry as resolved: where it is and how much of it is used."""

    index: int
    path: Path
    media_root: Path | None
    ids_file: Path | None
    fraction: float
    repeat: int
    available: int  # records in the file (after the id filter)
    taken: int      # records this entry contributes to the mixture
    missing_ids: frozenset[str] = frozenset()  # ids_file entries not found in the file


class Mixture(collections.abc.Sequence[Record]):
    """Records drawn from several dataset files, addressed through index arrays."""

    def __init__(self, files: list[RecordFile], selections: list[list[int]],
                 sources: list[MixtureSource], path: Path | None = None) -> None:
        self.path = path
        self._files = files
        self.sources = sources
        self._file = array("l")
        self._rec = array("q")
        for k, picked in enumerate(selections):
            self._file.extend([k] * len(picked))
            self._rec.extend(picked)

    @classmethod
    def from_yaml(cls, path: str | Path, seed: int = 0,
                  check_media_exists: bool = True, allow_outside_root: bool = False) -> Mixture:
        """Read a mixture YAML and sample each entry deterministically from ``seed``."""
        yaml_path = Path(path).expanduser().absolute()
        entries = _load_entries(yaml_path)
        files: list[RecordFile] = []
        selections: list[list[int]] = []
        sources: list[MixtureSource] = []
        for k, (entry, line) in enumerate(entries):
            src = _resolve_entry(entry, k, line, yaml_path, check_media_exists)
            ids = read_id_filter(src.ids_file) if src.ids_file is not None else None
            rf = RecordFile(src.path, media_root=src.media_root, ids=ids,
                            check_media_exists=check_media_exists, allow_outside_root=allow_outside_root)
            n = len(rf)
            if src.repeat > 1:
                picked = list(range(n)) * src.repeat
            elif src.fraction >= 1.0:
                picked = list(range(n))
            else:
                # Seeded by (seed, entry position) so entries draw independent subsets;
                # sorted to read each file front to back.
                rng = random.Random(f"{seed}:{k}")
                picked = sorted(rng.sample(range(n), max(1, round(n * src.fraction))))
            files.append(rf)
            selections.append(picked)
            sources.append(MixtureSource(k, rf.path, src.media_root, src.ids_file,
                                         src.fraction, src.repeat, n, len(picked),
                                         frozenset(rf.missing_ids)))
        return cls(files, selections, sources, yaml_path)

    def __len__(self) -> int:
        return len(self._rec)

    def __getitem__(self, i: int) -> Record:  # type: ignore[override]
        try:
            i = operator.index(i)  # samplers may hand out numpy integers
        except TypeError:
            raise TypeError(f"Mixture indices must be integers, not {type(i).__name__}"
                            ) from None
        return self._files[self._file[i]][self._rec[i]]

    def location(self, i: int) -> tuple[Path, int]:
        """(file, line) of record ``i`` without parsing it."""
        return self._files[self._file[i]].location(self._rec[i])


@dataclass(frozen=True)
class _Entry:
    path: Path
    media_root: Path | None
    ids_file: Path | None
    fraction: float
    repeat: int


def _load_entries(yaml_path: Path) -> list[tuple[dict, int]]:
    """The ``datasets`` entries with their 1-based YAML line numbers."""
    try:
        text = yaml_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError("mixture file not found", path=yaml_path,
                        fix="check the dataset path") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise DataError(f"invalid YAML: {getattr(e, 'problem', None) or e}", path=yaml_path,
                        line=mark.line + 1 if mark is not None else None,
                        fix="fix the YAML syntax (indentation, ':' after keys, '-' per "
                            "entry)") from None
    if not isinstance(data, dict) or "datasets" not in data:
        raise DataError("mixture YAML has no top-level 'datasets' list", path=yaml_path,
                        fix=f"list the datasets under a 'datasets:' key, {_EXAMPLE}")
    extra = sorted(set(data) - {"datasets"})
    if extra:
        raise DataError(f"unknown top-level key(s) {extra} in mixture YAML", path=yaml_path,
                        fix="only 'datasets' is allowed at the top level")
    entries = data["datasets"]
    if not isinstance(entries, list) or not entries:
        raise DataError("'datasets' must be a non-empty list", path=yaml_path,
                        fix=f"add one '- path: ...' entry per dataset, {_EXAMPLE}")
    lines = [None] * len(entries)
    for key_node, value_node in node.value:
        if key_node.value == "datasets" and isinstance(value_node, yaml.SequenceNode):
            lines = [item.start_mark.line + 1 for item in value_node.value]
    return list(zip(entries, lines, strict=True))


def _resolve_entry(entry: object, k: int, line: int | None, yaml_path: Path,
                   check_media_exists: bool) -> _Entry:
    where = f"datasets[{k}]"

    def fail(problem: str, fix: str) -> DataError:
        return DataError(f"{where}: {problem}", path=yaml_path, line=line, fix=fix)

    if not isinstance(entry, dict):
        raise fail("entry must be a mapping with at least 'path'",
                   "write the entry as '- path: file.jsonl' (optionally fraction/repeat/"
                   "media_root/ids_file)")
    for key in entry:
        if key not in _KEYS:
            close = difflib.get_close_matches(str(key), _KEYS, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise fail(f"unknown key '{key}'",
                       f"{hint}valid keys are: {', '.join(_KEYS)}")
    base = yaml_path.parent

    def local(key: str) -> Path | None:
        value = entry.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise fail(f"'{key}' must be a path string (got {value!r})",
                       f"write '{key}: relative/or/absolute/path'")
        p = Path(value).expanduser()
        return p if p.is_absolute() else base / p

    path = local("path")
    if path is None:
        raise fail("missing 'path'", "add 'path: <dataset file>' (relative to the YAML folder)")
    if path.suffix.lower() in (".yaml", ".yml"):
        raise fail("nested mixtures are not supported",
                   "list the inner mixture's datasets directly in this file")
    if not path.is_file():
        raise fail(f"dataset file not found: {path}",
                   f"check 'path' (relative paths resolve against {base})")
    media_root = local("media_root")
    if check_media_exists and media_root is not None and not media_root.is_dir():
        raise fail(f"media_root is not a directory: {media_root}",
                   f"check 'media_root' (relative paths resolve against {base})")
    ids_file = local("ids_file")
    if ids_file is not None and not ids_file.is_file():
        raise fail(f"ids_file not found: {ids_file}",
                   f"check 'ids_file' (relative paths resolve against {base})")
    fraction, repeat = _sampling(entry, fail)
    return _Entry(path, media_root, ids_file, fraction, repeat)


def _sampling(entry: dict, fail: collections.abc.Callable[[str, str], DataError]) -> tuple[float, int]:
    """An entry's ``fraction`` (subsample) and ``repeat`` (upsample), at most one of them set."""
    if "fraction" in entry and "repeat" in entry:
        raise fail("'fraction' and 'repeat' are exclusive",
                   "use fraction (0 < f <= 1) to subsample or repeat (integer >= 1) to "
                   "upsample, not both")
    fraction = entry.get("fraction", 1.0)
    if (isinstance(fraction, bool) or not isinstance(fraction, int | float)
            or not 0 < fraction <= 1):
        raise fail(f"fraction must be a number with 0 < fraction <= 1 (got {fraction!r})",
                   "use e.g. 'fraction: 0.25'; to upsample use 'repeat: 2' instead")
    repeat = entry.get("repeat", 1)
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise fail(f"repeat must be an integer >= 1 (got {repeat!r})",
                   "use e.g. 'repeat: 2'; to subsample use 'fraction: 0.5' instead")
    return float(fraction), repeat


def read_dataset(path: str | Path, media_root: str | Path | None = None,
                 ids_file: str | Path | None = None, seed: int = 0,
                 check_media_exists: bool = True, media_root_note: str | None = None,
                 allow_outside_root: bool = False) -> collections.abc.Sequence[Record]:
    """Open a dataset: ``.yaml``/``.yml`` is a Mixture, anything else one RecordFile
    (``media_root_note``, ``allow_outside_root``: see :class:`RecordFile`)."""
    p = Path(path)
    if p.suffix.lower() in (".yaml", ".yml"):
        if media_root is not None or ids_file is not None:
            raise DataError("media_root / ids_file cannot be given for a mixture YAML",
                            path=p, fix="set media_root and ids_file per entry inside the "
                                        "mixture YAML")
        return Mixture.from_yaml(p, seed=seed, check_media_exists=check_media_exists,
                                 allow_outside_root=allow_outside_root)
    ids = read_id_filter(ids_file) if ids_file is not None else None
    return RecordFile(p, media_root=media_root, ids=ids, check_media_exists=check_media_exists,
                      media_root_note=media_root_note, allow_outside_root=allow_outside_root)


def read_split(config: RunConfig, split: str) -> collections.abc.Sequence[Record]:
    """The records of ``data.train`` or ``data.eval``, with the config's media root and id filter."""
    data = config.data
    return read_dataset(getattr(data, split), media_root=data.media_root, ids_file=data.ids_file,
                        seed=config.train.seed, allow_outside_root=data.allow_media_outside_root,
                        media_root_note=config.mixed_origin_note("data.media_root", f"data.{split}"))


__all__ = ["Mixture", "MixtureSource", "read_dataset", "read_split"]
