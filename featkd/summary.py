"""A finished run's outcome: accuracies of the final stage's student and teachers, how often
they agree, and what each costs to deploy: parameters, multiply-adds, weights size and CPU
latency (what `train()` returns, `summary.json` holds and the final stage's W&B summary shows)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from featkd import distributed
from featkd.config import MeasureConfig
from featkd.deploy.footprint import Footprint, first_inputs, measure_models, ratios
from featkd.engine import StageResult
from featkd.evaluation import evaluate
from featkd.heads import HeadedStudent


#: the final student's predicted class for every test sample, with the labels (and the first
#: teacher's class, as `teacher_predictions`)
PREDICTIONS = "predictions.pt"


@dataclass
class RunResult:
    """What `train()` returns (also written to `summary.json`)."""

    run_dir: Path
    student: StageResult  # the final stage
    stages: dict[str, StageResult] = field(default_factory=dict)
    teacher_acc: list[float] = field(default_factory=list)
    agreement: float | None = None
    teacher_models: list[str] = field(default_factory=list)
    student_footprint: Footprint = field(default_factory=Footprint)
    teacher_footprints: list[Footprint] = field(default_factory=list)
    #: how the student answers when its method replaced its classifier (SimKD), else None
    student_head: str | None = None

    @property
    def student_params(self) -> int:
        return self.student_footprint.parameters or 0

    @property
    def student_macs(self) -> int | None:
        return self.student_footprint.multiply_adds

    def ratios(self) -> dict[str, float]:
        """Student / first teacher, for each size and latency number."""
        return ratios(self.student_footprint, self.teacher_footprints[0]) if self.teacher_footprints else {}

    def values(self) -> dict[str, Any]:
        """Plain flat values of the outcome (summary.json and the final stage's W&B summary):
        accuracies, then `student/<number>`, `teacher/<number>` (`teacher<i>/` with several)
        and `student_vs_teacher/<number>` for parameters, multiply_adds, file_mb and
        latency_b<B>_median_ms / _p90_ms."""
        values: dict[str, Any] = {"best_acc": self.student.best_acc, "best_epoch": self.student.best_epoch,
                                  "last_acc": self.student.last_acc, "teacher_acc": self.teacher_acc,
                                  "agreement": self.agreement, "teacher_models": self.teacher_models}
        values.update({f"student/{k}": v for k, v in self.student_footprint.values().items()})
        for i, fp in enumerate(self.teacher_footprints):
            prefix = "teacher" if len(self.teacher_footprints) == 1 else f"teacher{i}"
            values.update({f"{prefix}/{k}": v for k, v in fp.values().items()})
        values.update({f"student_vs_teacher/{k}": v for k, v in self.ratios().items()})
        notes = [n for fp in (self.student_footprint, *self.teacher_footprints) for n in fp.notes]
        if notes:
            values["measure_notes"] = sorted(set(notes))
        if self.student_head:
            values["student_head"] = self.student_head
        return values


def measure(run_dir: Path, results: dict[str, StageResult], final: str, student: nn.Module,
            teachers: list[tuple[str, nn.Module]], test_loader: DataLoader, example: Any,
            device: torch.device, precision: str = "fp32", channels_last: bool = False,
            settings: MeasureConfig | None = None) -> RunResult:
    """The outcome of a run whose final stage `final` trained `student` from `teachers`
    ((model name, model) pairs): top-1 of each on the test set, agreement with the first
    teacher, and each one's footprint (latency on the first test inputs, on the CPU). The
    student's test predictions go to `predictions.pt` (for paired comparisons of runs on the
    same test set), with the first teacher's (for per-class comparisons)."""
    settings = settings or MeasureConfig()
    models = [model for _, model in teachers]
    first = models[0] if models else None
    tested = evaluate(student, test_loader, device, precision, reference=first, channels_last=channels_last,
                      keep_predictions=True)
    # the first teacher's classes too, for per-class comparisons (the W&B per-class table)
    teachers_tested = [evaluate(t, test_loader, device, precision, channels_last=channels_last, keep_predictions=i == 0)
                       for i, t in enumerate(models)]
    if distributed.rank() == 0:
        saved = {k: tested[k] for k in ("predictions", "targets", "correct") if k in tested}
        if teachers_tested and "predictions" in teachers_tested[0]:
            saved["teacher_predictions"] = teachers_tested[0]["predictions"]
        torch.save(saved, run_dir / PREDICTIONS)
    teacher_acc = [t["acc"] for t in teachers_tested]
    inputs = {b: first_inputs(test_loader.dataset, b) for b in settings.batch_sizes} if settings.latency else {}
    named = {"student": student, **{f"teacher{i}": t for i, t in enumerate(models)}}
    footprints = measure_models(named, inputs, example, settings.repeats, settings.warmup, settings.threads,
                                latency=settings.latency and distributed.rank() == 0)
    return RunResult(run_dir, results[final], dict(results), teacher_acc,
                     tested["agreement"] if first is not None else None, [name for name, _ in teachers],
                     footprints["student"], [footprints[f"teacher{i}"] for i in range(len(models))],
                     student.describe() if isinstance(student, HeadedStudent) else None)


