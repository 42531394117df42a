"""Comparisons: one base config, named variants, several seeds, one results table.

A comparison file looks like

    name: quickstart-compare
    base: quickstart.yaml            # a run config, relative to this file
    seeds: [0, 1, 2]
    baseline: student alone          # the variant the others are compared with
    variants:
      student alone: {teacher: null, loss: {kd: null, ce: {weight: 1.0}}}
      KD: {}                         # the base config as it is
      AT: {loss: {at: {student: "layer*", teacher: "layer*"}}}

Each variant is deep-merged over the base (after any command-line overrides), every variant
is validated before the first run starts, and teachers are trained once and shared through
the teacher cache. The table reports the last-epoch and the best-epoch top-1, each labelled,
as mean and sample standard deviation over the seeds, and each variant's difference from the
baseline with a 95% bootstrap interval over seeds and test samples (`featkd.stats`).

A `select:` section chooses settings for every variant by one rule, on a validation split,
before the compared runs (the data must hold one out, e.g. `validation_fraction: 0.2`):

    select:
      grid: {train.optimizer.lr: [0.003, 0.01, 0.03, 0.1]}
      seeds: [100, 101]              # the selection runs' seeds (default [0])

Each variant runs every grid point with those seeds and keeps the point of highest mean
last-epoch validation top-1 (the first of equals; never a point under which a run diverged);
the table says what each variant chose.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import re
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field

from featkd.config import Config, apply_overrides, deep_merge, find_config, read_yaml, smoke_config, validate
from featkd.engine import NonFiniteLoss
from featkd.errors import ConfigError
from featkd.stats import Interval, bootstrap_difference
from featkd.summary import test_correct
from featkd.trainer import train


class Selection(BaseModel):
    """Settings each variant chooses on the validation split, by the same rule (see above)."""

    model_config = ConfigDict(extra="forbid")
    grid: dict[str, list[Any]] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)


class ComparisonSpec(BaseModel):
    """The contents of a comparison file."""

    model_config = ConfigDict(extra="forbid")
    name: str = "compare"
    base: str
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    baseline: str | None = None
    select: Selection | None = None
    variants: dict[str, dict[str, Any]] = Field(min_length=1)


@dataclass
class RunRow:
    """One finished run of a comparison."""

    variant: str
    seed: int
    last_acc: float
    best_acc: float
    best_epoch: int
    seconds: float
    run_dir: str
    val_acc: float | None = None  # validation top-1 of the last epoch, with a validation split
    diverged: bool = False  # stopped by a non-finite loss (selection runs only; accuracies are nan)


@dataclass
class VariantSummary:
    variant: str
    last_mean: float
    last_std: float
    best_mean: float
    best_std: float
    seeds: int
    delta_last: float | None
    #: the last-epoch difference from the baseline with its 95% interval (runs with predictions)
    interval: Interval | None = None


@dataclass
class ComparisonResult:
    name: str
    folder: Path
    rows: list[RunRow]
    summaries: list[VariantSummary]
    #: each variant's teachers as (model, top-1 mean over seeds); empty for variants without one
    teachers_by_variant: dict[str, list[tuple[str, float]]]
    baseline: str | None
    seconds: float
    #: with `select:`, the grid points tried, each variant's choice, and the selection runs
    #: (named "<variant> @ <point>")
    points: list[dict[str, Any]] = field(default_factory=list)
    chosen: dict[str, dict[str, Any]] = field(default_factory=dict)
    selection: list[RunRow] = field(default_factory=list)
    #: the HTML report written after the results files (None if it could not be drawn)
    report: Path | None = None

    @property
    def teacher_models(self) -> list[str]:
        """The teachers of the first variant that has any."""
        return [model for model, _ in next(iter(self.teachers_by_variant.values()), [])]

    @property
    def teacher_acc(self) -> list[float]:
        return [acc for _, acc in next(iter(self.teachers_by_variant.values()), [])]

    def markdown(self) -> str:
        return results_markdown(self)


def load_spec(path: str | Path) -> tuple[ComparisonSpec, Path]:
    path = find_config(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path.name}: not valid YAML: {exc}") from None
    try:
        spec = ComparisonSpec.model_validate(data)
    except pydantic.ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{path.name}: invalid comparison file: {problems}") from None
    if spec.baseline is not None and spec.baseline not in spec.variants:
        raise ConfigError(f"{path.name}: baseline {spec.baseline!r} is not one of the variants {list(spec.variants)}.")
    return spec, path


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-").lower() or "variant"


def run_names(variants: Sequence[str]) -> dict[str, str]:
    """Each variant's run name (its folders are `<name>-seed<N>`): its slug, numbered where two
    variants slug alike ("DIST" and "DIST+"), so that no two variants share a run folder."""
    names: dict[str, str] = {}
    taken: set[str] = set()
    for variant in variants:
        base = name = slug(variant)
        n = 1
        while name in taken:
            n += 1
            name = f"{base}-{n}"
        names[variant] = name
        taken.add(name)
    return names


def _has_parent(data: dict[str, Any], override: str) -> bool:
    """Whether the mapping that `a.b.c=value` writes into exists in `data` (a list of one
    mapping stands for it, as `teacher.seed` addresses the only teacher)."""
    node: Any = data
    for part in override.partition("=")[0].strip().split(".")[:-1]:
        if isinstance(node, list):
            if part.lstrip("-").isdigit():
                node = node[int(part)] if -len(node) <= int(part) < len(node) else None
                continue
            node = node[0] if len(node) == 1 else None
        if not isinstance(node, dict) or node.get(part) is None:
            return False
        node = node[part]
    return isinstance(node, (dict, str, list))  # a str is a shorthand section such as `logger: none`


def plan(spec: ComparisonSpec, spec_path: Path, overrides: Sequence[str] = ()) -> dict[str, Config]:
    """The validated config of each variant (seed not yet set).

    Command-line overrides apply after each variant's changes, to every variant that has the
    section they write into: `loss.kd.temperature=2` changes the variants that use KD and
    leaves the ones that removed it alone; `train.epochs=5` changes all of them.
    """
    base = read_yaml(spec_path.parent / spec.base)
    merged = {name: deep_merge(base, changes) for name, changes in spec.variants.items()}
    sections = {name: _sections(data) for name, data in merged.items()}
    for override in overrides:
        if "=" in override and not any(_has_parent(data, override) for data in sections.values()):
            raise ConfigError(f"override {override!r} matches no variant: none of them has that section.")
    configs = {}
    for name, data in merged.items():
        mine = [o for o in overrides if "=" not in o or _has_parent(sections[name], o)]
        try:
            configs[name] = validate(apply_overrides(data, mine))
        except ConfigError as exc:
            raise ConfigError(f"variant {name!r}: {exc}") from None
    return configs


def _sections(data: dict[str, Any]) -> dict[str, Any]:
    """A variant as its config reads it: default sections filled in, removed ones null."""
    try:
        return validate(data).to_dict()
    except ConfigError:  # only valid with the overrides: judge by what it writes
        return data


def run_comparison(path: str | Path, overrides: Sequence[str] = (), seeds: Sequence[int] | None = None,
                   progress: bool = True, jobs: int = 1, smoke: bool = False) -> ComparisonResult:
    """Run every variant for every seed (`jobs` at a time); write results.md / .csv / .json,
    then report.html (`featkd.report`).

    `smoke` runs each variant once, on tiny synthetic data for one epoch (see `smoke_config`).
    """
    spec, spec_path = load_spec(path)
    configs = plan(spec, spec_path, overrides)
    seeds = list(seeds) if seeds is not None else spec.seeds
    if smoke:
        configs = {name: smoke_config(config) for name, config in configs.items()}
        seeds = seeds[:1]
    folder = new_folder(next(iter(configs.values())).output_dir, spec.name)
    start = time.perf_counter()
    chosen: dict[str, dict[str, Any]] = {}
    selection: list[RunRow] = []
    if spec.select is not None:
        chosen, selection = select(configs, spec.select, folder / "select", progress, jobs, smoke)
        configs = {name: with_setting(config, chosen[name]) for name, config in configs.items()}
    runs = run_grid(configs, seeds, folder, progress, jobs)
    rows = [row for row, _ in runs]
    points = settings_of(spec.select.grid) if spec.select is not None else []
    outcome = ComparisonResult(spec.name, folder, rows, summarize(rows, list(configs), spec.baseline),
                               teachers_by_variant(runs), spec.baseline, time.perf_counter() - start, points, chosen,
                               selection)
    write_results(outcome)
    from featkd.report import report_or_warn  # after the results: a failed plot loses nothing

    outcome.report = report_or_warn(folder)
    from featkd.dashboard import log_comparison  # the results as a W&B run of the comparison's group

    log_comparison(outcome, next(iter(configs.values())).logger)
    return outcome


def settings_of(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every point of a grid of override keys (a `seed` axis is left out: seeds replicate)."""
    axes = {k: v for k, v in grid.items() if k != "seed"}
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())] or [{}]


