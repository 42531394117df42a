"""`featkd report`: one self-contained HTML page of a run, a comparison or a sweep.

    featkd report runs/quickstart-20261122-044217            -> runs/quickstart-20261122-044217/report.html
    featkd report runs/quickstart-compare-20261122-050112 --out /tmp/page

The page embeds its plots as base64 PNGs and loads nothing else (no scripts, fonts or
network), so it opens offline and travels as one file; the same PNGs are written beside it
under `report/`. What the folder is comes from the files in it:

    run folder         config.yaml and state.json            (featkd train)
    comparison folder  results.json                          (featkd compare)
    sweep folder       results.csv and runs.csv              (featkd sweep)
    either, unfinished run folders of variants and seeds, no results file yet

`featkd compare` and `featkd sweep` write the page themselves after their results files
(`report_or_warn`). Something that has not finished (a stage still "running" in state.json,
no outcome in summary.json, a comparison without its results file) gets a page of what
exists, marked partial at the top. Plots are drawn by two helpers only: curves per epoch
with a band (`draw_curves`) and a ranked plot with error bars (`draw_ranked`).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from featkd.compare import mean_std, best_epoch_label, setting_label, slug
from featkd.errors import ReportError
from featkd.run_folder import RunState
from featkd.stats import Interval

#: the page, and the folder of its PNGs, written into the reported folder (or --out)
PAGE = "report.html"
PLOTS = "report"

WHAT_A_REPORT_IS_MADE_FROM = (
    "A report is made from a run folder (config.yaml and state.json, written by `featkd train`), a comparison "
    "folder (results.json and one run folder per variant and seed, written by `featkd compare`) or a sweep folder "
    "(results.csv and runs.csv, written by `featkd sweep`).")
BAND = "line: mean over seeds; band: min–max over seeds"
#: curves up to this many keep their legend inside the axes; more get it beside them
LEGEND_INSIDE = 8


# ---------------------------------------------------------------- reading folders


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON file, or {} when it is missing or half-written (a live run rewrites summary.json)."""
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl; a line that a live run is still writing is skipped rather than an error."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def is_run_folder(path: Path) -> bool:
    """What `--resume` accepts too: a folder with config.yaml and state.json."""
    return (path / "config.yaml").is_file() and (path / "state.json").is_file()


@dataclass
class RunRecord:
    """What a run folder holds, read as plain data: the config is not validated, so a run made
    by an older featkd, or with plug-ins not installed here, still gets its report."""

    path: Path
    config_text: str
    config: dict[str, Any]
    stages: dict[str, dict[str, Any]]  # state.json, in the order the stages ran
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]

    @classmethod
    def read(cls, path: Path) -> RunRecord:
        text = (path / "config.yaml").read_text() if (path / "config.yaml").is_file() else ""
        try:
            config = yaml.safe_load(text) or {}
        except yaml.YAMLError:
            config = {}
        return cls(path, text, config if isinstance(config, dict) else {}, RunState(path).stages,
                   _read_metrics(path / "metrics.jsonl"), _read_json(path / "summary.json"))

    @property
    def outcome(self) -> dict[str, Any] | None:
        """The run's outcome (summary.json's "run"), written when the last stage is done."""
        return self.summary.get("run")

    @property
    def running(self) -> list[str]:
        return [name for name, record in self.stages.items() if record.get("status") == "running"]

    @property
    def finished(self) -> bool:
        return self.outcome is not None and not self.running

    @property
    def stage_names(self) -> list[str]:
        """Every stage, in the order it ran (state.json first, then any only in the metrics)."""
        names = list(self.stages)
        return names + [s for s in dict.fromkeys(r.get("stage") for r in self.metrics) if s and s not in names]

    @property
    def final_stage(self) -> str | None:
        names = self.stage_names
        return names[-1] if names else None

    def rows(self, stage: str | None) -> list[dict[str, Any]]:
        return [row for row in self.metrics if row.get("stage") == stage]

    def result(self, stage: str) -> dict[str, Any]:
        """A finished stage's result in state.json ({} while it runs: a resumed stage keeps its old one)."""
        state = self.stages.get(stage, {})
        return {} if state.get("status") == "running" else state.get("result") or {}

    @property
    def validated(self) -> bool:
        """Whether the run held out a validation split (then its best epoch was chosen on it)."""
        return any("val/acc" in row for row in self.metrics) or any(
            (record.get("result") or {}).get("val_acc") is not None for record in self.stages.values())

    def tag(self, key: str) -> str | None:
        """A `key:value` tag that a comparison or sweep gave the run (variant, seed)."""
        tags = (self.config.get("logger") or {}).get("tags") if isinstance(self.config.get("logger"), dict) else None
        return next((t.partition(":")[2] for t in tags or [] if isinstance(t, str) and t.startswith(key + ":")), None)

    def unfinished_reason(self) -> str:
        """Why the run has no outcome, in words (featkd keeps no error message in the folder)."""
        stage = self.running[0] if self.running else self.final_stage
        epochs = len(self.rows(stage))
        where = f"stage {stage!r} is still 'running' in state.json" if self.running else "summary.json has no outcome"
        return (f"did not finish: {where} ({epochs} epoch{'s' if epochs != 1 else ''} logged). It is still training, "
                "or it stopped on an error or an interruption; the error is in the output of the command that ran it.")


