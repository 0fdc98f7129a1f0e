"""Read back what an offline wandb run wrote: its ``run-<id>.wandb`` file is a LevelDB-style log
(after a 7-byte header, 32 KiB blocks of records, each a 7-byte header: CRC, length, kind) of
wandb's own protobuf ``Record`` messages, which ``wandb sync`` uploads later."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
FILE_HEADER = 7  # b":W&B", a 2-byte magic, a version byte
RECORD_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(data: bytes) -> list[bytes]:
    """The log's records, fragments joined."""
    assert data[:4] == b":W&B", data[:8]
    out, pending, pos = [], b"", FILE_HEADER
    while pos + RECORD_HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < RECORD_HEADER:  # the rest of a block too short for a header is padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + RECORD_HEADER])
        if kind == 0:  # zeros: unwritten tail
            break
        chunk = data[pos + RECORD_HEADER:pos + RECORD_HEADER + length]
        pos += RECORD_HEADER + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            out.append(pending)
    return out


def read_offline_run(path: Path) -> dict[str, Any]:
    """``{"name", "id", "config", "history": [{"_step": ..., key: value}, ...]}`` of one ``.wandb`` file."""
    from wandb.proto import wandb_internal_pb2 as pb

    run: dict[str, Any] = {"config": {}, "history": []}
    for payload in _payloads(path.read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":  # the config given to init comes with the run
            run["name"], run["id"] = record.run.display_name, record.run.run_id
            run["config"].update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "config":
            run["config"].update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            run["history"].append({(item.key or ".".join(item.nested_key)): json.loads(item.value_json)
                                   for item in record.history.item})
    return run
