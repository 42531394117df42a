"""TAKD (Mirzadeh et al. 2020): teacher -> assistant -> student against distilling directly and no KD."""

from pathlib import Path

import common

FOLDER = Path(__file__).resolve().parent


def main() -> dict:
    result = common.compare(FOLDER)
    nokd, blkd, takd = (common.last_accuracies(result, v) for v in ("NOKD", "BLKD", "TAKD"))
    verdict = common.verdict(takd, blkd)
    markdown = (result.markdown() + f"\n\nVerdict (TAKD beats BLKD, last epoch): **{verdict}** ({common.fmt(takd)} vs "
                f"{common.fmt(blkd)}); BLKD against NOKD: {common.verdict(blkd, nokd)}.")
    summary = {"claim": "distilling through a teacher assistant beats distilling from the teacher directly",
               "paper": "Mirzadeh et al. 2020", "verdict": verdict, "nokd": common.fmt(nokd),
               "blkd": common.fmt(blkd), "takd": common.fmt(takd)}
    common.write(FOLDER, markdown, summary)
    return summary
