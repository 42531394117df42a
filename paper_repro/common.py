"""What the claims share: running a comparison, judging a claim, writing its results.

A claim is judged on last-epoch test top-1 by the difference between two arms, with a 95%
percentile-bootstrap interval over seeds (paired by seed where the arms ran the same seeds)
and test samples (`featkd.stats`): **held** when the interval excludes zero in the claimed
direction, **not held** when it excludes the claimed effect (no gain, or the opposite),
**inconclusive** otherwise.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from featkd.compare import ComparisonResult, RunRow, difference, run_comparison
from featkd.config import Config, load_config, smoke_config
from featkd.stats import Interval, bootstrap_difference, verdict
from featkd.summary import test_correct

ROOT = Path(__file__).resolve().parent
RESULTS_START, RESULTS_END = "<!-- results -->", "<!-- /results -->"

#: Set by `run.py --smoke`: every run on tiny synthetic data for one epoch and one seed, to
#: check the claims' code end to end in seconds; results stay under OUTPUT_ROOT, READMEs untouched.
SMOKE = False
OUTPUT_ROOT = ROOT.parent / "runs" / "paper_repro"


def output_dir(claim: str) -> str:
    return str(Path(OUTPUT_ROOT) / claim)


def seeds(default: Sequence[int] = (0, 1, 2, 3, 4)) -> list[int]:
    return list(default)[:1] if SMOKE else list(default)


def config(path: Path, overrides: Sequence[str] = ()) -> Config:
    """A claim's config with its overrides (made tiny in smoke mode)."""
    loaded = load_config(path, overrides)
    return smoke_config(loaded) if SMOKE else loaded


def compare(folder: Path, file: str = "compare.yaml", overrides: Sequence[str] = ()) -> ComparisonResult:
    """Run a claim's comparison file, its runs under runs/paper_repro/<claim>/."""
    return run_comparison(folder / file, [f"output_dir={output_dir(folder.name)}", "logger=none", *overrides],
                          smoke=SMOKE)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def rows_of(result: ComparisonResult | Sequence[RunRow], variant: str) -> list[RunRow]:
    rows = result.rows if isinstance(result, ComparisonResult) else result
    return [r for r in rows if r.variant == variant]


def judge(result: ComparisonResult | Sequence[RunRow], a: str, b: str, claim: str = "better",
          margin: float = 0.0) -> tuple[str, Interval]:
    """The verdict on "`a` beats `b`" (or "is no better by `margin` points") and its interval."""
    interval = difference(rows_of(result, a), rows_of(result, b))
    return verdict(interval, claim, margin), interval


def correct_of(rows: Sequence[RunRow]) -> np.ndarray:
    """(seeds, test samples): 1 where each run's final student classified the sample right,
    rows in seed order (for `judge_correct`)."""
    return np.stack([test_correct(r.run_dir).float().numpy() for r in sorted(rows, key=lambda r: r.seed)])


def judge_correct(a: np.ndarray, b: np.ndarray, claim: str = "better", margin: float = 0.0) -> tuple[str, Interval]:
    """`judge` for arms given as (seeds, test samples) correctness arrays over the same seeds,
    such as exported models evaluated outside a run."""
    interval = bootstrap_difference(a, b, paired=True)
    return verdict(interval, claim, margin), interval


def said(outcome: tuple[str, Interval]) -> str:
    """A verdict with its interval, as the results tables write it."""
    label, interval = outcome
    return f"**{label}** (Δ {interval} points)"


def last_accuracies(result: ComparisonResult | Sequence[RunRow], variant: str) -> list[float]:
    return [r.last_acc for r in rows_of(result, variant)]


def fmt(values: Sequence[float]) -> str:
    m, s = mean_std(values)
    return f"{m:.2f} ± {s:.2f}"


def forward_ms(models: dict[str, Any], inputs: dict[str, Any], repeats: int = 20) -> dict[str, float]:
    """Median CPU milliseconds of each model's forward on `inputs` (keyword tensors), in eval
    mode, the models taking turns call by call (`featkd.deploy.footprint.time_calls`)."""
    from featkd.capture import call_model
    from featkd.deploy.footprint import time_calls

    timed = time_calls({name: {1: (lambda m=model.eval(): call_model(m, inputs))} for name, model in models.items()},
                       3 if SMOKE else repeats, warmup=2)
    return {name: latencies[0].median_ms for name, latencies in timed.items()}


def write(folder: Path, markdown: str, summary: dict[str, Any]) -> None:
    """Keep a claim's results: results.md, claim.json, and the results section of its README."""
    if SMOKE:
        folder = Path(output_dir(folder.name))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "results.md").write_text(markdown.strip() + "\n")
        (folder / "claim.json").write_text(json.dumps(summary, indent=2) + "\n")
        return
    (folder / "results.md").write_text(markdown.strip() + "\n")
    (folder / "claim.json").write_text(json.dumps(summary, indent=2) + "\n")
    readme = folder / "README.md"
    text = readme.read_text()
    if RESULTS_START in text and RESULTS_END in text:
        head, rest = text.split(RESULTS_START, 1)
        _, tail = rest.split(RESULTS_END, 1)
        readme.write_text(f"{head}{RESULTS_START}\n{markdown.strip()}\n{RESULTS_END}{tail}")
