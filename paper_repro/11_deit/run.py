"""DeiT (Touvron et al. 2021) on digits: a tiny ViT alone, with soft or hard distillation on its
class token, and through a distillation token."""

import json
from pathlib import Path

import common

FOLDER = Path(__file__).resolve().parent
ALONE, SOFT, HARD, TOKEN = "ViT alone", "soft (class token)", "hard (class token)", "distillation token (hard)"


def main() -> dict:
    result = common.compare(FOLDER)
    state = json.loads((Path(common.rows_of(result, TOKEN)[0].run_dir) / "state.json").read_text())
    teacher_acc = state["stages"]["teacher"]["result"]["last_acc"]
    outcomes = {"distillation token beats the ViT alone": common.judge(result, TOKEN, ALONE),
                "hard beats soft distillation": common.judge(result, HARD, SOFT),
                "the distillation token beats hard distillation on the class token": common.judge(result, TOKEN, HARD)}
    lines = [result.markdown(), "", f"Teacher: cnn_large, {teacher_acc:.2f}% top-1 (trained once, seed 0).", "",
             "Verdicts (last epoch, paired by seed):", ""]
    lines += [f"- {claim}: {common.said(outcome)}" for claim, outcome in outcomes.items()]
    summary = {"claim": "distillation through a distillation token beats the ViT alone, and hard labels beat soft",
               "paper": "Touvron et al. 2021 (DeiT), Table 3",
               "verdict": "; ".join(f"{claim}: {o[0]}" for claim, o in
                                    zip(("token vs alone", "hard vs soft", "token vs hard"), outcomes.values())),
               "intervals": {claim: str(o[1]) for claim, o in outcomes.items()},
               "teacher": f"{teacher_acc:.2f}",
               **{arm: common.fmt(common.last_accuracies(result, arm)) for arm in (ALONE, SOFT, HARD, TOKEN)}}
    common.write(FOLDER, "\n".join(lines), summary)
    return summary
