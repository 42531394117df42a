"""Cho & Hariharan 2019: larger teachers, and a teacher stopped early, against the student alone.

For each seed, a small and a large teacher are trained (30 epochs, the large one keeping its
epoch-10 checkpoint), and the student is distilled from each of the three, and trained alone.
"""

from pathlib import Path

import numpy as np

import common
from featkd.compare import ComparisonResult, RunRow, slug, summarize
from featkd.evaluation import evaluate_checkpoint
from featkd.stats import bootstrap_difference
from featkd.summary import test_correct
from featkd.trainer import train

FOLDER = Path(__file__).resolve().parent
EARLY = 10  # of the teacher's 30 epochs
TEACHERS = {"small": "cnn_small", "large": "cnn_large"}
ALONE, SMALL, LARGE, STOPPED = ("student alone", "small teacher (cnn_small)", "large teacher (cnn_large)",
                                f"large teacher stopped at epoch {EARLY}")
#: a gain smaller than this (points, 5 of the 1,000 test signals) is what "no better" allows
MARGIN = 0.5


def run(seed: int, variant: str, overrides: list[str]):
    config = common.config(FOLDER / "base.yaml", [f"seed={seed}", f"output_dir={common.output_dir(FOLDER.name)}",
                                                "logger=none", f"name={slug(variant)}-seed{seed}", *overrides])
    return train(config, verbose=False)


def main() -> dict:
    early = 1 if common.SMOKE else EARLY  # a smoke run trains one epoch
    rows, teacher_runs = [], {key: [] for key in TEACHERS}
    for seed in common.seeds():
        made = {key: run(seed, f"{key} teacher", ["teacher=null", "loss.kd=null", "loss.ce.weight=1",
                                                  f"student={{model: {model}}}", f"train.checkpoint_epochs=[{early}]"])
                for key, model in TEACHERS.items()}
        for key, result in made.items():
            teacher_runs[key].append(result.run_dir)
        checkpoints = {key: result.run_dir / "checkpoints" for key, result in made.items()}
        for variant, overrides in ((ALONE, ["teacher=null", "loss.kd=null", "loss.ce.weight=1"]),
                                   (SMALL, ["teacher.model=cnn_small", f"teacher.checkpoint={checkpoints['small'] / 'last.pt'}"]),
                                   (LARGE, [f"teacher.checkpoint={checkpoints['large'] / 'last.pt'}"]),
                                   (STOPPED, [f"teacher.checkpoint={checkpoints['large'] / f'epoch{early}.pt'}"])):
            result = run(seed, variant, overrides)
            s = result.student
            rows.append(RunRow(variant, seed, s.last_acc, s.best_acc, s.best_epoch, s.seconds, str(result.run_dir)))
            print(f"seed {seed} {variant}: {s.last_acc:.2f}", flush=True)

    # the teachers: do they differ? (the claim is only tested if the larger one is more accurate)
    small_t = np.stack([test_correct(d).numpy() for d in teacher_runs["small"]])
    large_t = np.stack([test_correct(d).numpy() for d in teacher_runs["large"]])
    teacher_gap = bootstrap_difference(large_t, small_t, paired=True)
    early_acc = [evaluate_checkpoint(d / "checkpoints" / f"epoch{early}.pt", "cpu")["acc"] for d in teacher_runs["large"]]
    teacher_acc = {SMALL: 100 * small_t.mean(1), LARGE: 100 * large_t.mean(1), STOPPED: np.array(early_acc)}

    larger = common.judge(rows, LARGE, SMALL, "no better", MARGIN)
    if teacher_gap.low <= 0:
        larger = ("inconclusive", larger[1])  # the teachers are not shown to differ: the test cannot discriminate
    stopped = common.judge(rows, STOPPED, LARGE)
    order = [ALONE, SMALL, LARGE, STOPPED]
    table = ComparisonResult(FOLDER.name, Path(common.output_dir(FOLDER.name)), rows, summarize(rows, order, ALONE),
                             {}, ALONE, 0.0)
    lines = [table.markdown(), "", "| teacher | teacher top-1 (mean ± std over seeds) | student top-1 (last) |",
             "|---|---|---|"]
    lines += [f"| {v} | {common.fmt(list(teacher_acc[v]))} | {common.fmt(common.last_accuracies(rows, v))} |"
              for v in (SMALL, LARGE, STOPPED)]
    lines += ["", f"The large teacher is more accurate than the small one by {teacher_gap} points (paired by seed).",
              f"Is the student of the larger teacher no better (by less than {MARGIN} points) than the small "
              f"teacher's? {common.said(larger)}. Does stopping the large teacher at epoch {EARLY} of 30 give a better "
              f"student than the fully trained one? {common.said(stopped)}. (The paper found neither a larger teacher "
              "nor full training to help on ImageNet, and early-stopped teachers to help.)"]
    summary = {"claim": "a larger teacher does not give a better student; an early-stopped teacher helps",
               "paper": "Cho & Hariharan 2019",
               "verdict": f"larger teacher no better: {larger[0]}; early stopping helps: {stopped[0]}",
               "interval": {"larger": str(larger[1]), "stopped": str(stopped[1]), "teachers": str(teacher_gap)},
               **{v: common.fmt(common.last_accuracies(rows, v)) for v in order}}
    common.write(FOLDER, "\n".join(lines), summary)
    return summary
