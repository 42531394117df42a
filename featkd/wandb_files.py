"""Reading the W&B run files featkd writes under a run folder (`wandb/`), without a network.

W&B keeps each run segment's records in a `run-<id>.wandb` file: a header, then records
framed as in LevelDB's log format (32 KiB blocks; each chunk a CRC, a length, a type: whole,
first, middle or last part of a record), each record a `wandb_internal_pb2.Record`. A process
killed while logging leaves the file cut short; what was written before stays readable.

featkd reads them to make a resumed W&B run's history whole (the rows a killed process had not
written are logged again), and its tests read them to check what a run holds: history, summary,
config, metric definitions, artifacts (logged, and used as inputs) and the tables and images
a run keeps under its `files/`.
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


def run_records(run_dir: Path, run_id: str, kind: str | None = None) -> Iterator[Any]:
    """The records of W&B run `run_id` across its segments, in the order written; with
    `kind`, only those of that type ("history", "summary", "artifact", "metric", ...)."""
    for path in run_files(run_dir, run_id):
        for record in records(path):
            if kind is None or record.WhichOneof("record_type") == kind:
                yield record


def history(run_dir: Path, run_id: str) -> list[dict[str, Any]]:
    """Every history row of W&B run `run_id` across its segments, in the order written."""
    return [{(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in record.history.item}
            for record in run_records(run_dir, run_id, "history")]


def logged_steps(run_dir: Path, run_id: str) -> set[int]:
    """The steps W&B run `run_id` has history rows for."""
    return {int(row["_step"]) for row in history(run_dir, run_id) if "_step" in row}


def runs(run_dir: Path) -> list[dict[str, Any]]:
    """Every W&B run under a folder: id, name, group and job type, as first written."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(Path(run_dir).glob("wandb/*-*/run-*.wandb")):
        for record in records(path):
            if record.WhichOneof("record_type") == "run":
                run = record.run
                found.setdefault(run.run_id, {"id": run.run_id, "name": run.display_name, "group": run.run_group,
                                              "job_type": run.job_type})
                break
    return list(found.values())


def finished(run_dir: Path, run_id: str) -> bool:
    """Whether W&B run `run_id`'s last segment is complete (its exit record is written: the W&B
    service writes the last records shortly after the run's `finish()` returns)."""
    files = run_files(run_dir, run_id)
    return bool(files) and any(record.WhichOneof("record_type") == "exit" for record in records(files[-1]))


def summary(run_dir: Path, run_id: str) -> dict[str, Any]:
    """The final summary of W&B run `run_id`: its updates applied in order (nested values,
    such as a table's or an image's description, as dicts)."""
    values: dict[str, Any] = {}
    for record in run_records(run_dir, run_id, "summary"):
        for item in record.summary.update:
            _put(values, _path(item), json.loads(item.value_json))
        for item in record.summary.remove:
            _pop(values, _path(item))
    return values


def config(run_dir: Path, run_id: str) -> dict[str, Any]:
    """The config of W&B run `run_id` (with W&B's own `_wandb` section: the charts of
    `wandb.plot` are under `_wandb.visualize`)."""
    values: dict[str, Any] = {}
    for record in run_records(run_dir, run_id):
        kind = record.WhichOneof("record_type")
        if kind in ("config", "run"):
            for item in (record.config if kind == "config" else record.run.config).update:
                _put(values, _path(item), json.loads(item.value_json))
    return values


def charts(run_dir: Path, run_id: str) -> dict[str, dict[str, Any]]:
    """The custom charts (`wandb.plot.*`) of W&B run `run_id`: key -> {"chart": the chart's
    W&B name such as "wandb/confusion_matrix/v1", "table": the key of the table it draws}."""
    visualize = config(run_dir, run_id).get("_wandb", {}).get("visualize", {})
    return {key: {"chart": panel.get("panel_config", {}).get("panelDefId"),
                  "table": _argument(panel.get("panel_config", {}).get("userQuery", {}), "tableKey")}
            for key, panel in visualize.items()}


def _argument(query: Any, name: str) -> Any:
    """The value of the first argument called `name` in a chart's nested query."""
    if isinstance(query, dict):
        if query.get("name") == name and "value" in query:
            return query["value"]
        query = list(query.values())
    if isinstance(query, list):
        for part in query:
            found = _argument(part, name)
            if found is not None:
                return found
    return None


def metric_definitions(run_dir: Path, run_id: str) -> dict[str, dict[str, Any]]:
    """The `define_metric` calls of W&B run `run_id`: name or glob -> {"step_metric": ...,
    "summary": set of "min", "max", "last", ...}, in the order defined."""
    out: dict[str, dict[str, Any]] = {}
    for record in run_records(run_dir, run_id, "metric"):
        metric = record.metric
        summary = {field.name for field, value in metric.summary.ListFields() if value is True}
        out[metric.name or metric.glob_name] = {"step_metric": metric.step_metric or None, "summary": summary,
                                                "glob": not metric.name}
    return out


def artifacts(run_dir: Path, run_id: str) -> list[dict[str, Any]]:
    """The artifacts W&B run `run_id` logged, in order: name, type, aliases, metadata, files
    (name in the artifact -> local file), digest, and `used`: logged as an input of the run
    (`use_artifact`), not produced by it."""
    out = []
    for record in run_records(run_dir, run_id, "artifact"):
        artifact = record.artifact
        out.append({"name": artifact.name, "type": artifact.type, "aliases": list(artifact.aliases),
                    "metadata": json.loads(artifact.metadata) if artifact.metadata else {},
                    "files": {entry.path: entry.local_path for entry in artifact.manifest.contents},
                    "digest": artifact.digest, "used": artifact.use_after_commit and artifact.user_created})
    return out


def run_folder(run_dir: Path, run_id: str) -> Path:
    """The folder of W&B run `run_id`'s files (the newest segment's), where its tables and
    images are."""
    files = run_files(run_dir, run_id)
    if not files:
        raise FileNotFoundError(f"no W&B run {run_id!r} under {str(run_dir)!r}")
    return files[-1].parent / "files"


def table(run_dir: Path, run_id: str, key: str) -> dict[str, Any]:
    """The table W&B run `run_id` logged last under `key`: {"columns": [...], "data": [[...]]}."""
    described = summary(run_dir, run_id).get(key)
    if not isinstance(described, dict) or described.get("_type") != "table-file":
        raise KeyError(f"W&B run {run_id!r} has no table {key!r}")
    return json.loads((run_folder(run_dir, run_id) / described["path"]).read_text())


def images(run_dir: Path, run_id: str) -> dict[str, list[tuple[int, Path]]]:
    """The images W&B run `run_id` logged: key -> [(step, file), ...] in the order logged."""
    folder = run_folder(run_dir, run_id)
    out: dict[str, list[tuple[int, Path]]] = {}
    for record in run_records(run_dir, run_id, "history"):
        row: dict[str, Any] = {}
        for item in record.history.item:
            _put(row, _path(item), json.loads(item.value_json))
        for key, value in row.items():
            if isinstance(value, dict) and value.get("_type") == "image-file":
                out.setdefault(key, []).append((int(row.get("_step", -1)), folder / value["path"]))
    return out


def _path(item: Any) -> list[str]:
    return [item.key] if item.key else list(item.nested_key)


def _put(values: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        if not isinstance(values.get(part), dict):
            values[part] = {}
        values = values[part]
    values[path[-1]] = value


def _pop(values: dict[str, Any], path: list[str]) -> None:
    for part in path[:-1]:
        values = values.get(part, {})
        if not isinstance(values, dict):
            return
    values.pop(path[-1], None)
