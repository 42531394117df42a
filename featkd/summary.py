"""A finished run's outcome: accuracies of the final stage's student and teachers, how often
they agree, their sizes and multiply-adds (what `train()` returns, `summary.json` holds and
the final stage's W&B summary shows)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from featkd import distributed
from featkd.engine import StageResult
from featkd.evaluation import evaluate, multiply_adds
from featkd.models import count_parameters


#: the final student's predicted class for every test sample, with the labels
PREDICTIONS = "predictions.pt"


@dataclass
class RunResult:
    """What `train()` returns (also written to `summary.json`)."""

    run_dir: Path
    student: StageResult  # the final stage
    stages: dict[str, StageResult] = field(default_factory=dict)
    teacher_acc: list[float] = field(default_factory=list)
    agreement: float | None = None
    student_params: int = 0
    teacher_params: list[int] = field(default_factory=list)
    student_macs: int | None = None
    teacher_macs: list[int | None] = field(default_factory=list)
    teacher_models: list[str] = field(default_factory=list)

    def values(self) -> dict[str, Any]:
        """Plain values of the outcome (summary.json and the final stage's W&B summary)."""
        values = {k: v for k, v in asdict(self).items() if k not in ("run_dir", "student", "stages")}
        values.update({"best_acc": self.student.best_acc, "best_epoch": self.student.best_epoch,
                       "last_acc": self.student.last_acc})
        return values


def measure(run_dir: Path, results: dict[str, StageResult], final: str, student: nn.Module,
            teachers: list[tuple[str, nn.Module]], test_loader: DataLoader, example: Any,
            device: torch.device, precision: str = "fp32", channels_last: bool = False) -> RunResult:
    """The outcome of a run whose final stage `final` trained `student` from `teachers`
    ((model name, model) pairs): top-1 of each on the test set, agreement with the first teacher,
    parameters and multiply-adds. The student's test predictions go to `predictions.pt`
    (for paired comparisons of runs on the same test set)."""
    models = [model for _, model in teachers]
    first = models[0] if models else None
    tested = evaluate(student, test_loader, device, precision, reference=first, channels_last=channels_last,
                      keep_predictions=True)
    if distributed.rank() == 0:
        torch.save({k: tested[k] for k in ("predictions", "targets", "correct") if k in tested}, run_dir / PREDICTIONS)
    teacher_acc = [evaluate(t, test_loader, device, precision, channels_last=channels_last)["acc"] for t in models]
    return RunResult(
        run_dir, results[final], dict(results), teacher_acc, tested["agreement"] if first is not None else None,
        count_parameters(student), [count_parameters(t) for t in models],
        multiply_adds(student, example, device), [multiply_adds(t, example, device) for t in models],
        [name for name, _ in teachers])


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

    def macs(n: int | None) -> str:
        return f"  {n / 1e6:,.2f}M multiply-adds" if n is not None else ""

    lines = [
        f"run folder   {result.run_dir}",
        f"student      top-1 last {s.last_acc:.2f}%  best {s.best_acc:.2f}% (epoch {s.best_epoch}/{s.epochs})"
        f"  {result.student_params:,} parameters{macs(result.student_macs)}  {s.seconds:.1f}s",
    ]
    for i, (acc, params, m) in enumerate(zip(result.teacher_acc, result.teacher_params, result.teacher_macs)):
        lines.append(f"teacher{i if len(result.teacher_acc) > 1 else ''}      top-1 {acc:.2f}%  {params:,} parameters{macs(m)}")
    if result.agreement is not None:
        lines.append(f"agreement    student and teacher predict the same class on {result.agreement:.2f}% of test samples")
    if s.skipped_steps:
        lines.append(f"skipped      {s.skipped_steps} steps with a non-finite loss")
    return lines