@dataclass
class GridRun:
    """One run of a comparison or a sweep: its variant (a sweep's setting) and seed, its top-1
    numbers when it finished, its folder's record, or why it has no result."""

    variant: str
    seed: int
    last_acc: float | None
    best_acc: float | None
    best_epoch: int | None
    seconds: float | None
    record: RunRecord | None
    error: str | None = None
    selection: bool = False  # a run of a comparison's `select:` grid


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _local_run(folder: Path, run_dir: str) -> RunRecord | None:
    """The run folder a results file names, looked up inside `folder` first: the results keep
    absolute paths, but the comparison may have been moved since."""
    if not run_dir:
        return None
    for candidate in (folder / Path(run_dir).name, folder / "select" / Path(run_dir).name, Path(run_dir)):
        if is_run_folder(candidate):
            return RunRecord.read(candidate)
    return None


def _grid_run(folder: Path, row: dict[str, Any], selection: bool = False) -> GridRun:
    """A row of results.json or runs.csv (the same fields: `compare.RunRow`)."""
    diverged = str(row.get("diverged")).lower() == "true"
    error = row.get("error") or ("diverged: a loss term became NaN or infinite" if diverged else None)
    return GridRun(str(row["variant"]), int(row["seed"]), _number(row.get("last_acc")), _number(row.get("best_acc")),
                   int(float(row["best_epoch"])) if _number(row.get("best_epoch")) is not None else None,
                   _number(row.get("seconds")), _local_run(folder, str(row.get("run_dir", ""))), error or None,
                   selection)


def _child_runs(folder: Path) -> list[RunRecord]:
    """The run folders directly inside `folder`, in the order they were started."""
    children = [p for p in folder.iterdir() if p.is_dir() and is_run_folder(p)] if folder.is_dir() else []
    return [RunRecord.read(p) for p in sorted(children, key=lambda p: ((p / "config.yaml").stat().st_mtime, p.name))]


def _runs_of_children(folder: Path) -> list[GridRun]:
    """A comparison or sweep without its results file yet, from the run folders it has made."""
    runs = []
    for record in _child_runs(folder):
        outcome = record.outcome or {}
        seed = record.tag("seed") or record.config.get("seed", 0)
        final = (outcome.get("stages") or {}).get(record.final_stage or "", {})
        runs.append(GridRun(record.tag("variant") or record.path.name, int(seed), _number(outcome.get("last_acc")),
                            _number(outcome.get("best_acc")), outcome.get("best_epoch"), _number(final.get("seconds")),
                            record, None if record.finished else record.unfinished_reason()))
    return runs


# ---------------------------------------------------------------- plotting


@dataclass
class Curve:
    """A line over epochs, with an optional band (low..high) around it."""

    label: str
    epochs: list[float]
    values: list[float]
    low: list[float] | None = None
    high: list[float] | None = None
    color: str | None = None
    width: float = 1.6


@dataclass
class Ranked:
    """One row of a ranked plot: a mean and its error bar."""

    label: str
    value: float
    error: float = 0.0
    color: str | None = None