def setting_override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value) if not isinstance(value, str) else value}"


def setting_label(setting: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in setting.items()) or "base"


def with_setting(config: Config, setting: dict[str, Any]) -> Config:
    """`config` with a grid point's overrides applied (and validated)."""
    return validate(apply_overrides(config.to_dict(), [setting_override(k, v) for k, v in setting.items()]))


def select(configs: dict[str, Config], selection: Selection, folder: Path, progress: bool = True, jobs: int = 1,
           smoke: bool = False) -> tuple[dict[str, dict[str, Any]], list[RunRow]]:
    """Each variant's grid point of highest mean last-epoch validation top-1 over the
    selection seeds (the first of equals), and the rows of every selection run."""
    points = settings_of(selection.grid)
    grid = {}
    for name, config in configs.items():
        for point in points:
            try:
                grid[f"{name} @ {setting_label(point)}"] = with_setting(config, point)
            except ConfigError as exc:
                raise ConfigError(f"select: variant {name!r} at {setting_label(point)}: {exc}") from None
    folder.mkdir(parents=True, exist_ok=True)
    seeds = selection.seeds[:1] if smoke else selection.seeds
    rows = [row for row, _ in run_grid(grid, seeds, folder, progress, jobs, tolerate_divergence=True)]
    if any(r.val_acc is None and not r.diverged for r in rows):
        raise ConfigError("select: the runs have no validation split to choose on; hold one out of the training "
                          "data (e.g. data.args.validation_fraction: 0.2).")
    chosen = {}
    for name in configs:
        scores = [selection_score([r for r in rows if r.variant == f"{name} @ {setting_label(p)}"]) for p in points]
        if max(scores) == -math.inf:
            raise ConfigError(f"select: variant {name!r} diverged at every setting of the grid; widen the grid.")
        chosen[name] = points[scores.index(max(scores))]
    return chosen, rows


