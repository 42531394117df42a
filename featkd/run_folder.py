"""A run's folder and what it records.

    runs/<name>-<time>/
      config.yaml      the fully resolved config
      state.json       each stage's status ("running", "done", "cached"), result and W&B run id
      metrics.jsonl    one line per epoch and stage
      summary.json     per-stage summaries, and the run's outcome under "run"
      checkpoints/     <stage>-last.pt / <stage>-best.pt; the final stage's are last.pt and best.pt
      wandb/           the offline W&B runs, one per stage

Only rank 0 writes; a resumed run reads `state.json` to know which stages are done.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from featkd import distributed
from featkd.checkpoint import load_checkpoint, save_checkpoint
from featkd.config import Config, dump_yaml, flatten, load_config, with_absolute_paths
from featkd.errors import CheckpointError, ConfigError
from featkd.logging import JsonlLogger, Logger, make_logger


class RunState:
    """`state.json`: each stage's status ("running", "done", "cached"), result and W&B run id."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "state.json"
        self.stages: dict[str, dict[str, Any]] = json.loads(self.path.read_text())["stages"] if self.path.exists() else {}

    def get(self, stage: str) -> dict[str, Any]:
        return self.stages.get(stage, {})

    def update(self, stage: str, **values: Any) -> None:
        self.stages.setdefault(stage, {}).update(values)
        if distributed.rank() == 0:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"stages": self.stages}, indent=2) + "\n")
            os.replace(tmp, self.path)