def _new_figure(width: float, height: float) -> Any:
    """A figure on the Agg canvas, made without pyplot: no global state, no display needed,
    and the backend of a user's own pyplot session is left alone."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def draw_curves(ax: Any, curves: Sequence[Curve], title: str, ylabel: str) -> None:
    """Lines per epoch with their bands; a log axis when positive values span 100x or more
    (weighted loss terms differ by orders of magnitude)."""
    from matplotlib.ticker import MaxNLocator

    for curve in curves:
        (line,) = ax.plot(curve.epochs, curve.values, label=curve.label, color=curve.color, lw=curve.width,
                          marker="o" if len(curve.epochs) <= 12 else None, markersize=3)
        if curve.low is not None and curve.high is not None:
            ax.fill_between(curve.epochs, curve.low, curve.high, color=line.get_color(), alpha=0.2, lw=0)
    values = [v for c in curves for v in [*c.values, *(c.low or []), *(c.high or [])] if math.isfinite(v)]
    if values and min(values) > 0 and max(values) / min(values) >= 100:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    epochs = sorted({e for c in curves for e in c.epochs})
    if len(epochs) == 1:  # one epoch so far: one tick, not a fractional axis around it
        ax.set_xticks(epochs)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    labelled = sum(1 for c in curves if c.label)
    if labelled > LEGEND_INSIDE:  # many variants: the legend beside the axes, in columns
        ax.legend(fontsize=7, ncol=math.ceil(labelled / 18), loc="upper left", bbox_to_anchor=(1.02, 1.0))
    elif labelled:
        ax.legend(fontsize=8)


def draw_ranked(ax: Any, items: Sequence[Ranked], title: str, xlabel: str, reference: tuple[str, float] | None = None,
                order: Sequence[str] | None = None) -> None:
    """Means with error bars, best at the top (or in `order`), each value written beside its
    point, and a dashed vertical line at `reference` (label, value): the baseline."""
    by_label = {item.label: item for item in items}
    ranked = [by_label[label] for label in order if label in by_label] if order is not None else \
        sorted(items, key=lambda item: -item.value)
    positions = list(range(len(ranked)))
    for position, item in zip(positions, ranked):
        ax.errorbar(item.value, position, xerr=item.error, fmt="o", color=item.color or "C0", capsize=4, markersize=6)
        ax.annotate(f"{item.value:.2f} ± {item.error:.2f}", (item.value, position), xytext=(0, 7),
                    textcoords="offset points", ha="center", fontsize=8)
    if reference is not None:
        ax.axvline(reference[1], color="0.35", linestyle="--", lw=1, label=f"{reference[0]}: {reference[1]:.2f}")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_yticks(positions, [item.label for item in ranked])
    ax.set_ylim(len(ranked) - 0.4, -0.6)  # best at the top, room for the value labels
    ax.margins(x=0.15)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)


def over_seeds(label: str, series: Iterable[Sequence[tuple[float, float]]], color: str | None = None) -> Curve | None:
    """The mean over seeds at each epoch, with the min–max band where two or more seeds have
    that epoch (a run still going has fewer epochs than the others)."""
    by_epoch: dict[float, list[float]] = {}
    for points in series:
        for epoch, value in points:
            if math.isfinite(value):
                by_epoch.setdefault(epoch, []).append(value)
    if not by_epoch:
        return None
    epochs = sorted(by_epoch)
    values = [statistics.fmean(by_epoch[e]) for e in epochs]
    if max(len(v) for v in by_epoch.values()) < 2:
        return Curve(label, epochs, values, color=color)
    return Curve(label, epochs, values, [min(by_epoch[e]) for e in epochs], [max(by_epoch[e]) for e in epochs], color)


def _points(rows: Sequence[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    """(epoch, value) of `key` in a stage's metrics rows."""
    out = []
    for index, row in enumerate(rows):
        value = _number(row.get(key))
        if value is not None:
            out.append((float(row.get("epoch", index + 1)), value))
    return out


def _curve(label: str, points: Sequence[tuple[float, float]], width: float = 1.6) -> Curve:
    return Curve(label, [epoch for epoch, _ in points], [value for _, value in points], width=width)


def _loss_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The total loss and each weighted term (train/loss/<term>), in the order first logged."""
    keys = dict.fromkeys(k for row in rows for k in row if k == "train/loss" or k.startswith("train/loss/"))
    return sorted(keys, key=lambda k: k != "train/loss")


def _term_label(key: str) -> str:
    return "total" if key == "train/loss" else key.removeprefix("train/loss/")


# ---------------------------------------------------------------- the page


@dataclass
class Page:
    """An HTML page being assembled; every plot is written to `plots` and embedded."""

    title: str
    plots: Path
    parts: list[str] = field(default_factory=list)
    notice: str | None = None  # said at the top when the report is partial
    images: list[Path] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.parts.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def text(self, text: str, css: str | None = None) -> None:
        attribute = f' class="{css}"' if css else ""
        self.parts.append(f"<p{attribute}>{html.escape(text)}</p>")

    def table(self, head: Sequence[str], rows: Iterable[Sequence[Any]], caption: str | None = None) -> None:
        cells = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
        top = f"<caption>{html.escape(caption)}</caption>" if caption else ""
        self.parts.append(f"<table>{top}<thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>")

    def preformatted(self, text: str, summary: str | None = None) -> None:
        block = f"<pre>{html.escape(text)}</pre>"
        self.parts.append(f"<details><summary>{html.escape(summary)}</summary>{block}</details>" if summary else block)

    def figure(self, figure: Any, name: str, alt: str, caption: str) -> None:
        """Write the plot as report/<name>.png and embed the same bytes in the page."""
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        data = buffer.getvalue()
        self.plots.mkdir(parents=True, exist_ok=True)
        path = self.plots / f"{name}.png"
        path.write_bytes(data)
        self.images.append(path)
        uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        self.parts.append(f'<figure><img src="{uri}" alt="{html.escape(alt)}">'
                          f"<figcaption>{html.escape(caption)}</figcaption></figure>")

    def html(self) -> str:
        notice = f'<p class="partial"><strong>Partial report.</strong> {html.escape(self.notice)}</p>' \
            if self.notice else ""
        return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
                f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
                f'<link rel="icon" href="data:,">\n'  # no favicon request
                f"<title>{html.escape(self.title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
                f"<h1>{html.escape(self.title)}</h1>\n{notice}\n" + "\n".join(self.parts) + "\n</body>\n</html>\n")


STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } caption { text-align: left; color: #555; padding-bottom: 0.3em; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; }
figcaption, .note { color: #555; font-size: 0.9em; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.partial { background: #fff4d6; border: 1px solid #e0b84c; padding: 0.6em 0.9em; }
"""


