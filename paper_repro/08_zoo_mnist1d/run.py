"""Every zoo method that applies to 1-D signals side by side on MNIST-1D (a 1-D CNN pair), ranked by
last-epoch top-1; the claim is CRD against the feature and relation methods of its Table 1."""

from pathlib import Path

import common

FOLDER = Path(__file__).resolve().parent
BASELINE = "student alone"
#: CRD's rivals in its Table 1: the other feature and relation methods. The methods added to the
#: zoo since are ranked with the rest but are not part of the claim.
RIVALS = ("FitNets", "AT", "NST", "VID", "FT", "AB", "FSP", "SP", "RKD", "CC", "PKT")


def main() -> dict:
    result = common.compare(FOLDER)
    ranked = sorted(result.summaries, key=lambda s: s.last_mean, reverse=True)
    against_alone = {s.variant: common.judge(result, s.variant, BASELINE) for s in ranked if s.variant != BASELINE}
    lines = [result.markdown(), "", "Ranked by last-epoch top-1 (verdict: beats the student alone? Δ with its 95% "
             "interval):", "", "| rank | method | top-1 last | beats the student alone? |", "|---|---|---|---|"]
    for rank, s in enumerate(ranked, 1):
        outcome = against_alone.get(s.variant)
        lines.append(f"| {rank} | {s.variant} | {s.last_mean:.2f} ± {s.last_std:.2f} | "
                     f"{f'{outcome[0]} ({outcome[1]})' if outcome else '—'} |")
    held = sorted(v for v, (label, _) in against_alone.items() if label == "held")
    lost = sorted(v for v, (label, _) in against_alone.items() if label == "not held")
    lines += ["", f"{len(held)} of {len(against_alone)} methods beat the student alone"
              + (f" ({', '.join(held)})" if held else "") + "; "
              + (f"{len(lost)} did not ({', '.join(lost)})." if lost else "none is shown not to."),
              f"Run time: {result.seconds / 60:.1f} min for {len(result.rows)} runs."]
    # the CRD paper's claim: CRD beats every other feature and relation method
    rivals = [s.variant for s in ranked if s.variant in RIVALS]
    missing = set(RIVALS) - set(rivals)
    if missing:
        raise ValueError(f"compare.yaml lacks CRD's rivals {sorted(missing)}")
    against = {rival: common.judge(result, "CRD", rival) for rival in rivals}
    labels = [label for label, _ in against.values()]
    verdict = "held" if all(v == "held" for v in labels) else "not held" if "not held" in labels else "inconclusive"
    lines += ["", "CRD against each other feature and relation method (Δ = CRD - method, 95% interval):", "",
              "| method | Δ | CRD better? |", "|---|---|---|"]
    lines += [f"| {rival} | {interval} | {label} |" for rival, (label, interval) in against.items()]
    lines += ["", f"Verdict (CRD beats each other feature and relation method, last epoch): **{verdict}**."]
    summary = {"claim": "CRD beats the other feature and relation methods",
               "paper": "Tian et al. 2020 (CRD), Table 1", "verdict": verdict,
               "interval": {rival: str(interval) for rival, (_, interval) in against.items()},
               "ranking": [s.variant for s in ranked], "held": held, "not_held": lost}
    common.write(FOLDER, "\n".join(lines), summary)
    return summary