def selection_score(runs: list[RunRow]) -> float:
    """A setting's mean last-epoch validation top-1 over its seeds; a setting under which a run
    diverged (stopped on a non-finite loss) is never chosen."""
    return -math.inf if any(r.diverged for r in runs) else statistics.fmean(r.val_acc for r in runs)


def new_folder(output_dir: str, name: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = Path(output_dir) / f"{slug(name)}-{stamp}"
    n = 1
    while folder.exists():
        n += 1
        folder = folder.with_name(f"{slug(name)}-{stamp}-{n}")
    folder.mkdir(parents=True)
    return folder


def _run_one(config_data: dict[str, Any], run_dir: str, threads: int | None,
             tolerate_divergence: bool = False) -> dict[str, Any]:
    """One run in this process (or a worker process); plain data out, so it crosses processes."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    try:
        result = train(validate(config_data), Path(run_dir), verbose=False)
    except NonFiniteLoss as exc:
        if not tolerate_divergence:
            raise
        return {"diverged": str(exc)}
    return {"student": asdict(result.student), "teacher_acc": result.teacher_acc,
            "teacher_models": result.teacher_models}


def run_grid(configs: dict[str, Config], seeds: Sequence[int], folder: Path, progress: bool = True,
             jobs: int = 1, tolerate_divergence: bool = False) -> list[tuple[RunRow, dict[str, Any]]]:
    """Train every (variant, seed), seed-major so a partial run still covers every variant.

    Each run is named after its variant and grouped in W&B under the folder's name. With
    `jobs` > 1, runs go to that many worker processes, sharing the CPU cores between them;
    stages they share (teachers) are trained once, the others wait for the cache. With
    `tolerate_divergence`, a run stopped by a non-finite loss is recorded as diverged.
    """
    tasks = []
    names = run_names(list(configs))
    for seed in seeds:
        for name, config in configs.items():
            run_config = config.model_copy(update={
                "seed": seed,
                "name": names[name],
                "progress": progress and config.progress and jobs == 1,
                "logger": config.logger.model_copy(update={
                    "group": config.logger.group or folder.name,
                    "tags": [*config.logger.tags, f"variant:{name}", f"seed:{seed}"],
                }),
            })
            tasks.append((name, seed, run_config.to_dict(), str(folder / f"{names[name]}-seed{seed}")))
    results: dict[int, tuple[RunRow, dict[str, Any]]] = {}

    def record(index: int, outcome: dict[str, Any]) -> None:
        name, seed, _, run_dir = tasks[index]
        if "diverged" in outcome:
            row = RunRow(name, seed, math.nan, math.nan, 0, 0.0, run_dir, diverged=True)
            results[index] = (row, {**outcome, "teacher_acc": [], "teacher_models": []})
            if progress:
                print(f"[{len(results)}/{len(tasks)}] {name} seed {seed}: diverged (a non-finite loss)", flush=True)
            return
        s = outcome["student"]
        row = RunRow(name, seed, s["last_acc"], s["best_acc"], s["best_epoch"], s["seconds"], run_dir, s.get("val_acc"))
        results[index] = (row, outcome)
        if progress:
            best = "at the epoch best on validation" if row.val_acc is not None else "best"
            print(f"[{len(results)}/{len(tasks)}] {name} seed {seed}: top-1 last {row.last_acc:.2f}% "
                  f"{best} {row.best_acc:.2f}% ({row.seconds:.1f}s)", flush=True)

    if jobs <= 1:
        for index, (_, _, data, run_dir) in enumerate(tasks):
            record(index, _run_one(data, run_dir, None, tolerate_divergence))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        threads = max(1, (os.cpu_count() or 1) // jobs)
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_run_one, data, run_dir, threads, tolerate_divergence): index
                       for index, (_, _, data, run_dir) in enumerate(tasks)}
            for future in as_completed(futures):
                record(futures[future], future.result())
    return [results[i] for i in range(len(tasks))]


def teachers_by_variant(runs: list[tuple[RunRow, dict[str, Any]]]) -> dict[str, list[tuple[str, float]]]:
    """Each variant's teachers and their top-1, averaged over the variant's seeds."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for row, outcome in runs:
        if outcome["teacher_acc"]:
            grouped.setdefault(row.variant, []).append(outcome)
    return {variant: [(model, statistics.fmean(o["teacher_acc"][i] for o in outcomes))
                      for i, model in enumerate(outcomes[0]["teacher_models"])]
            for variant, outcomes in grouped.items()}


def _teacher_lines(result: ComparisonResult) -> list[str]:
    described = {tuple((m, round(a, 2)) for m, a in t) for t in result.teachers_by_variant.values()}
    if len(described) > 1:  # the variants compare teachers: name each one's
        return [f"Teacher{'s' if len(teachers) > 1 else ''} of {variant}: "
                + ", ".join(f"{m} top-1 {a:.2f}%" for m, a in teachers) + " (last epoch)."
                for variant, teachers in result.teachers_by_variant.items()]
    return [f"Teacher {model}: top-1 {acc:.2f}% (last epoch)." for model, acc in zip(result.teacher_models, result.teacher_acc)]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value) of top-1 over seeds."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(rows: list[RunRow], order: list[str], baseline: str | None) -> list[VariantSummary]:
    by_variant = {name: [r for r in rows if r.variant == name] for name in order}
    base_runs = by_variant.get(baseline, []) if baseline else []
    base_last = mean_std([r.last_acc for r in base_runs])[0] if base_runs else None
    out = []
    for name, runs in by_variant.items():
        if not runs:
            continue
        last = mean_std([r.last_acc for r in runs])
        best = mean_std([r.best_acc for r in runs])
        compared = base_last is not None and name != baseline
        out.append(VariantSummary(name, *last, *best, len(runs), last[0] - base_last if compared else None,
                                  difference(runs, base_runs) if compared else None))
    return out


