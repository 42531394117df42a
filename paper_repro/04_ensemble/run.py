"""Hinton et al. 2015: an ensemble of teachers distilled into one student, against one teacher."""

import json
from pathlib import Path

import common
import torch
from featkd.checkpoint import load_checkpoint
from featkd.data import build_data
from featkd.models import build_model

FOLDER = Path(__file__).resolve().parent


@torch.no_grad()
def ensemble_accuracy(run_dir: Path) -> tuple[float, int]:
    """Top-1 of the averaged probabilities of the teachers of one ensemble run."""
    data = build_data("digits")
    probs = 0
    stages = json.loads((run_dir / "state.json").read_text())["stages"]
    paths = [run_dir / v["checkpoint"] for k, v in stages.items() if k.startswith("teacher")]  # relative to the run
    for path in paths:
        payload = load_checkpoint(path)
        model = build_model(payload["model_name"], payload["num_classes"], payload["input_shape"])
        model.load_state_dict(payload["model"])
        probs = probs + torch.softmax(model.eval()(data.test.inputs), 1)
    return 100.0 * (probs.argmax(1) == data.test.targets).float().mean().item(), len(paths)


def main() -> dict:
    result = common.compare(FOLDER)
    one = common.last_accuracies(result, "one teacher")
    many = common.last_accuracies(result, "ensemble of 5 teachers")
    acc, count = ensemble_accuracy(Path(next(r.run_dir for r in result.rows if r.variant == "ensemble of 5 teachers")))
    outcome = common.judge(result, "ensemble of 5 teachers", "one teacher")
    markdown = (result.markdown() + f"\n\nThe {count} teachers' averaged prediction scores {acc:.2f}% top-1 on the "
                f"test set. Verdict (distilling the ensemble beats distilling one teacher, last epoch): "
                f"{common.said(outcome)}; {common.fmt(many)} vs {common.fmt(one)}.")
    summary = {"claim": "a student distilled from an ensemble beats one distilled from a single teacher",
               "paper": "Hinton et al. 2015, §1 and §5", "verdict": outcome[0], "interval": str(outcome[1]),
               "one": common.fmt(one), "ensemble": common.fmt(many)}
    common.write(FOLDER, markdown, summary)
    return summary
