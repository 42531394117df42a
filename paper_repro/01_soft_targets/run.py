"""Hinton section 3: soft targets from a regularised teacher against hard labels, T from 1 to 20."""

from pathlib import Path

import common

FOLDER = Path(__file__).resolve().parent


def main() -> dict:
    result = common.compare(FOLDER)
    hard = common.last_accuracies(result, "hard labels")
    kd20 = common.last_accuracies(result, "KD T=20")
    best = max((s for s in result.summaries if s.variant != "hard labels"), key=lambda s: s.last_mean)
    outcome = common.judge(result, "KD T=20", "hard labels")
    markdown = (result.markdown() + f"\n\nVerdict on the paper's setting (T = 20 beats hard labels, last epoch): "
                f"{common.said(outcome)}; {common.fmt(kd20)} vs {common.fmt(hard)}. Best temperature here: "
                f"{best.variant} ({best.last_mean:.2f} ± {best.last_std:.2f}).")
    summary = {"claim": "soft targets from a regularised teacher beat hard labels for an unregularised student",
               "paper": "Hinton et al. 2015, §3", "verdict": outcome[0], "interval": str(outcome[1]),
               "hard_labels": common.fmt(hard), "kd_t20": common.fmt(kd20), "best": best.variant}
    common.write(FOLDER, markdown, summary)
    return summary
