"""Every zoo method side by side on MNIST-1D (a 1-D CNN pair), ranked by last-epoch top-1."""

from pathlib import Path

import common

FOLDER = Path(__file__).resolve().parent
BASELINE = "student alone"
LOGIT_METHODS = {"KD", "logit MSE", "DKD", "DIST"}


def main() -> dict:
    result = common.compare(FOLDER)
    alone = common.last_accuracies(result, BASELINE)
    ranked = sorted(result.summaries, key=lambda s: s.last_mean, reverse=True)
    verdicts = {s.variant: common.verdict(common.last_accuracies(result, s.variant), alone)
                for s in ranked if s.variant != BASELINE}
    lines = [result.markdown(), "", "Ranked by last-epoch top-1 (verdict: beats the student alone beyond the noise?):", "",
             "| rank | method | top-1 last | beats the student alone? |", "|---|---|---|---|"]
    for rank, s in enumerate(ranked, 1):
        lines.append(f"| {rank} | {s.variant} | {s.last_mean:.2f} ± {s.last_std:.2f} | {verdicts.get(s.variant, '—')} |")
    held = sorted(v for v, verdict in verdicts.items() if verdict == "held")
    lost = sorted(v for v, verdict in verdicts.items() if verdict == "not held")
    lines += ["", f"{len(held)} of {len(verdicts)} methods beat the student alone beyond the noise"
              + (f" ({', '.join(held)})" if held else "") + "; "
              + (f"{len(lost)} did worse ({', '.join(lost)})." if lost else "none did worse."),
              f"Run time: {result.seconds / 60:.1f} min for {len(result.rows)} runs."]
    # the CRD paper's claim: CRD beats every other feature and relation method
    rivals = [s for s in ranked if s.variant not in LOGIT_METHODS | {BASELINE, "CRD"}]
    crd = common.last_accuracies(result, "CRD")
    against = {s.variant: common.verdict(crd, common.last_accuracies(result, s.variant)) for s in rivals}
    if all(v == "held" for v in against.values()):
        verdict = "held"
    elif any(v == "not held" for v in against.values()):
        verdict = "not held"
    else:
        verdict = "inconclusive (within noise)"
    beaten_by = [name for name, v in against.items() if v == "not held"]
    lines += ["", f"Verdict (CRD beats each other feature and relation method, last epoch): **{verdict}**"
              + (f"; {', '.join(beaten_by)} beat CRD beyond the noise." if beaten_by else ".")]
    summary = {"claim": "CRD beats the other feature and relation methods",
               "paper": "Tian et al. 2020 (CRD), Table 1", "verdict": verdict,
               "ranking": [s.variant for s in ranked], "held": held, "worse": lost}
    common.write(FOLDER, "\n".join(lines), summary)
    return summary