def _pct(value: float | None) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.2f}%"


def _mean_pm(mean: float | None, std: float | None) -> str:
    return "—" if mean is None or not math.isfinite(mean) else f"{mean:.2f} ± {std or 0.0:.2f}"


def _colors(names: Iterable[str]) -> dict[str, str]:
    """One color per variant, the same in every plot of the page."""
    return {name: f"C{i % 10}" for i, name in enumerate(dict.fromkeys(names))}


# ---------------------------------------------------------------- a run


def _stage_table(page: Page, record: RunRecord) -> None:
    rows = []
    for stage in record.stage_names:
        state = record.stages.get(stage, {})
        result = record.result(stage)
        logged = record.rows(stage)
        last = result.get("last_acc", _number(logged[-1].get("test/acc")) if logged else None)
        best = result.get("best_acc", _number(logged[-1].get("test/best_acc")) if logged else None)
        epochs = result.get("epochs", len(logged))
        seconds = result.get("seconds")
        rows.append([stage, state.get("status", "—"), epochs, _pct(last),
                     f"{_pct(best)} (epoch {result['best_epoch']})" if "best_epoch" in result else _pct(best),
                     f"{seconds:.1f}" if isinstance(seconds, (int, float)) else "—"])
    page.table(["stage", "status", "epochs", "test top-1 last", "test top-1 best", "seconds"], rows,
               "Each stage of the run (state.json); a cached stage was trained by an earlier run and reused.")


def _outcome(page: Page, record: RunRecord, outcome: dict[str, Any]) -> None:
    final = (outcome.get("stages") or {}).get(record.final_stage or "", {})
    epochs = final.get("epochs")
    rows = [["student top-1, last epoch", f"{_pct(outcome.get('last_acc'))}" + (f" (epoch {epochs})" if epochs else "")],
            [f"student top-1, {best_epoch_label(record.validated)}",
             f"{_pct(outcome.get('best_acc'))} (epoch {outcome.get('best_epoch')})"]]
    if final.get("val_acc") is not None:
        rows.append(["student validation top-1, last epoch", _pct(final["val_acc"])])
    for model, acc in zip(outcome.get("teacher_models") or [], outcome.get("teacher_acc") or []):
        rows.append([f"teacher {model} top-1", _pct(acc)])
    if outcome.get("agreement") is not None:
        rows.append(["student–teacher agreement", f"{outcome['agreement']:.2f}% of test samples"])
    if outcome.get("student_head"):
        rows.append(["student head", f"the student {outcome['student_head']}"])
    page.table(["", "value"], rows, "Top-1 on the test set. " + (
        "The best epoch is chosen on the validation split; its test top-1 is shown." if record.validated else
        "The best epoch is selected on the test set itself, so its number is optimistic; the last epoch's is not."))


SIZE_COLUMNS = [("parameters", "parameters", lambda v: f"{v:,.0f}"),
                ("multiply_adds", "multiply-adds", lambda v: f"{v / 1e6:,.3f}M"),
                ("file_mb", "weights file", lambda v: f"{v:.3f} MB"),
                ("weight_sparsity", "weights zero", lambda v: f"{100 * v:.1f}%")]


def _sizes(page: Page, outcome: dict[str, Any]) -> None:
    """Parameters, multiply-adds, weights size and latency of the student and its teachers."""
    models = [p for p in dict.fromkeys(k.split("/")[0] for k in outcome if "/" in k) if p != "student_vs_teacher"]
    if not models:
        return
    batches = sorted({int(k.split("_b")[1].split("_")[0]) for k in outcome if "latency_b" in k and k.endswith("_median_ms")})
    def shown(key: str) -> bool:  # sparsity only when pruning left some: 0% says nothing
        values = [outcome.get(f"{m}/{key}") for m in models]
        return any(values) if key == "weight_sparsity" else any(v is not None for v in values)

    columns = [c for c in SIZE_COLUMNS if shown(c[0])]
    head = ["model", *(c[1] for c in columns), *(f"latency batch {b}, ms median (p90)" for b in batches)]

    def row(prefix: str, name: str, ratio: bool = False) -> list[str]:
        cells = [name]
        for key, _, show in columns:
            value = outcome.get(f"{prefix}/{key}")
            cells.append("—" if value is None else f"{value:.3g}x" if ratio else show(value))
        for b in batches:
            median, p90 = outcome.get(f"{prefix}/latency_b{b}_median_ms"), outcome.get(f"{prefix}/latency_b{b}_p90_ms")
            cells.append("—" if median is None else f"{median:.3g}x" if ratio else
                         f"{median:.3f}" + (f" ({p90:.3f})" if p90 is not None else ""))
        return cells

    teachers = outcome.get("teacher_models") or []
    rows = [row("student", "student")]
    for i, prefix in enumerate(m for m in models if m != "student"):
        rows.append(row(prefix, f"{prefix} {teachers[i]}" if i < len(teachers) else prefix))
    if any(k.startswith("student_vs_teacher/") for k in outcome):
        rows.append(row("student_vs_teacher", "student / teacher", ratio=True))
    threads = outcome.get("student/threads")
    latency = (f" Latency: on the CPU, {threads} thread{'s' if threads != 1 else ''}, median and 90th percentile of "
               "timed calls on the first test inputs.") if batches and threads else \
        " Latency was not measured (measure: false)."
    page.table(head, rows, "Sizes of the student and its teachers (summary.json)." + latency)
    for note in outcome.get("measure_notes") or []:
        page.text(f"Note: {note}", "note")


