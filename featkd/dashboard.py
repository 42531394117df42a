"""What a featkd W&B run shows beyond its metrics: model artifacts and their lineage, the final
stage's per-class table and confusion matrix, and the results table of a comparison or sweep.

Artifacts. Each trained stage logs its checkpoints as versions of a model artifact named after
the run and the stage (`<run>-<stage>`): the best epoch's (alias `best`), then the last
epoch's (aliases `last` and the stage's name). A stage that learns from teachers declares, as
its inputs, the checkpoints its teachers are as it starts: the last checkpoint of the stage
that trained each one, or the file a teacher was loaded from (`checkpoint:`), or the copy of a
stage taken from the stage cache. The digest of a file finds the version its producer logged,
so W&B's lineage graph reads teacher -> assistant -> student, generalist -> specialists ->
student. Files are referenced in the run folder, not copied.

Tables. At the end of the final stage: `per_class` (class, test samples, student and first
teacher top-1), and `confusion_matrix` of the student on the test set, both from the test
predictions `featkd.summary` saved. A token-level language-model task has no classes and gets
neither. `featkd compare` and `featkd sweep` log their table and a bar chart of mean last-epoch
top-1 in one W&B run of the comparison's group (job type "comparison" or "sweep").

Logging these never stops a run that trained: a W&B failure here is a printed note.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from featkd.engine import StageResult
from featkd.logging import Logger, WandbLogger, checked_settings, note, wandb_logger
from featkd.run_folder import RunFolder
from featkd.stages import Plan, StagePlan
from featkd.summary import PREDICTIONS

if TYPE_CHECKING:
    from featkd.compare import ComparisonResult
    from featkd.config import LoggerConfig
    from featkd.sweep import SweepResult

#: W&B's longest artifact name
NAME_LIMIT = 128
#: the most classes drawn in a confusion matrix: it is a table of classes^2 rows, and W&B
#: keeps 10,000 rows of a table
CONFUSION_CLASSES = 100


def artifact_name(*parts: str) -> str:
    """A valid W&B artifact name from `parts` joined by "-": letters, digits, "_" and "." kept,
    any other run of characters one "-"; a name too long keeps its start and a digest of the
    whole."""
    name = re.sub(r"[^A-Za-z0-9_.]+", "-", "-".join(parts)).strip("-.") or "model"
    if len(name) > NAME_LIMIT:
        name = f"{name[:NAME_LIMIT - 9]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return name


@contextlib.contextmanager
def best_effort(what: str) -> Iterator[None]:
    """Run a W&B extra; a failure is a note, never the end of a run that trained."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001  (wandb raises many kinds; none may lose a trained stage)
        note(f"W&B: could not log {what} ({type(exc).__name__}: {exc}).")


