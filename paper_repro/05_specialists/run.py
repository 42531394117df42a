"""Hinton section 5: a generalist plus specialists on its confusable classes, and their distillation."""

import json
from pathlib import Path

import numpy as np
import torch

import common
from featkd import specialists as sp
from featkd.checkpoint import load_checkpoint
from featkd.data import build_data, eval_loader
from featkd.evaluation import evaluate
from featkd.stats import bootstrap_difference, verdict
from featkd.summary import test_correct
from featkd.trainer import build_from, train

FOLDER = Path(__file__).resolve().parent


def generalist_and_combination(run, config) -> tuple[np.ndarray, np.ndarray]:
    """Which test signals the run's generalist, and its combination with the specialists, get right."""
    bundle = build_data(config.data.name, config.data.args)
    generalist = build_from(config.models["generalist"], bundle)
    generalist.load_state_dict(load_checkpoint(run.run_dir / "checkpoints" / "generalist-last.pt")["model"])
    stage = next(s for s in config.stages if s.name == "specialists")
    combined = sp.load_specialists(load_checkpoint(run.run_dir / "checkpoints" / "specialists-last.pt"), generalist,
                                   stage.specialists, torch.device("cpu"))
    loader = eval_loader(bundle.test, config.data)
    correct = []
    for model in (generalist, combined):
        result = evaluate(model, loader, torch.device("cpu"), keep_predictions=True)
        correct.append((result["predictions"] == result["targets"]).numpy())
    return correct[0], correct[1]


def main() -> dict:
    accuracy = {k: [] for k in ("generalist", "combined", "distilled", "alone")}
    correct = {k: [] for k in accuracy}
    clusters = []
    for seed in common.seeds():
        overrides = [f"seed={seed}", f"output_dir={common.output_dir(FOLDER.name)}", "logger=none",
                     f"stages.0.seed={seed}"]
        config = common.config(FOLDER / "specialists.yaml", overrides)
        run = train(config, verbose=False)
        state = json.loads((run.run_dir / "state.json").read_text())["stages"]
        general, combined = generalist_and_combination(run, config)
        # the same student trained alone, for reference
        solo = train(common.config(FOLDER / "specialists.yaml", overrides + [
            "stages=[{name: alone, model: student, loss: {ce: {weight: 1.0}}, train: {epochs: 30, "
            "optimizer: {name: sgd, lr: 0.05, momentum: 0.9, weight_decay: 5.0e-4}, scheduler: {name: cosine}}}]"]),
            verbose=False)
        for name, right in (("generalist", general), ("combined", combined),
                            ("distilled", test_correct(run.run_dir).numpy()), ("alone", test_correct(solo.run_dir).numpy())):
            correct[name].append(right)
            accuracy[name].append(100 * float(right.mean()))
        clusters.append(state["specialists"]["clusters"])
        print(f"seed {seed}: " + " ".join(f"{k} {v[-1]:.2f}" for k, v in accuracy.items()) + f" clusters {clusters[-1]}",
              flush=True)

    def judged(a: str, b: str) -> tuple[str, object]:
        interval = bootstrap_difference(np.stack(correct[a]), np.stack(correct[b]), paired=True)
        return verdict(interval), interval

    outcome, distilling = judged("combined", "generalist"), judged("distilled", "alone")
    seeds = ", ".join(map(str, common.seeds()))
    lines = [
        f"Test top-1 (%) on MNIST-1D's 1,000 test signals, mean ± std over seeds {seeds} (last epoch of each model).",
        "",
        "| model | top-1 |",
        "|---|---|",
        f"| generalist | {common.fmt(accuracy['generalist'])} |",
        f"| generalist + specialists (combined as in the paper) | {common.fmt(accuracy['combined'])} |",
        f"| one model distilled from the combination | {common.fmt(accuracy['distilled'])} |",
        f"| the same model trained alone | {common.fmt(accuracy['alone'])} |",
        "",
        "Clusters found from the generalist's predictions, per seed: " + "; ".join(str(c) for c in clusters) + ".",
        "",
        f"Verdict (generalist + specialists beat the generalist; Δ paired by seed and test signal): "
        f"{common.said(outcome)}. Distilling the combination into one model, against the same model trained "
        f"alone: {common.said(distilling)}.",
    ]
    summary = {"claim": "specialists on the generalist's confusable classes improve on the generalist",
               "paper": "Hinton et al. 2015, §5", "verdict": outcome[0], "interval": str(outcome[1]),
               **{k: common.fmt(v) for k, v in accuracy.items()}, "clusters": clusters}
    common.write(FOLDER, "\n".join(lines), summary)
    return summary