def _stage_figure(page: Page, record: RunRecord, stage: str) -> None:
    rows = record.rows(stage)
    figure = _new_figure(10, 3.4)
    losses, accuracy = figure.subplots(1, 2)
    draw_curves(losses, [_curve(_term_label(k), _points(rows, k), 2.2 if k == "train/loss" else 1.4)
                         for k in _loss_keys(rows) if _points(rows, k)],
                f"{stage}: training loss (weighted terms)", "loss")
    tops = [_curve(label, _points(rows, key)) for key, label in (("test/acc", "test"), ("val/acc", "validation"))
            if _points(rows, key)]
    draw_curves(accuracy, tops, f"{stage}: top-1", "top-1 (%)")
    result = record.result(stage)
    if result.get("best_epoch"):
        accuracy.axvline(result["best_epoch"], color="0.4", linestyle=":", lw=1)
        accuracy.annotate(f"best epoch ({'validation' if result.get('val_acc') is not None else 'test'})",
                          (result["best_epoch"], 0.02), xycoords=("data", "axes fraction"), fontsize=8,
                          rotation=90, ha="right", va="bottom")
    page.figure(figure, f"stage-{slug(stage)}", f"Training loss and top-1 per epoch of stage {stage}",
                f"Stage {stage}: each weighted loss term and their total (left), top-1 per epoch (right); "
                "the dotted line marks the best epoch.")


def run_page(folder: Path, plots: Path) -> Page:
    record = RunRecord.read(folder)
    page = Page(f"Run {folder.name}", plots)
    if not record.finished:
        page.notice = (f"This run has not finished: {record.unfinished_reason().removeprefix('did not finish: ')} "
                       "This page shows what the folder holds so far; `featkd train --resume` continues a stopped run.")
    page.heading("Outcome")
    if record.outcome is not None:
        _outcome(page, record, record.outcome)
    else:
        page.text("No outcome yet: summary.json gets it when the last stage is done.")
    _stage_table(page, record)
    if record.outcome is not None:
        page.heading("Sizes and latency")
        _sizes(page, record.outcome)
    page.heading("Training curves")
    for stage in record.stage_names:
        if record.rows(stage):
            _stage_figure(page, record, stage)
        elif record.stages.get(stage, {}).get("status") == "cached":
            page.text(f"Stage {stage} came from the stage cache: its curves are in the run that trained it.", "note")
    page.heading("Config")
    page.text("The fully resolved config of the run (config.yaml).", "note")
    page.preformatted(record.config_text)
    return page


# ---------------------------------------------------------------- comparisons and sweeps


@dataclass
class Grid:
    """What comparisons and sweeps share: runs of variants (a sweep's settings) over seeds."""

    runs: list[GridRun]
    order: list[str]  # the variants in the order of the results table
    validated: bool

    @property
    def colors(self) -> dict[str, str]:
        return _colors(self.order)

    def of(self, variant: str) -> list[GridRun]:
        return [r for r in self.runs if r.variant == variant and not r.selection]


def _ranking(page: Page, grid: Grid, last: dict[str, tuple[float, float]], best: dict[str, tuple[float, float]],
             baseline: str | None, what: str) -> None:
    """Last-epoch top-1 ranked, with the baseline's mean as a line, and the best epoch beside it."""
    colors = grid.colors
    last_items = [Ranked(v, m, s, colors.get(v)) for v, (m, s) in last.items() if math.isfinite(m)]
    if not last_items:
        return
    height = 1.2 + 0.45 * len(last_items)
    figure = _new_figure(11, height)
    left, right = figure.subplots(1, 2, sharey=True)
    reference = (f"baseline {baseline}", last[baseline][0]) if baseline in last else None
    draw_ranked(left, last_items, "last epoch (ranked)", "test top-1 (%), mean over seeds", reference)
    order = [item.label for item in sorted(last_items, key=lambda item: -item.value)]
    draw_ranked(right, [Ranked(v, m, s, colors.get(v)) for v, (m, s) in best.items() if math.isfinite(m)],
                best_epoch_label(grid.validated).replace(" (", "\n(", 1), "test top-1 (%), mean over seeds", order=order)
    right.tick_params(labelleft=False)  # the same rows as on the left
    page.figure(figure, "ranking", f"{what} ranked by last-epoch test top-1",
                f"{what} ranked by last-epoch test top-1 (left); the {best_epoch_label(grid.validated)} in the same "
                "order (right). Points: mean over seeds; error bars: sample standard deviation over seeds"
                + (f"; dashed line: the baseline ({baseline}) mean." if reference else "."))