class Lineage:
    """The model artifacts of a run's stages, and which of them each stage learns from."""

    def __init__(self, folder: RunFolder, plan: Plan) -> None:
        self.folder, self.plan = folder, plan
        group = folder.config.logger.group
        # runs of a comparison share folder names ("kd-seed0"): their group tells them apart
        self.prefix = folder.name if not group or group == folder.name else f"{group}-{folder.name}"

    def name(self, key: str) -> str:
        """The artifact of a stage (or of a model no stage trains), by its name."""
        return artifact_name(self.prefix, key)

    def source(self, model: str, before: int) -> tuple[str, Path, dict[str, Any] | None] | None:
        """(artifact name, checkpoint file, metadata for a file no W&B run logs) of model
        `model` as stage `before` finds it: the last earlier stage that made it, else the
        checkpoint the config loads it from; None for a model with no file (pretrained)."""
        for stage in reversed(self.plan.stages[:before]):
            if stage.model != model:
                continue
            record = self.folder.state.get(stage.name)
            path = self.folder.resolve(record["checkpoint"]) if record.get("checkpoint") else \
                self.folder.checkpoints(stage.name, stage.final)["last"]
            cached = {"stage": stage.name, "source": "stage cache"} if record.get("status") == "cached" else None
            return (self.name(stage.name), path, cached) if path.is_file() else None
        spec = self.plan.models.get(model)
        if spec is not None and spec.checkpoint and Path(spec.checkpoint).is_file():
            return self.name(model), Path(spec.checkpoint), {"model": spec.model, "source": "checkpoint",
                                                              "file": str(Path(spec.checkpoint).resolve())}
        return None

    def use_teachers(self, logger: Logger, stage: StagePlan) -> None:
        """Declare the checkpoints of the models `stage` learns from (its teachers, a
        specialists stage's generalist) inputs of its W&B run."""
        run = wandb_logger(logger)
        if run is None:
            return
        index = self.plan.stages.index(stage)
        models = [stage.specialists.generalist] if stage.specialists is not None else stage.teachers
        with best_effort(f"the teachers of stage {stage.name!r} as its inputs"):
            for model in dict.fromkeys(models):
                found = self.source(model, index)
                if found is not None:
                    run.use_model(*found)

    def log_stage(self, logger: Logger, stage: StagePlan, result: StageResult) -> None:
        """The stage's best and last checkpoints as versions of its model artifact (the last
        logged last: it is what later stages learn from, and W&B's `latest`)."""
        run = wandb_logger(logger)
        if run is None:
            return
        spec = self.plan.models.get(stage.model)
        about = {"stage": stage.name, "run": self.folder.name, "model": spec.model if spec else stage.model,
                 "model_args": spec.args if spec else {}, "epochs": result.epochs}
        files = self.folder.checkpoints(stage.name, stage.final)
        versions = [("best", ["best"], result.best_acc, result.best_epoch),
                    ("last", ["last", stage.name], result.last_acc, result.epochs)]
        with best_effort(f"the checkpoints of stage {stage.name!r} as model artifacts"):
            for kind, aliases, top1, epoch in versions:
                if files[kind].is_file():
                    run.log_model(self.name(stage.name), files[kind], aliases,
                                  {**about, "checkpoint": kind, "top1": top1, "epoch": epoch})

    def log_ensemble(self, logger: Logger, stage: StagePlan, path: Path, result: StageResult,
                     clusters: list[list[int]]) -> None:
        """A specialists stage's ensemble (generalist + specialists) as its model artifact."""
        run = wandb_logger(logger)
        if run is None:
            return
        with best_effort(f"the ensemble of stage {stage.name!r} as a model artifact"):
            run.log_model(self.name(stage.name), path, ["last", stage.name],
                          {"stage": stage.name, "run": self.folder.name, "model": "specialists", "checkpoint": "last",
                           "top1": result.last_acc, "clusters": clusters})


# -- the final stage's tables --------------------------------------------------------------


def log_final_tables(logger: Logger, run_dir: Path, class_names: list[str]) -> None:
    """The per-class table and the confusion matrix of the final student on the test set, from
    its saved predictions; nothing for a token-level task (no classes)."""
    run = wandb_logger(logger)
    path = Path(run_dir) / PREDICTIONS
    if run is None or not class_names or not path.is_file():
        return
    saved = torch.load(path)
    if "predictions" not in saved:  # a language model's tokens: no per-class view
        return
    import wandb

    with best_effort("the per-class table and the confusion matrix"):
        predictions, targets = saved["predictions"].long(), saved["targets"].long()
        values: dict[str, Any] = {"per_class": per_class_table(predictions, targets, saved.get("teacher_predictions"),
                                                               class_names)}
        if len(class_names) <= CONFUSION_CLASSES:
            values["confusion_matrix"] = wandb.plot.confusion_matrix(
                y_true=targets.tolist(), preds=predictions.tolist(), class_names=list(class_names),
                title="Student on the test set")
        run.log_rich(values)


def per_class_accuracy(predictions: torch.Tensor, targets: torch.Tensor, classes: int) -> torch.Tensor:
    """Top-1 (%) on each class's test samples (NaN for a class with none)."""
    samples = torch.bincount(targets, minlength=classes).double()
    right = torch.bincount(targets[predictions == targets], minlength=classes).double()
    return 100.0 * right / samples


