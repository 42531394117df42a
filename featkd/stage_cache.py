"""Trained stages kept for reuse under `<output_dir>/cache/`.

A stage marked `cache: true` (every teacher a simple config trains) is stored under a key of
everything that determines its weights, so runs that change only the student side share
their teachers. One process trains a given cached stage while the others wait for it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import nn

from featkd import distributed
from featkd.checkpoint import save_checkpoint
from featkd.config import Config
from featkd.engine import StageResult
from featkd.stages import Plan


def cache_key(config: Config, plan: Plan, index: int) -> str:
    """A digest of everything that determines the weights stage `index` produces: its model,
    settings, seed and loss, the data, and (recursively) how its teachers were made."""

    def model_record(key: str, upto: int) -> Any:
        producer = next((i for i in range(upto - 1, -1, -1) if plan.stages[i].model == key), None)
        spec = plan.models[key].model_dump(mode="json", exclude={"cache", "data"}) if key in plan.models else None
        return {"spec": spec, "made_by": stage_record(producer) if producer is not None else None}

    def stage_record(i: int) -> Any:
        stage = plan.stages[i]
        return {
            "model": model_record(stage.model, i),
            "teachers": [model_record(t, i) for t in stage.teachers],
            "terms": {k: v.model_dump(mode="json") for k, v in stage.terms.items()},
            "train": stage.train.model_dump(mode="json"),
            "seed": stage.seed,
            "freeze": stage.freeze,
            "unfreeze": stage.unfreeze,
            "data": stage.data.model_dump(mode="json", exclude={"num_workers", "eval_batch_size"}),
            "specialists": stage.specialists.model_dump(mode="json") if stage.specialists else None,
            "generalist": model_record(stage.specialists.generalist, i) if stage.specialists else None,
        }

    record = {"stage": stage_record(index), "precision": config.precision}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def cache_path(config: Config, plan: Plan, index: int) -> Path:
    stage = plan.stages[index]
    model = plan.models[stage.model].model.replace(":", "_") if stage.model in plan.models else "specialists"
    return Path(config.output_dir) / "cache" / f"{model}-{cache_key(config, plan, index)}.pt"


@contextmanager
def claimed(path: Path) -> Iterator[None]:
    """Only one process (of this run or another) trains a given cached stage; the others
    wait here, then load it. In DDP, rank 0 holds the lock for its group."""
    if distributed.rank() != 0:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, at worst the stage is trained twice
        yield
        return
    with open(path.with_suffix(".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def store(path: Path, model: nn.Module, record: dict[str, Any], result: StageResult) -> None:
    """Keep a trained stage's model, what it is, and how it did (rank 0 writes)."""
    if distributed.rank() == 0:
        save_checkpoint(path, {"kind": "model", "model": model.state_dict(), **record, "result": asdict(result)})