def _curves(page: Page, grid: Grid, what: str) -> None:
    """Top-1 per epoch of every variant, and each variant's loss terms, as means over seeds."""
    colors = grid.colors
    variants = [v for v in grid.order if any(r.record for r in grid.of(v))]
    if not variants:
        page.text("No run folder was found beside the results file, so there are no curves to draw.", "note")
        return

    def final_rows(run: GridRun) -> list[dict[str, Any]]:
        return run.record.rows(run.record.final_stage) if run.record else []

    keys = [(k, label) for k, label in (("test/acc", "test top-1"), ("val/acc", "validation top-1"))
            if any(_points(final_rows(r), k) for v in variants for r in grid.of(v))]
    if keys:
        beside = len(variants) > LEGEND_INSIDE  # room for the legend beside each panel
        figure = _new_figure((5.5 + 2.2 * math.ceil(len(variants) / 18) * beside) * len(keys),
                             max(3.8, 0.2 * min(len(variants), 18) * beside))
        axes = figure.subplots(1, len(keys), squeeze=False)[0]
        for ax, (key, label) in zip(axes, keys):
            curves = [over_seeds(v, (_points(final_rows(r), key) for r in grid.of(v)), colors[v]) for v in variants]
            draw_curves(ax, [c for c in curves if c], label, "top-1 (%)")
        page.figure(figure, "accuracy", f"Top-1 per epoch of each {what}",
                    f"Top-1 per epoch of each {what}'s final stage; {BAND}.")
    columns = min(3, len(variants))
    figure = _new_figure(4.2 * columns, 3.2 * math.ceil(len(variants) / columns))
    axes = figure.subplots(math.ceil(len(variants) / columns), columns, squeeze=False).flatten()
    for ax, variant in zip(axes, variants):
        runs = grid.of(variant)
        terms = list(dict.fromkeys(k for r in runs for k in _loss_keys(final_rows(r))))
        curves = [over_seeds(_term_label(k), (_points(final_rows(r), k) for r in runs)) for k in terms]
        for curve in curves:
            if curve and curve.label == "total":
                curve.width = 2.2
        draw_curves(ax, [c for c in curves if c], variant, "loss")
    for ax in axes[len(variants):]:
        ax.set_visible(False)
    page.figure(figure, "losses", f"Training loss terms per epoch of each {what}",
                f"Each weighted loss term and their total per epoch, one panel per {what} (its final stage); {BAND}.")


def _runs_table(page: Page, grid: Grid, folder: Path) -> None:
    rows = []
    for run in (r for r in grid.runs if not r.selection):
        where = run.record.path.name if run.record else "—"
        rows.append([run.variant, run.seed, _pct(run.last_acc), _pct(run.best_acc), run.best_epoch or "—",
                     f"{run.seconds:.1f}" if run.seconds is not None else "—", where])
    page.table(["variant", "seed", "top-1 last", "top-1 best", "best epoch", "seconds", "run folder"], rows,
               f"Every run; its folder is inside {folder.name}.")


def _failures(page: Page, grid: Grid) -> None:
    failed = [r for r in grid.runs if r.error]
    if not failed:
        return
    page.heading("Failed or unfinished runs")
    page.table(["variant", "seed", "what happened"],
               [[r.variant + (" (selection run)" if r.selection else ""), r.seed, r.error] for r in failed])


def _configs(page: Page, grid: Grid, what: str) -> None:
    page.heading("Configs")
    page.text(f"The resolved config of each {what} (config.yaml of its first run).", "note")
    for variant in grid.order:
        record = next((r.record for r in grid.of(variant) if r.record), None)
        if record is not None:
            page.preformatted(record.config_text, variant)


def _summaries_of(grid: Grid) -> tuple[dict[str, tuple[float, float]], dict[str, tuple[float, float]]]:
    """Mean and std of last- and best-epoch top-1 per variant, over its finished runs."""
    last, best = {}, {}
    for variant in grid.order:
        done = [r for r in grid.of(variant) if r.last_acc is not None and r.best_acc is not None]
        if done:
            last[variant] = mean_std([r.last_acc for r in done])
            best[variant] = mean_std([r.best_acc for r in done])
    return last, best