class RunFolder:
    """The folder of one run: paths, stage state, the metrics log and per-stage loggers.

    A run folder describes itself: state.json names checkpoints relative to the folder, the
    saved config names files by absolute path, and a stage taken from the stage cache is kept
    in the folder too, so a run resumes from any working directory and after the folder moves.
    """

    def __init__(self, path: Path, config: Config) -> None:
        self.path, self.config = Path(path), config
        self.state = RunState(self.path)

    @classmethod
    def create(cls, config: Config, path: Path | str | None = None) -> Path:
        """A new folder for `config` (named after it and the time, unless `path` is given),
        with the resolved config written into it; on rank 0 only."""
        if path is not None and (Path(path) / "state.json").exists():
            # its finished stages would be loaded as if this config had trained them
            raise ConfigError(f"{str(path)!r} already holds a run (state.json); resume it with `featkd train "
                              f"--resume {path}`, or give a new folder.")
        try:
            path = cls._claim_new(config) if path is None else Path(path)
            path.mkdir(parents=True, exist_ok=True)
            (path / "config.yaml").write_text(dump_yaml(with_absolute_paths(config)))
        except OSError as exc:
            raise ConfigError(f"output_dir: cannot create the run folder {str(path)!r} ({exc.strerror or exc}). "
                              "Set output_dir to a folder you can write to.") from None
        return path

    @staticmethod
    def _claim_new(config: Config) -> Path:
        """`<output_dir>/<name>-<time>`, or `-2`, `-3`... after it: made with exist_ok=False so
        that two runs started in the same second never share a folder."""
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        base = Path(config.output_dir) / f"{config.name}-{stamp}"
        base.parent.mkdir(parents=True, exist_ok=True)
        path, n = base, 1
        while True:
            try:
                path.mkdir()
                return path
            except FileExistsError:
                n += 1
                path = base.with_name(f"{base.name}-{n}")

    def relative(self, path: Path) -> str:
        """How state.json names a file: relative to the folder when inside it."""
        path = Path(path)
        try:
            return str(path.resolve().relative_to(self.path.resolve()))
        except ValueError:
            return str(path.resolve())

    def resolve(self, name: str) -> Path:
        """The file state.json names, wherever the folder is now."""
        return self.path / name if not Path(name).is_absolute() else Path(name)

    def save(self, target: Path, payload: dict[str, Any]) -> Path:
        """Write a checkpoint into the folder (rank 0; every process waits for it)."""
        if distributed.rank() == 0:
            save_checkpoint(target, payload)
        distributed.barrier()
        return target

    def resume_point(self, stage: str) -> dict[str, Any] | None:
        """The checkpoint a stage that was running continues from (its later log lines are
        dropped), or None to train it from the start, which is only right if it never
        finished an epoch: a stage that logged epochs but lost its checkpoint is an error."""
        record = self.state.get(stage)
        if record.get("status") != "running":
            return None
        checkpoint = self.resolve(record.get("checkpoint", ""))
        if record.get("checkpoint") and checkpoint.is_file():
            payload = load_checkpoint(checkpoint)
            self.trim_metrics(stage, payload["step"])
            covered = payload.get("logged")
            if covered and distributed.rank() == 0 and not any(row.get("step") == payload["step"]
                                                                for row in self.metrics(stage)):
                JsonlLogger(self.path, stage).log(covered, payload["step"])  # killed between checkpoint and log
            return payload
        if self.metrics(stage):
            raise CheckpointError(
                f"stage {stage!r} of {str(self.path)!r} logged epochs, but its checkpoint {str(checkpoint)!r} is "
                "missing, so it cannot continue where it stopped. Restore the file, or start a new run."
            )
        return None

    @property
    def name(self) -> str:
        return self.path.name

    def checkpoints(self, stage: str, final: bool) -> dict[str, Path]:
        folder = self.path / "checkpoints"
        return {"last": folder / "last.pt", "best": folder / "best.pt"} if final else \
            {"last": folder / f"{stage}-last.pt", "best": folder / f"{stage}-best.pt"}

    def logger(self, stage: str, final: bool = False) -> Logger:
        """The stage's loggers (metrics.jsonl, and W&B as configured), continuing the stage's
        W&B run if it has one."""
        settings = self.config.logger.model_copy(update={"group": self.config.logger.group or self.name})
        resume_id = self.state.get(stage).get("wandb_id")
        logger = make_logger(settings, self.path, stage, f"{self.name}/{stage}", flatten(self.config.to_dict()),
                             resume_id=resume_id, final=final, history=self.metrics(stage) if resume_id else [])
        run_id = getattr(logger, "run_id", None)
        if run_id:
            self.state.update(stage, wandb_id=run_id)
        return logger

    def metrics(self, stage: str) -> list[dict[str, Any]]:
        """The rows of metrics.jsonl that `stage` logged."""
        path = self.path / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        return [row for row in rows if row.get("stage") == stage]

    def trim_metrics(self, stage: str, step: int) -> None:
        """On resume, drop log lines of `stage` past the checkpoint the run continues from."""
        path = self.path / "metrics.jsonl"
        if distributed.rank() != 0 or not path.exists():
            return
        kept = [line for line in path.read_text().splitlines()
                if not (json.loads(line).get("stage") == stage and json.loads(line).get("step", 0) > step)]
        path.write_text("".join(line + "\n" for line in kept))

    def write_summary(self, values: dict[str, Any]) -> None:
        """The run's outcome, under "run" in summary.json (beside the per-stage summaries)."""
        if distributed.rank() != 0:
            return
        path = self.path / "summary.json"
        existing = json.loads(path.read_text()) if path.exists() else {}
        existing["run"] = values
        path.write_text(json.dumps(existing, indent=2) + "\n")


def resume_config(run_dir: str | Path, config: Config | None = None) -> Config:
    """The config of a run folder; a different `config` given alongside is an error."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "state.json").is_file():
        raise ConfigError(f"--resume {str(run_dir)!r}: not a featkd run folder (no config.yaml and state.json).")
    saved = load_config(run_dir / "config.yaml")
    if config is not None:
        ours, theirs = (flatten(with_absolute_paths(c).to_dict()) for c in (saved, config))
        differ = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k) and k != "progress")
        if differ:
            raise ConfigError(
                f"--resume {str(run_dir)!r}: the given config differs from the run's in {', '.join(differ[:8])}"
                + (" ..." if len(differ) > 8 else "") + ". Resume with the run's own config (omit CONFIG).")
    return saved
