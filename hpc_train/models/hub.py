"""Models named by Hugging Face Hub id (``org/name`` or ``org/name@revision``), read from the local
cache that huggingface_hub writes, never from the network: compute nodes are usually offline, and a
model is fetched once on a login node (``hpc-train download``) into ``HF_HOME`` / ``HF_HUB_CACHE``."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from hpc_train.errors import ConfigError

# The Hub's own rule for a repo id: one ``/``; each part letters, digits, ``-``, ``_``, ``.``,
# starting and ending with a letter or digit.
_PART = r"[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?"
_HUB_ID = re.compile(rf"^(?P<repo>{_PART}/{_PART})(?:@(?P<revision>[\w./-]+))?$")
# What a VLM repo holds that a PyTorch run never reads (ONNX exports alone are gigabytes).
SKIPPED_FILES = ["onnx/*", "*.onnx", "*.msgpack", "*.h5", "flax_model*", "tf_model*", "*.gguf"]


@dataclass(frozen=True)
class HubId:
    """A repo on the Hub, at a branch, tag or commit (``None``: the default branch)."""

    repo: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo if self.revision is None else f"{self.repo}@{self.revision}"

    @classmethod
    def parse(cls, text: str) -> HubId | None:
        """The hub id ``text`` names, or None when it is no hub id (an existing folder, an absolute
        or ``./`` path, anything with more than one ``/``)."""
        if text.startswith((".", "/", "~")) or Path(text).exists():
            return None
        found = _HUB_ID.match(text)
        if found is None:
            return None
        return cls(found["repo"], found["revision"])


@dataclass(frozen=True)
class Resolved:
    """Where a model (or adapter) named in the config lies, and at which commit if from the Hub."""

    folder: Path
    hub_id: HubId | None = None
    commit: str | None = None

    def pinned(self, text: str) -> str:
        """``text`` pinned to the commit it resolved to (unchanged for a folder)."""
        return text if self.hub_id is None else f"{self.hub_id.repo}@{self.commit}"


def hub_cache_dir() -> Path:
    """The cache huggingface_hub reads and writes here: ``HF_HUB_CACHE``, else ``HF_HOME/hub``,
    else ``~/.cache/huggingface/hub`` (read when called, so a test or a launcher may set it late)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def resolve(text: str, key: str = "model.path", marker: str = "config.json") -> Resolved:
    """The folder ``text`` (a saved folder or a hub id) names, holding ``marker``; offline, from the
    local cache. Fails with one message naming the id, the cache looked in and the fix."""
    hub_id = HubId.parse(text)
    if hub_id is None:
        folder = Path(text)
        if not (folder / marker).is_file():
            raise ConfigError(
                f"{key}={text}: no {marker} there, so it is not a saved folder (nor a hub id such as "
                "HuggingFaceTB/SmolVLM-256M-Instruct). Fix: point it at a folder written by save_pretrained "
                "(`hpc-train make-tiny smolvlm DIR` writes one), or name a hub id fetched with `hpc-train download`")
        return Resolved(folder)
    folder = cached_snapshot(hub_id, key)
    if not (folder / marker).is_file():
        raise ConfigError(f"{key}={text}: the cached snapshot {folder} holds no {marker}, so it is not a "
                          f"{'LoRA adapter' if marker != 'config.json' else 'model'} repo (or its download was "
                          f"cut short). Fix: `hpc-train download {hub_id}` again on a node with internet")
    return Resolved(folder, hub_id, folder.name)


def cached_snapshot(hub_id: HubId, key: str = "model.path", cache_dir: Path | None = None) -> Path:
    """The complete snapshot of ``hub_id`` in the local cache (no network call)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = cache_dir or hub_cache_dir()
    try:
        return Path(snapshot_download(hub_id.repo, revision=hub_id.revision, cache_dir=cache,
                                      local_files_only=True))
    except LocalEntryNotFoundError as exc:
        raise ConfigError(_not_cached(hub_id, key, cache, exc)) from None


def _not_cached(hub_id: HubId, key: str, cache: Path, exc: Exception) -> str:
    what = f"revision {hub_id.revision}" if hub_id.revision else "its default branch"
    incomplete = type(exc).__name__ == "IncompleteSnapshotError"
    problem = "is only partly in" if incomplete else "is not in"
    return (f"{key}={hub_id}: no folder of that name here, and {hub_id.repo} ({what}) {problem} the Hugging "
            f"Face cache at {cache} (runs never download). Fix: on a node with internet run `hpc-train download {hub_id}` (it fills the "
            "same cache), or point HF_HOME / HF_HUB_CACHE at the cache that holds it")


def download(hub_id: HubId, repo_type: str = "model", cache_dir: Path | None = None) -> Resolved:
    """Fetch ``hub_id`` into the cache (all but the files a PyTorch run never reads); offline
    (``HF_HUB_OFFLINE=1``), a complete cached copy is returned as it is."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache = cache_dir or hub_cache_dir()
    try:
        folder = Path(snapshot_download(hub_id.repo, revision=hub_id.revision, repo_type=repo_type,
                                        cache_dir=cache, ignore_patterns=SKIPPED_FILES))
    except GatedRepoError:
        raise ConfigError(f"{hub_id}: the repo is gated. Fix: accept its terms on huggingface.co/{hub_id.repo}, "
                          "then `hf auth login` (or set HF_TOKEN) and run this again") from None
    except RevisionNotFoundError:
        raise ConfigError(f"{hub_id}: the repo has no revision {hub_id.revision}. Fix: name a branch, tag or "
                          f"commit listed on huggingface.co/{hub_id.repo}/commits") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"{hub_id}: no such {repo_type} repo on the Hub (or it is private). Fix: check the id "
                          "on huggingface.co; for a private repo, `hf auth login` first") from None
    except LocalEntryNotFoundError as exc:
        raise ConfigError(f"{hub_id}: could not be fetched into {cache}: {exc} Fix: run this on a node that "
                          "reaches huggingface.co, with HF_HUB_OFFLINE unset") from None
    return Resolved(folder, hub_id, folder.name)