def comparison_page(folder: Path, plots: Path) -> Page:
    results = _read_json(folder / "results.json")
    if not isinstance(results.get("runs"), list) or not isinstance(results.get("summaries"), list):
        raise ReportError(f"{folder / 'results.json'} is not the results file of `featkd compare` (no runs and "
                          f"summaries). {WHAT_A_REPORT_IS_MADE_FROM}")
    runs = [_grid_run(folder, row) for row in results["runs"]]
    runs += [_grid_run(folder, row, selection=True) for row in results.get("selection") or []]
    summaries = results["summaries"]
    grid = Grid(runs, [s["variant"] for s in summaries], any(r.get("val_acc") is not None for r in results["runs"]))
    baseline = results.get("baseline")
    page = Page(f"Comparison {results.get('name', folder.name)}", plots)
    seeds = sorted({r.seed for r in runs if not r.selection})
    page.text(f"{len(grid.order)} variants × seeds {', '.join(map(str, seeds))}; folder {folder.name}.")
    for variant, teachers in (results.get("teachers_by_variant") or {}).items():
        page.text(f"Teacher{'s' if len(teachers) > 1 else ''} of {variant}: "
                  + ", ".join(f"{model} top-1 {acc:.2f}%" for model, acc in teachers) + " (last epoch).")
    page.heading("Ranking")
    _ranking(page, grid, {s["variant"]: (s["last_mean"], s["last_std"]) for s in summaries},
             {s["variant"]: (s["best_mean"], s["best_std"]) for s in summaries}, baseline, "Variants")
    page.heading("Results")
    chosen = results.get("chosen") or {}
    head = ["method", "top-1 last (mean ± std)", f"top-1 {best_epoch_label(grid.validated)} (mean ± std)",
            f"Δ last vs {baseline or 'baseline'} [95% CI]", "seeds", *(["setting chosen"] if chosen else [])]
    rows = []
    for s in summaries:
        interval = Interval(**s["interval"]) if s.get("interval") else None
        delta = "—" if s.get("delta_last") is None else str(interval) if interval else f"{s['delta_last']:+.2f}"
        rows.append([s["variant"], _mean_pm(s["last_mean"], s["last_std"]), _mean_pm(s["best_mean"], s["best_std"]),
                     delta, s["seeds"], *([setting_label(chosen.get(s["variant"], {}))] if chosen else [])])
    page.table(head, rows, "Student top-1 on the test set (results.json): mean and sample standard deviation over "
               "seeds; Δ: difference of last-epoch means from the baseline with a 95% bootstrap interval over seeds "
               "and test samples.")
    _grid_sections(page, grid, folder, "variant")
    return page


def sweep_page(folder: Path, plots: Path) -> Page:
    with (folder / "results.csv").open(newline="") as handle:
        settings = list(csv.DictReader(handle))
    with (folder / "runs.csv").open(newline="") as handle:
        run_rows = list(csv.DictReader(handle))
    columns = list(settings[0]) if settings else []
    keys = [c for c in columns if not c.startswith("top1_") and c != "seeds"]
    if not columns or "top1_last_mean" not in columns:
        raise ReportError(f"{folder / 'results.csv'} is not the results file of `featkd sweep`. "
                          f"{WHAT_A_REPORT_IS_MADE_FROM}")
    for row in settings:  # values as the grid gave them (numbers stay numbers), as `--grid` parses them
        row["setting"] = {k: yaml.safe_load(row[k]) if row[k] != "" else None for k in keys}
        row["label"] = setting_label(row["setting"])
    runs = [_grid_run(folder, row) for row in run_rows]
    grid = Grid(runs, [row["label"] for row in settings], any(row.get("val_acc") for row in run_rows))
    page = Page(f"Sweep {folder.name}", plots)
    seeds = sorted({r.seed for r in runs})
    page.text(f"{len(settings)} settings of {', '.join(keys) or 'the config'} × seeds {', '.join(map(str, seeds))}.")
    page.heading("Results")
    page.table([*keys, "top-1 last (mean ± std)", f"top-1 {best_epoch_label(grid.validated)} (mean ± std)", "seeds"],
               [[*(row[k] for k in keys), _mean_pm(float(row["top1_last_mean"]), float(row["top1_last_std"])),
                 _mean_pm(float(row["top1_best_mean"]), float(row["top1_best_std"])), row["seeds"]] for row in settings],
               "Student top-1 on the test set (results.csv): mean and sample standard deviation over seeds.")
    if keys:
        page.heading("Top-1 against each swept parameter")
        _parameter_figure(page, settings, keys)
    page.heading("Ranking")
    _ranking(page, grid, {row["label"]: (float(row["top1_last_mean"]), float(row["top1_last_std"])) for row in settings},
             {row["label"]: (float(row["top1_best_mean"]), float(row["top1_best_std"])) for row in settings},
             None, "Settings")
    _grid_sections(page, grid, folder, "setting")
    return page


