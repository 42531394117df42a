"""Loggers: metrics.jsonl in the run folder (always) and Weights & Biases (offline by default).

Only rank 0 logs. A W&B run gets the flat resolved config, and project, group, job type and
tags from the config, so a dashboard can group the stages and seeds of one experiment.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Protocol

from featkd.distributed import rank


class Logger(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...
    def summary(self, values: dict[str, Any]) -> None: ...
    def finish(self) -> None: ...


class NullLogger:
    """Logs nothing (other ranks, or `logger=none` without a run folder)."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


class JsonlLogger:
    """One JSON object per log call in `metrics.jsonl`; the summary in `summary.json`."""

    def __init__(self, run_dir: Path, stage: str) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.summary_path = run_dir / "summary.json"
        self.stage = stage

    def log(self, metrics: dict[str, float], step: int) -> None:
        record = {"stage": self.stage, "step": step, "time": round(time.time(), 3), **_plain(metrics)}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def summary(self, values: dict[str, Any]) -> None:
        existing = json.loads(self.summary_path.read_text()) if self.summary_path.exists() else {}
        existing[self.stage] = _plain(values)
        self.summary_path.write_text(json.dumps(existing, indent=2) + "\n")

    def finish(self) -> None:
        pass


class WandbLogger:
    """A W&B run; `mode="offline"` writes it under the run folder for `wandb sync` later.

    Resuming (`resume_id`) continues the same W&B run; the rows of `history` (metrics.jsonl's
    rows of this stage, up to the checkpoint resumed from) that W&B's files lack, because a
    killed process never wrote them, are logged again first, in step order.
    """

    def __init__(self, run_dir: Path, name: str, config: dict[str, Any], *, project: str, entity: str | None,
                 group: str | None, job_type: str | None, tags: list[str], mode: str,
                 resume_id: str | None = None, history: list[dict[str, Any]] = ()) -> None:
        import wandb

        resume: dict[str, Any] = {"id": resume_id, "resume": "allow"} if resume_id else {}
        self.run = wandb.init(
            **resume,
            project=project,
            entity=entity,
            group=group,
            job_type=job_type,
            tags=tags or None,
            name=name,
            config=config,
            dir=str(run_dir),
            mode=mode,
            reinit="finish_previous",
            settings=wandb.Settings(console="off", silent=True, disable_git=True, save_code=False),
        )
        if resume_id and history:
            self._log_missing(run_dir, history)

    def _log_missing(self, run_dir: Path, history: list[dict[str, Any]]) -> None:
        from featkd.wandb_files import logged_steps

        logged = logged_steps(run_dir, self.run_id)
        for row in sorted(history, key=lambda r: r["step"]):
            if row["step"] not in logged:
                self.log({k: v for k, v in row.items() if k not in ("stage", "step", "time")}, row["step"])

    @property
    def run_id(self) -> str | None:
        return getattr(self.run, "id", None)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def summary(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            self.run.summary[key] = value

    def finish(self) -> None:
        self.run.finish()


class MultiLogger:
    """Send every call to several loggers."""

    def __init__(self, *loggers: Logger) -> None:
        self.loggers = loggers

    @property
    def run_id(self) -> str | None:
        """The W&B run's id, kept so that a resumed run continues the same W&B run."""
        return next((getattr(lg, "run_id") for lg in self.loggers if getattr(lg, "run_id", None)), None)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.log(metrics, step)

    def summary(self, values: dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.summary(values)

    def finish(self) -> None:
        for logger in self.loggers:
            logger.finish()


def make_logger(settings: Any, run_dir: Path, stage: str, name: str, flat_config: dict[str, Any],
                resume_id: str | None = None, final: bool = True, history: list[dict[str, Any]] = ()) -> Logger:
    """The loggers for one stage of a run, from the config's `logger:` section; a resumed
    stage's W&B run gets the `history` it lacks (see `WandbLogger`).

    Under a W&B sweep agent (WANDB_SWEEP_ID set) only the final stage is a W&B run: the agent
    expects one run per trial.
    """
    if rank() != 0:
        return NullLogger()
    loggers: list[Logger] = [JsonlLogger(run_dir, stage)]
    in_sweep = bool(os.environ.get("WANDB_SWEEP_ID"))
    if settings.name == "wandb" and settings.mode != "disabled" and (final or not in_sweep):
        loggers.append(WandbLogger(
            run_dir, name, flat_config, project=settings.project, entity=settings.entity,
            group=settings.group, job_type=settings.job_type or stage, tags=list(settings.tags),
            mode=settings.mode, resume_id=resume_id, history=list(history),
        ))
    return MultiLogger(*loggers)


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        if hasattr(value, "item"):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            value = str(value)
        out[key] = value
    return out