def per_class_table(predictions: torch.Tensor, targets: torch.Tensor, teacher_predictions: torch.Tensor | None,
                    class_names: list[str]) -> Any:
    """A `wandb.Table`: class, test samples, student top-1, teacher top-1 (None without a teacher)."""
    import wandb

    classes = len(class_names)
    samples = torch.bincount(targets, minlength=classes)
    student = per_class_accuracy(predictions, targets, classes)
    teacher = per_class_accuracy(teacher_predictions.long(), targets, classes) if teacher_predictions is not None \
        else None
    rows = [[name, int(samples[c]), _number(student[c]), _number(teacher[c]) if teacher is not None else None]
            for c, name in enumerate(class_names)]
    return wandb.Table(columns=["class", "samples", "student top-1", "teacher top-1"], data=rows)


def _number(value: torch.Tensor) -> float | None:
    value = float(value)
    return None if value != value else round(value, 4)  # NaN: a class without test samples


# -- comparisons and sweeps ----------------------------------------------------------------


def log_comparison(result: ComparisonResult, settings: LoggerConfig) -> None:
    """A comparison's results as one W&B run of its group: the table of methods, a bar chart of
    their mean last-epoch top-1, and every run (when its logger is W&B)."""
    rows = []
    for s in result.summaries:
        interval = s.interval
        rows.append([s.variant, s.seeds, s.last_mean, s.last_std, s.best_mean, s.best_std, s.delta_last,
                     interval.low if interval else None, interval.high if interval else None])
    columns = ["method", "seeds", "top-1 last (mean)", "top-1 last (std)", "top-1 best (mean)", "top-1 best (std)",
               f"Δ last vs {result.baseline or 'baseline'}", "Δ 95% low", "Δ 95% high"]
    about = {"comparison": result.name, "baseline": result.baseline, "methods": [s.variant for s in result.summaries],
             "seeds": sorted({r.seed for r in result.rows})}
    _log_results(result.folder, "comparison", about, settings, columns, rows, result.rows,
                 f"{result.name}: top-1 after the last epoch (mean over seeds)")


def log_sweep(result: SweepResult, settings: LoggerConfig) -> None:
    """A sweep's results as one W&B run of its group: one row per setting, a bar chart of mean
    last-epoch top-1 by setting, and every run (when its logger is W&B)."""
    from featkd.compare import setting_label

    columns = ["setting", *result.keys, "seeds", "top-1 last (mean)", "top-1 last (std)", "top-1 best (mean)",
               "top-1 best (std)"]
    rows = [[setting_label(r.setting), *(r.setting.get(k) for k in result.keys), r.seeds, r.last_mean, r.last_std,
             r.best_mean, r.best_std] for r in result.rows]
    about = {"sweep": result.name, "grid": result.keys, "seeds": sorted({r.seed for r in result.runs})}
    _log_results(result.folder, "sweep", about, settings, columns, rows, result.runs,
                 f"{result.name}: top-1 after the last epoch (mean over seeds)")


def _log_results(folder: Path, job_type: str, about: dict[str, Any], settings: LoggerConfig, columns: list[str],
                 rows: list[list[Any]], runs: list[Any], title: str) -> None:
    """One W&B run (`job_type`) in `folder`, grouped with the runs it summarises."""
    if settings.name != "wandb" or settings.mode == "disabled" or os.environ.get("WANDB_SWEEP_ID"):
        return  # no W&B, or a sweep agent's trial, which must stay one run
    import wandb

    with best_effort(f"the {job_type} results"):
        settings = checked_settings(settings)
        run = WandbLogger(folder, f"{folder.name}/{job_type}", about, project=settings.project,
                          entity=settings.entity, group=settings.group or folder.name, job_type=job_type,
                          tags=list(settings.tags), mode=settings.mode, fallback=settings.fallback)
        try:
            table = wandb.Table(columns=columns, data=rows)
            label = columns[0]
            run_rows = [[r.variant, r.seed, r.last_acc, r.best_acc, r.best_epoch, r.seconds, r.run_dir] for r in runs]
            run.log_rich({
                "results": table,
                "top1_last": wandb.plot.bar(table, label, "top-1 last (mean)", title=title),
                "runs": wandb.Table(columns=[label, "seed", "top-1 last", "top-1 best", "best epoch", "seconds",
                                             "run folder"], data=run_rows),
            }, step=0)
        finally:
            run.finish()
