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
from featkd.config import Config, dump_yaml, flatten, load_config
from featkd.errors import ConfigError
from featkd.logging import Logger, make_logger


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
    """The folder of one run: paths, stage state, the metrics log and per-stage loggers."""

    def __init__(self, path: Path, config: Config) -> None:
        self.path, self.config = Path(path), config
        self.state = RunState(self.path)

    @classmethod
    def create(cls, config: Config, path: Path | str | None = None) -> Path:
        """A new folder for `config` (named after it and the time, unless `path` is given),
        with the resolved config written into it; on rank 0 only."""
        if path is None:
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            base = Path(config.output_dir) / f"{config.name}-{stamp}"
            path, n = base, 1
            while path.exists():
                n += 1
                path = base.with_name(f"{base.name}-{n}")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.yaml").write_text(dump_yaml(config))
        return path

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
        logger = make_logger(settings, self.path, stage, f"{self.name}/{stage}", flatten(self.config.to_dict()),
                             resume_id=self.state.get(stage).get("wandb_id"), final=final)
        run_id = getattr(logger, "run_id", None)
        if run_id:
            self.state.update(stage, wandb_id=run_id)
        return logger

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
        ours, theirs = flatten(saved.to_dict()), flatten(config.to_dict())
        differ = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k) and k != "progress")
        if differ:
            raise ConfigError(
                f"--resume {str(run_dir)!r}: the given config differs from the run's in {', '.join(differ[:8])}"
                + (" ..." if len(differ) > 8 else "") + ". Resume with the run's own config (omit CONFIG).")
    return saved
