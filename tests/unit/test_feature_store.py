"""The feature store: entries round-trip exactly, a torn or foreign entry is a miss, a writer
killed mid-write leaves no readable partial entry, and keys change with what they cover."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from hpc_train.data.caches.feature_store import FeatureStore, key_of, media_identity, tensors_digest


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_entry_round_trips_exactly_and_is_counted(tmp_path, dtype):
    store = FeatureStore(tmp_path)
    key = key_of("tower", "settings", "a.mp4")
    features = torch.randn(3, 64, 48).to(dtype)
    assert store.load(key) is None and store.counts.misses == 1
    store.save(key, features)
    loaded = store.load(key)
    assert loaded is not None and loaded.dtype == dtype and torch.equal(loaded, features)
    assert store.counts.hits == 1 and store.counts.writes == 1
    assert store.counts.bytes_read == features.numel() * features.element_size()
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".partial")]


def test_a_torn_entry_is_a_miss_and_is_rewritten(tmp_path):
    store = FeatureStore(tmp_path)
    key = key_of("torn")
    features = torch.randn(8, 64, 32)
    path = store.save(key, features)
    whole = path.read_bytes()
    for cut in (len(whole) // 2, len(whole) - 1, 7):
        path.write_bytes(whole[:cut])
        assert store.load(key) is None
    flipped = bytearray(whole)
    flipped[-5] ^= 0xFF  # a changed byte in the body, the header intact
    path.write_bytes(bytes(flipped))
    assert store.load(key) is None
    assert store.counts.rejected == 4 and store.counts.hits == 0
    store.save(key, features)
    assert torch.equal(store.load(key), features)


def test_another_keys_entry_in_this_keys_place_is_a_miss(tmp_path):
    store = FeatureStore(tmp_path)
    mine, other = key_of("mine"), key_of("other")
    store.save(other, torch.ones(2, 2))
    store.path_for(mine).parent.mkdir(parents=True, exist_ok=True)
    store.path_for(mine).write_bytes(store.path_for(other).read_bytes())
    assert store.load(mine) is None and store.counts.rejected == 1


WRITER = """
import os, sys, torch
from hpc_train.data.caches.feature_store import FeatureStore
store, key, parent = FeatureStore(sys.argv[1]), sys.argv[2], os.getppid()
step = 0
while os.getppid() == parent:  # not past a test process that died
    step += 1
    store.save(key, torch.full((4, 1024, 1024), float(step)))  # 16 MiB an entry
    if step == 1:
        print("ready", flush=True)
"""


def test_readers_of_an_entry_being_rewritten_and_after_its_writer_is_killed_see_whole_entries(tmp_path):
    key = key_of("killed")
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), key], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "ready"
        store = FeatureStore(tmp_path)
        values = set()
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:  # reading while entries are rewritten in place
            loaded = store.load(key)
            assert loaded is not None and bool((loaded == loaded.flatten()[0]).all())
            values.add(float(loaded.flatten()[0]))
    finally:
        os.kill(writer.pid, signal.SIGKILL)  # at any point of a write
        writer.wait(timeout=30)
    assert len(values) > 1 and store.counts.rejected == 0  # several writes seen, none torn
    loaded = store.load(key)
    assert loaded is not None and bool((loaded == loaded.flatten()[0]).all())
    assert all(p.name.endswith(".partial") for p in tmp_path.rglob("*") if p.is_file() and p != store.path_for(key))


def test_keys_change_with_the_media_file_and_the_weights(tmp_path):
    media = tmp_path / "clip.mp4"
    media.write_bytes(b"x" * 100)
    first = media_identity(media)
    assert media_identity(tmp_path / "." / "clip.mp4") == first  # the same file by another path
    os.utime(media, ns=(time.time_ns(), time.time_ns() + 10**9))
    touched = media_identity(media)
    media.write_bytes(b"x" * 101)
    assert len({first, touched, media_identity(media)}) == 3

    weights = {"tower.a": torch.ones(3), "connector.b": torch.zeros(2, 2)}
    digest = tensors_digest(weights)
    assert tensors_digest(dict(reversed(list(weights.items())))) == digest
    changed = {**weights, "tower.a": torch.tensor([1.0, 1.0, 1.0 + 1e-6])}
    assert tensors_digest(changed) != digest
    assert tensors_digest({**weights, "tower.a": torch.ones(3, dtype=torch.float64)}) != digest
    assert key_of("ab", "c") != key_of("a", "bc")


def test_keys_must_be_hex_digests(tmp_path):
    with pytest.raises(ValueError, match="lowercase hex"):
        FeatureStore(tmp_path).path_for("../../etc/passwd")
