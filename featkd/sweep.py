"""Ablation sweeps: a grid of overrides over one config, seeds as replicates, one table.

    featkd sweep configs/quickstart.yaml --grid loss.kd.temperature=1,2,4,8 --grid seed=0,1,2
    featkd sweep configs/quickstart.yaml --grid loss.kd.temperature=1,4 --jobs 2
    featkd sweep configs/quickstart.yaml --grid loss.kd.temperature=1,2,4,8 --wandb-sweep sweep.yaml

The `seed` axis is the replicate axis: the table has one row per setting of the other axes,
with the mean and sample standard deviation over seeds of the last-epoch and of the
best-epoch top-1, each labelled. Values are YAML (`1`, `adam`, `[8,16]`); separate them with
`;` instead of `,` when a value contains a comma.
"""

from __future__ import annotations

import csv
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from featkd.compare import RunRow, mean_std, new_folder, run_grid, setting_label, setting_override, settings_of
from featkd.config import Config, load_config
from featkd.errors import ConfigError


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """`["a.b=1,2", "seed=0,1"]` -> {"a.b": [1, 2], "seed": [0, 1]}."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or not text.strip():
            raise ConfigError(f"--grid {item!r}: write key=value1,value2 (e.g. --grid loss.kd.temperature=1,2,4).")
        if key in grid:
            raise ConfigError(f"--grid {key}: given twice; list all its values in one --grid.")
        pieces = text.split(";") if ";" in text else text.split(",")
        try:
            grid[key] = [yaml.safe_load(p) for p in pieces if p.strip()]
        except yaml.YAMLError as exc:
            raise ConfigError(f"--grid {item!r}: a value is not valid YAML ({exc}).") from None
    return grid


@dataclass
class SweepRow:
    """One setting of the grid, over its seeds."""

    setting: dict[str, Any]
    last_mean: float
    last_std: float
    best_mean: float
    best_std: float
    seeds: int


@dataclass
class SweepResult:
    name: str
    folder: Path
    keys: list[str]
    rows: list[SweepRow]
    runs: list[RunRow]
    seconds: float
    #: the HTML report written after the results files (None if it could not be drawn)
    report: Path | None = None

    def markdown(self) -> str:
        seeds = sorted({r.seed for r in self.runs})
        head = [*self.keys, "top-1 last (mean ± std)", "top-1 best (mean ± std)", "seeds"]
        lines = [
            f"Sweep {self.name}: student top-1 on the test set over seeds {', '.join(map(str, seeds))}. "
            "*last* = after the final epoch; *best* = best epoch (selected on the test set, so optimistic).",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
        ]
        for row in self.rows:
            cells = [str(row.setting.get(k)) for k in self.keys]
            cells += [f"{row.last_mean:.2f} ± {row.last_std:.2f}", f"{row.best_mean:.2f} ± {row.best_std:.2f}",
                      str(row.seeds)]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def plan_sweep(config_path: str | Path, grid: dict[str, list[Any]], overrides: list[str]) -> tuple[dict[str, Config], list[int]]:
    """A validated config per grid setting, and the seeds to run each with."""
    base = load_config(config_path, overrides)
    seeds = [int(s) for s in grid.get("seed", [base.seed])]
    configs = {}
    for setting in settings_of(grid):
        label = setting_label(setting)
        try:
            configs[label] = load_config(config_path, [*overrides, *(setting_override(k, v) for k, v in setting.items())])
        except ConfigError as exc:
            raise ConfigError(f"sweep setting {label!r}: {exc}") from None
    return configs, seeds


def run_sweep(config_path: str | Path, grid: dict[str, list[Any]], overrides: list[str] = (), jobs: int = 1,
              name: str | None = None, progress: bool = True) -> SweepResult:
    """Run the grid; write results.md and results.csv (one row per setting) and runs.csv, then
    report.html (`featkd.report`)."""
    configs, seeds = plan_sweep(config_path, grid, list(overrides))
    first = next(iter(configs.values()))
    name = name or f"{first.name}-sweep"
    folder = new_folder(first.output_dir, name)
    start = time.perf_counter()
    runs = [row for row, _ in run_grid(configs, seeds, folder, progress, jobs)]
    keys = [k for k in grid if k != "seed"]
    rows = []
    for setting in settings_of(grid):
        mine = [r for r in runs if r.variant == setting_label(setting)]
        last = mean_std([r.last_acc for r in mine])
        best = mean_std([r.best_acc for r in mine])
        rows.append(SweepRow(setting, *last, *best, len(mine)))
    result = SweepResult(name, folder, keys, rows, runs, time.perf_counter() - start)
    write_results(result)
    from featkd.report import report_or_warn  # after the results: a failed plot loses nothing

    result.report = report_or_warn(folder)
    from featkd.dashboard import log_sweep  # the results as a W&B run of the sweep's group

    log_sweep(result, first.logger)
    return result


def write_results(result: SweepResult) -> None:
    (result.folder / "results.md").write_text(result.markdown() + "\n")
    with (result.folder / "results.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*result.keys, "top1_last_mean", "top1_last_std", "top1_best_mean", "top1_best_std", "seeds"])
        for row in result.rows:
            writer.writerow([*(row.setting.get(k) for k in result.keys), f"{row.last_mean:.4f}", f"{row.last_std:.4f}",
                             f"{row.best_mean:.4f}", f"{row.best_std:.4f}", row.seeds])
    with (result.folder / "runs.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(asdict(result.runs[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in result.runs)


def wandb_sweep_yaml(config_path: str | Path, grid: dict[str, list[Any]], overrides: list[str] = (),
                     name: str | None = None) -> str:
    """A W&B sweep definition that runs `featkd train CONFIG <overrides> <the grid point>`."""
    plan_sweep(config_path, grid, list(overrides))  # every point must validate before W&B runs it
    spec = {
        "name": name or f"{Path(config_path).stem}-sweep",
        "program": "featkd",
        "method": "grid",
        "metric": {"name": "test/acc", "goal": "maximize"},
        "parameters": {key: {"values": values} for key, values in grid.items()},
        "command": ["featkd", "train", str(config_path), *overrides, "logger.mode=online", "${args_no_hyphens}"],
    }
    return yaml.safe_dump(spec, sort_keys=False)
