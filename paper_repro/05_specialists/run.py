"""Hinton section 5: a generalist plus specialists on its confusable classes, and their distillation."""

import json
from pathlib import Path

import common
from featkd.trainer import train

FOLDER = Path(__file__).resolve().parent


def main() -> dict:
    generalist, combined, distilled, alone, clusters = [], [], [], [], []
    for seed in common.seeds():
        overrides = [f"seed={seed}", f"output_dir={common.output_dir(FOLDER.name)}", "logger=none",
                     f"stages.0.seed={seed}"]
        run = train(common.config(FOLDER / "specialists.yaml", overrides), verbose=False)
        state = json.loads((run.run_dir / "state.json").read_text())["stages"]
        generalist.append(state["specialists"]["generalist_acc"])
        combined.append(run.stages["specialists"].last_acc)
        distilled.append(run.student.last_acc)
        clusters.append(state["specialists"]["clusters"])
        # the same student trained alone, for reference
        solo = train(common.config(FOLDER / "specialists.yaml", overrides + [
            "stages=[{name: alone, model: student, loss: {ce: {weight: 1.0}}, train: {epochs: 30, "
            "optimizer: {name: sgd, lr: 0.05, momentum: 0.9, weight_decay: 5.0e-4}, scheduler: {name: cosine}}}]"]),
            verbose=False)
        alone.append(solo.student.last_acc)
        print(f"seed {seed}: generalist {generalist[-1]:.2f} + specialists {combined[-1]:.2f} distilled "
              f"{distilled[-1]:.2f} alone {alone[-1]:.2f} clusters {clusters[-1]}", flush=True)
    verdict = common.verdict(combined, generalist)
    lines = [
        "Test top-1 (%) on MNIST-1D's 1,000 test signals, mean ± std over seeds 0, 1, 2 (last epoch of each model).",
        "",
        "| model | top-1 |",
        "|---|---|",
        f"| generalist | {common.fmt(generalist)} |",
        f"| generalist + specialists (combined as in the paper) | {common.fmt(combined)} |",
        f"| one model distilled from the combination | {common.fmt(distilled)} |",
        f"| the same model trained alone | {common.fmt(alone)} |",
        "",
        "Clusters found from the generalist's predictions, per seed: " + "; ".join(str(c) for c in clusters) + ".",
        "",
        f"Verdict (generalist + specialists beat the generalist): **{verdict}**. Distilling the combination "
        f"into one model: {common.verdict(distilled, alone)} against the same model trained alone.",
    ]
    summary = {"claim": "specialists on the generalist's confusable classes improve on the generalist",
               "paper": "Hinton et al. 2015, §5", "verdict": verdict, "generalist": common.fmt(generalist),
               "combined": common.fmt(combined), "distilled": common.fmt(distilled), "alone": common.fmt(alone)}
    common.write(FOLDER, "\n".join(lines), summary)
    return summary