def difference(runs: list[RunRow], baseline: list[RunRow]) -> Interval | None:
    """The runs' mean test top-1 minus the baseline's, with its 95% bootstrap interval over
    seeds and test samples, paired by seed when both ran the same seeds (None without the
    runs' test predictions)."""
    try:
        a, b = ([test_correct(r.run_dir).numpy() for r in sorted(group, key=lambda r: r.seed)] for group in (runs, baseline))
    except FileNotFoundError:
        return None
    return bootstrap_difference(np.stack(a), np.stack(b), sorted(r.seed for r in runs) == sorted(r.seed for r in baseline))


def best_epoch_label(validated: bool) -> str:
    """What "best" means in a table: chosen on the validation split when there is one, else on
    the test set itself, which flatters it."""
    return "best epoch (chosen on the validation split)" if validated else \
        "best epoch (selected on the test set, so optimistic)"


def results_markdown(result: ComparisonResult) -> str:
    seeds = sorted({r.seed for r in result.rows})
    lines = _teacher_lines(result)
    best = best_epoch_label(any(r.val_acc is not None for r in result.rows))
    lines += [
        f"Student top-1 on the test set, mean ± std over seeds {', '.join(map(str, seeds))}. "
        f"*last* = after the final epoch; *best* = {best}. Δ: difference of last-epoch means from the "
        "baseline, with a 95% bootstrap interval over seeds and test samples.",
        "",
        "| method | top-1 last | top-1 best | Δ last vs " + (result.baseline or "baseline") + " [95% CI] |",
        "|---|---|---|---|",
    ]
    for s in result.summaries:
        delta = "—" if s.delta_last is None else str(s.interval) if s.interval else f"{s.delta_last:+.2f}"
        lines.append(f"| {s.variant} | {s.last_mean:.2f} ± {s.last_std:.2f} | {s.best_mean:.2f} ± {s.best_std:.2f} | {delta} |")
    if result.chosen:
        lines += ["", selection_markdown(result)]
    return "\n".join(lines)


