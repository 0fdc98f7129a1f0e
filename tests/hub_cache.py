"""A Hugging Face cache laid out as ``snapshot_download`` leaves it (blobs, snapshot links, refs,
the tree listing), written with huggingface_hub's own helpers: nothing can be downloaded here."""

from __future__ import annotations

import hashlib
from pathlib import Path

from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache
from huggingface_hub.file_download import (
    _cache_commit_hash_for_specific_revision,
    _create_symlink,
    repo_folder_name,
)


def cache_repo(cache: Path, repo_id: str, folder: Path, commit: str, refs: tuple[str, ...] = ("main",),
               missing: tuple[str, ...] = (), repo_type: str = "model") -> Path:
    """``folder``'s files as the repo ``repo_id`` (a model, or ``repo_type``) at ``commit`` in the
    cache ``cache``; the files named in ``missing`` are listed in the tree but absent (a download
    cut short)."""
    storage = cache / repo_folder_name(repo_id=repo_id, repo_type=repo_type)
    snapshot = storage / "snapshots" / commit
    entries = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = file.relative_to(folder).as_posix()
        data = file.read_bytes()
        blob_id = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # noqa: S324 - git's own id
        large = file.suffix == ".safetensors"
        sha256 = hashlib.sha256(data).hexdigest() if large else None
        entries[name] = TreeCacheEntry(size=len(data), blob_id=blob_id, lfs_sha256=sha256,
                                       lfs_size=len(data) if large else None)
        if name in missing:
            continue
        # The cache names a blob by its etag: the sha256 for LFS files, the git blob id otherwise.
        blob = storage / "blobs" / (sha256 or blob_id)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        _create_symlink(str(blob), str(snapshot / name), new_blob=False)
    for ref in refs:
        _cache_commit_hash_for_specific_revision(str(storage), ref, commit)
    write_tree_cache(str(storage), commit, entries)
    return snapshot
