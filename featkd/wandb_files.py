"""Reading the W&B run files featkd writes under a run folder (`wandb/`), without a network.

W&B keeps each run segment's records in a `run-<id>.wandb` file: a header, then records
framed as in LevelDB's log format (32 KiB blocks; each chunk a CRC, a length, a type: whole,
first, middle or last part of a record), each record a `wandb_internal_pb2.Record`. A process
killed while logging leaves the file cut short; what was written before stays readable.

featkd reads them to make a resumed W&B run's history whole (the rows a killed process had not
written are logged again), and its tests read them to check what a run holds.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HEADER = b":W&B"
HEADER_SIZE = 7  # ident (4), magic (2), version (1)
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def raw_records(path: Path) -> Iterator[bytes]:
    """The serialized records of one `.wandb` file, stopping where a killed writer stopped."""
    data = Path(path).read_bytes()
    if data[:4] != HEADER:
        raise ValueError(f"{path} is not a W&B run file")
    pos, pending = HEADER_SIZE, b""
    while pos + 7 <= len(data):
        space = BLOCK - pos % BLOCK
        if space < 7:  # a block's tail too short for a chunk header is padding
            pos += space
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 or pos + 7 + length > len(data):  # zero padding, or a chunk cut off by a kill
            if kind == 0:
                pos += space
                continue
            return
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""


def records(path: Path) -> Iterator[Any]:
    """The parsed records (`wandb_internal_pb2.Record`) of one `.wandb` file."""
    from wandb.proto import wandb_internal_pb2

    for raw in raw_records(path):
        yield wandb_internal_pb2.Record.FromString(raw)


def run_files(run_dir: Path, run_id: str) -> list[Path]:
    """Every segment's file of W&B run `run_id` under a run folder, oldest first."""
    return sorted(Path(run_dir).glob(f"wandb/*-{run_id}/run-{run_id}.wandb"))


def history(run_dir: Path, run_id: str) -> list[dict[str, Any]]:
    """Every history row of W&B run `run_id` across its segments, in the order written."""
    rows = []
    for path in run_files(run_dir, run_id):
        for record in records(path):
            if record.WhichOneof("record_type") == "history":
                rows.append({(item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def logged_steps(run_dir: Path, run_id: str) -> set[int]:
    """The steps W&B run `run_id` has history rows for."""
    return {int(row["_step"]) for row in history(run_dir, run_id) if "_step" in row}
