"""TAKD (Mirzadeh et al. 2020): teacher -> assistant -> student against distilling directly and no KD."""

import json
from pathlib import Path

import common

FOLDER = Path(__file__).resolve().parent


def chain_accuracy(result, stage: str) -> list[float]:
    """Last-epoch top-1 of one stage of the TAKD chain (the teacher, the assistant), per seed."""
    return [json.loads((Path(r.run_dir) / "state.json").read_text())["stages"][stage]["result"]["last_acc"]
            for r in common.rows_of(result, "TAKD")]


def main() -> dict:
    result = common.compare(FOLDER)
    nokd, blkd, takd = (common.last_accuracies(result, v) for v in ("NOKD", "BLKD", "TAKD"))
    teacher, assistant = chain_accuracy(result, "teacher"), chain_accuracy(result, "assistant")
    outcome = common.judge(result, "TAKD", "BLKD")
    markdown = (result.markdown() + "\n\nThe lines above name the final stage's teacher: for TAKD that is the "
                f"assistant. The chain's models, top-1 (last epoch): teacher {common.fmt(teacher)} (trained once, seed "
                f"0), assistant distilled from it {common.fmt(assistant)}, student alone (NOKD) {common.fmt(nokd)}.\n\n"
                f"Verdict (TAKD beats BLKD, last epoch): {common.said(outcome)}; {common.fmt(takd)} vs "
                f"{common.fmt(blkd)}. BLKD against NOKD: {common.said(common.judge(result, 'BLKD', 'NOKD'))}.")
    summary = {"claim": "distilling through a teacher assistant beats distilling from the teacher directly",
               "paper": "Mirzadeh et al. 2020", "verdict": outcome[0], "interval": str(outcome[1]),
               "nokd": common.fmt(nokd), "blkd": common.fmt(blkd), "takd": common.fmt(takd),
               "teacher": common.fmt(teacher), "assistant": common.fmt(assistant)}
    common.write(FOLDER, markdown, summary)
    return summary