def _parameter_figure(page: Page, settings: list[dict[str, Any]], keys: list[str]) -> None:
    """One panel per swept key: last-epoch top-1 against its values, one line per setting of
    the other keys; a numeric key gets a numeric axis (log when its values span 10x)."""
    from matplotlib.ticker import NullLocator

    figure = _new_figure(min(5.2 * len(keys), 15), 3.8)
    for ax, key in zip(figure.subplots(1, len(keys), squeeze=False)[0], keys):
        values = list(dict.fromkeys(json.dumps(row["setting"][key], default=str) for row in settings))
        numeric = all(isinstance(row["setting"][key], (int, float)) and not isinstance(row["setting"][key], bool)
                      for row in settings)
        others = [k for k in keys if k != key]
        lines: dict[str, list[dict[str, Any]]] = {}
        for row in settings:
            lines.setdefault(setting_label({k: row["setting"][k] for k in others}) if others else "", []).append(row)
        for index, (label, rows) in enumerate(lines.items()):
            rows = sorted(rows, key=lambda r: r["setting"][key]) if numeric else rows
            x = [r["setting"][key] if numeric else values.index(json.dumps(r["setting"][key], default=str)) for r in rows]
            ax.errorbar(x, [float(r["top1_last_mean"]) for r in rows], yerr=[float(r["top1_last_std"]) for r in rows],
                        marker="o", capsize=4, label=label or None, color=f"C{index % 10}")
        if numeric:
            xs = [row["setting"][key] for row in settings]
            if min(xs) > 0 and max(xs) / min(xs) >= 10:
                ax.set_xscale("log")
            if len(set(xs)) <= 12:  # ticks at the values tried, not at powers of ten
                ax.set_xticks(sorted(set(xs)), [str(x) for x in sorted(set(xs))])
                ax.xaxis.set_minor_locator(NullLocator())
        else:
            ax.set_xticks(range(len(values)), [str(json.loads(v)) for v in values])
        ax.set_title(key, fontsize=10)
        ax.set_xlabel(key)
        ax.set_ylabel("test top-1 (%), last epoch")
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=8)
    page.figure(figure, "parameters", "Last-epoch top-1 against each swept parameter",
                "Last-epoch test top-1 against each swept parameter (one line per setting of the others); "
                "points: mean over seeds; error bars: sample standard deviation over seeds.")


def _grid_sections(page: Page, grid: Grid, folder: Path, what: str) -> None:
    page.heading("Training curves")
    _curves(page, grid, what)
    page.heading("Runs")
    _runs_table(page, grid, folder)
    _failures(page, grid)
    _configs(page, grid, what)


def unfinished_grid_page(folder: Path, plots: Path) -> Page:
    """A comparison or sweep still running, or stopped before its results file: its run folders."""
    runs = _runs_of_children(folder)
    grid = Grid(runs, list(dict.fromkeys(r.variant for r in runs)), any(r.record and r.record.validated for r in runs))
    page = Page(f"Runs of {folder.name}", plots)
    done = sum(r.error is None for r in runs)
    page.notice = (f"{folder.name} has no results file yet (results.json of featkd compare, results.csv of featkd "
                   f"sweep): it is still running, or it stopped before the end. Of the {len(runs)} runs found, "
                   f"{done} finished; the page shows them and what the others logged.")
    page.heading("Ranking")
    last, best = _summaries_of(grid)
    _ranking(page, grid, last, best, None, "Variants")
    page.heading("Results")
    page.table(["variant", "top-1 last (mean ± std)", f"top-1 {best_epoch_label(grid.validated)} (mean ± std)",
                "finished runs"],
               [[v, _mean_pm(*last[v]) if v in last else "—", _mean_pm(*best[v]) if v in best else "—",
                 sum(r.error is None for r in grid.of(v))] for v in grid.order],
               "Student top-1 on the test set over the runs that finished so far (no baseline difference: "
               "the results file that names the baseline is not written yet).")
    _grid_sections(page, grid, folder, "variant")
    return page


# ---------------------------------------------------------------- entry points


def report_kind(folder: Path) -> str:
    """"run", "comparison", "sweep" or "unfinished" (run folders without a results file yet)."""
    if not folder.is_dir():
        raise ReportError(f"{str(folder)!r}: no such folder. {WHAT_A_REPORT_IS_MADE_FROM}")
    if is_run_folder(folder):
        return "run"
    if (folder / "results.json").is_file():
        return "comparison"
    if (folder / "results.csv").is_file() and (folder / "runs.csv").is_file():
        return "sweep"
    if any(p.is_dir() and is_run_folder(p) for p in folder.iterdir()):
        return "unfinished"
    raise ReportError(f"{str(folder)!r} is not a run, comparison or sweep folder. {WHAT_A_REPORT_IS_MADE_FROM}")


def write_report(path: str | Path, out: str | Path | None = None) -> Path:
    """Write `report.html` (and its plots under `report/`) for the run, comparison or sweep
    folder `path`, into `out` (default: the folder itself); returns the page's path."""
    folder = Path(path)
    kind = report_kind(folder)
    target = Path(out) if out is not None else folder
    if target.exists() and not target.is_dir():
        raise ReportError(f"--out {str(target)!r} is a file; give a folder for report.html and its plots.")
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"--out {str(target)!r}: cannot create the folder ({exc.strerror or exc}).") from None
    build = {"run": run_page, "comparison": comparison_page, "sweep": sweep_page, "unfinished": unfinished_grid_page}
    page = build[kind](folder, target / PLOTS)
    written = target / PAGE
    written.write_text(page.html(), encoding="utf-8")
    return written


def report_or_warn(folder: Path) -> Path | None:
    """The report of a comparison or sweep whose results files are already written; a failure
    to draw it is a warning on stderr, never a lost result."""
    try:
        return write_report(folder)
    except Exception as exc:  # noqa: BLE001 - the results are saved; the page is a convenience
        print(f"featkd: the report of {folder} could not be written ({type(exc).__name__}: {exc}); the results "
              f"files are saved. Try again with `featkd report {folder}`.", file=sys.stderr)
        return None
