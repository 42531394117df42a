"""Cho & Hariharan 2019: larger teachers, and teachers stopped early, against the student alone."""

from pathlib import Path

import common

FOLDER = Path(__file__).resolve().parent
SIZES = ["small teacher (cnn_small, 24k)", "large teacher (cnn_large, 1.1M)", "very large teacher (4.7M)"]


def main() -> dict:
    result = common.compare(FOLDER)
    students = {v: common.last_accuracies(result, v) for v in [*SIZES, "large teacher, stopped early (5 epochs)"]}
    teachers = {v: result.teachers_by_variant[v][0][1] for v in students}
    larger = common.verdict(students[SIZES[2]], students[SIZES[0]])
    early = common.verdict(students["large teacher, stopped early (5 epochs)"], students[SIZES[1]])
    lines = [result.markdown(), "", "| teacher | teacher top-1 | student top-1 (last) |", "|---|---|---|"]
    lines += [f"| {v} | {teachers[v]:.2f} | {common.fmt(students[v])} |" for v in students]
    lines += ["", f"Does the largest teacher give a better student than the smallest? **{larger}**. "
              f"Does stopping the large teacher early give a better student than the fully trained one? **{early}**. "
              "(The paper found neither a larger teacher nor full training to help on ImageNet, and early-stopped "
              "teachers to help.)"]
    # "bigger is not better" is a claim of no gain: it holds unless the largest teacher clearly wins
    no_gain = "not held" if larger == "held" else "held"
    summary = {"claim": "a larger teacher does not give a better student; an early-stopped teacher helps",
               "paper": "Cho & Hariharan 2019",
               "verdict": f"larger teacher no better: {no_gain}; early stopping helps: {early}",
               **{v: common.fmt(s) for v, s in students.items()}}
    common.write(FOLDER, "\n".join(lines), summary)
    return summary