def selection_markdown(result: ComparisonResult) -> str:
    """Every variant's selection runs: mean last-epoch validation top-1 per setting, chosen marked."""
    seeds = sorted({r.seed for r in result.selection})
    lines = [f"Settings chosen on the validation split (mean last-epoch validation top-1 over seeds "
             f"{', '.join(map(str, seeds))}; **bold**: chosen):", "",
             "| method | " + " | ".join(setting_label(p) for p in result.points) + " |",
             "|---|" + "---|" * len(result.points)]
    for variant, chosen in result.chosen.items():
        cells = []
        for point in result.points:
            score = selection_score([r for r in result.selection if r.variant == f"{variant} @ {setting_label(point)}"])
            cell = "diverged" if score == -math.inf else f"{score:.2f}"
            cells.append(f"**{cell}**" if point == chosen else cell)
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(result: ComparisonResult) -> None:
    (result.folder / "results.md").write_text(results_markdown(result) + "\n")
    with (result.folder / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(asdict(result.rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in result.rows)
    (result.folder / "results.json").write_text(json.dumps({
        "name": result.name,
        "baseline": result.baseline,
        "teacher_acc": result.teacher_acc,
        "teachers_by_variant": result.teachers_by_variant,
        "summaries": [asdict(s) for s in result.summaries],
        "runs": [asdict(r) for r in result.rows],
        "points": result.points,
        "chosen": result.chosen,
        "selection": [asdict(r) for r in result.selection],
        "seconds": result.seconds,
    }, indent=2) + "\n")