def test_correct(run_dir: str | Path) -> torch.Tensor:
    """Which test samples the run's final student classifies correctly (from `predictions.pt`);
    for a token-level task, each sample's share of labelled tokens predicted right."""
    saved = torch.load(Path(run_dir) / PREDICTIONS)
    if "correct" in saved:
        return saved["correct"]
    return saved["predictions"] == saved["targets"]


def summary_lines(result: RunResult) -> list[str]:
    """A short human summary of a finished run."""
    s = result.student
    lines = [
        f"run folder   {result.run_dir}",
        f"student      top-1 last {s.last_acc:.2f}%  best {s.best_acc:.2f}% (epoch {s.best_epoch}/{s.epochs})"
        f"  {_costs(result.student_footprint)}  {s.seconds:.1f}s",
    ]
    many = len(result.teacher_acc) > 1
    for i, (acc, fp) in enumerate(zip(result.teacher_acc, result.teacher_footprints)):
        lines.append(f"{'teacher' + (str(i) if many else ''):<12} top-1 {acc:.2f}%  {_costs(fp)}")
    if result.student_head:
        lines.append(f"head         the student {result.student_head}; its top-1 and footprint include the head")
    if result.agreement is not None:
        lines.append(f"agreement    student and teacher predict the same class on {result.agreement:.2f}% of test samples")
    if (ratio := result.ratios()):
        said = [f"{ratio[key]:.2g}x {label}" for key, label in (("parameters", "parameters"),
                                                                ("multiply_adds", "multiply-adds"))
                if key in ratio]
        said += [f"{ratio[key]:.2g}x latency at batch {lat.batch}" for lat in result.student_footprint.latency
                 if (key := f"latency_b{lat.batch}_median_ms") in ratio]
        lines.append(f"vs teacher   student / teacher: {', '.join(said)}")
    if result.student_footprint.latency:
        lat = result.student_footprint.latency[0]
        lines.append(f"latency      CPU, {lat.threads} thread{'s' if lat.threads > 1 else ''}, median (90th percentile) "
                     f"of {lat.repeats} calls on the first test inputs")
    for note in sorted({n for fp in (result.student_footprint, *result.teacher_footprints) for n in fp.notes}):
        lines.append(f"note         {note}")
    if s.skipped_steps:
        lines.append(f"skipped      {s.skipped_steps} steps with a non-finite loss")
    return lines


def _costs(fp: Footprint) -> str:
    parts = [f"{fp.parameters:,} parameters"] if fp.parameters is not None else []
    if fp.multiply_adds is not None:
        parts.append(f"{fp.multiply_adds / 1e6:,.2f}M multiply-adds")
    if fp.file_bytes is not None:
        parts.append(f"{fp.file_bytes / 2**20:.2f} MB")
    if fp.weight_sparsity:
        parts.append(f"{100 * fp.weight_sparsity:.1f}% of weights zero")
    parts += [f"b{lat.batch} {lat.median_ms:.2f} ({lat.p90_ms:.2f}) ms" for lat in fp.latency]
    return "  ".join(parts)
