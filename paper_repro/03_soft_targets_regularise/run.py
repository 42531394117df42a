"""Hinton section 4: with 5% of the data, soft targets from a full-data teacher against hard targets."""

from pathlib import Path

import common

FOLDER = Path(__file__).resolve().parent


def main() -> dict:
    result = common.compare(FOLDER)
    hard = common.last_accuracies(result, "hard targets, 5%")
    soft = common.last_accuracies(result, "soft targets, 5%")
    full = common.last_accuracies(result, "hard targets, all data")
    outcome = common.judge(result, "soft targets, 5%", "hard targets, 5%")
    recovered = (common.mean_std(soft)[0] - common.mean_std(hard)[0]) / max(
        1e-9, common.mean_std(full)[0] - common.mean_std(hard)[0])
    markdown = (result.markdown() + f"\n\nVerdict (soft targets beat hard targets on 5% of the data, last epoch): "
                f"{common.said(outcome)}; {common.fmt(soft)} vs {common.fmt(hard)}. Soft targets recover "
                f"{100 * recovered:.0f}% of the gap to the same model trained on all the data ({common.fmt(full)}).")
    summary = {"claim": "on 5% of the data, soft targets from a teacher trained on all of it beat hard targets",
               "paper": "Hinton et al. 2015, §4", "verdict": outcome[0], "interval": str(outcome[1]),
               "hard": common.fmt(hard), "soft": common.fmt(soft), "all_data": common.fmt(full),
               "chosen": {v: c for v, c in result.chosen.items()}}
    common.write(FOLDER, markdown, summary)
    return summary
