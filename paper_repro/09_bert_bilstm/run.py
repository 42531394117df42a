"""Tang et al. 2019 at small scale: a transformer teacher, a BiLSTM alone, and the BiLSTM
distilled by logit regression on the training sentences and on an augmented transfer set;
parameters and measured CPU inference speed next to accuracy."""

import json
from pathlib import Path

import common
from featkd.config import load_config
from featkd.data import build_data, collate_of
from featkd.models import build_model, count_parameters

FOLDER = Path(__file__).resolve().parent
ALONE, DISTILLED, TRANSFER = "BiLSTM alone", "BiLSTM distilled", "BiLSTM distilled, transfer set"


def sizes_and_speed() -> dict[str, dict[str, float]]:
    """Parameters of teacher and student, and their median CPU forward times on the first 32
    test sentences as one batch and on one sentence at a time (weights do not change the time)."""
    config = load_config(FOLDER / "base.yaml")
    bundle = build_data(config.data.name, config.data.args)
    models = {role: build_model(spec.model, bundle.num_classes, bundle.input_shape, spec.args, text=bundle.text)
              for role, spec in (("teacher", config.teacher[0]), ("student", config.student))}
    batch, _ = collate_of(bundle.test)([bundle.test[i] for i in range(32)])
    one, _ = collate_of(bundle.test)([bundle.test[0]])
    return {"parameters": {role: count_parameters(m) for role, m in models.items()},
            "batch_ms": common.forward_ms(models, batch), "one_ms": common.forward_ms(models, one, repeats=100)}


def main() -> dict:
    result = common.compare(FOLDER)
    state = json.loads((Path(common.rows_of(result, DISTILLED)[0].run_dir) / "state.json").read_text())
    teacher_acc = state["stages"]["teacher"]["result"]["last_acc"]
    alone = common.last_accuracies(result, ALONE)
    outcomes = {"distilled beats alone": common.judge(result, DISTILLED, ALONE),
                "the transfer set beats distilling on the training sentences": common.judge(result, TRANSFER, DISTILLED),
                "distilled on the transfer set beats alone": common.judge(result, TRANSFER, ALONE)}
    measured = sizes_and_speed()
    params, batch_ms, one_ms = measured["parameters"], measured["batch_ms"], measured["one_ms"]
    above = sum(teacher_acc > a for a in alone)
    lines = [result.markdown(), "",
             f"Teacher: the transformer, {teacher_acc:.2f}% top-1 (trained once, seed 0), above the BiLSTM alone on "
             f"{above} of {len(alone)} seeds ({common.fmt(alone)}).", "",
             "| model | parameters | forward, 32 test sentences | forward, one sentence |", "|---|---|---|---|"]
    lines += [f"| {role} | {params[role]:,} | {batch_ms[role]:.2f} ms | {one_ms[role]:.2f} ms |"
              for role in ("teacher", "student")]
    lines += ["", f"The BiLSTM has {params['teacher'] / params['student']:.1f}x fewer parameters and its forward is "
                  f"{batch_ms['teacher'] / batch_ms['student']:.1f}x as fast on a batch of 32 and "
                  f"{one_ms['teacher'] / one_ms['student']:.1f}x on one sentence (on the CPU, "
                  "median of 20 and 100 calls, the two models taking turns).", "",
              "Verdicts (last epoch, paired by seed):", ""]
    lines += [f"- {claim}: {common.said(outcome)}" for claim, outcome in outcomes.items()]
    summary = {"claim": "a BiLSTM distilled from a transformer beats the BiLSTM alone, more so on an augmented "
                        "transfer set, at a fraction of the size and time",
               "paper": "Tang et al. 2019, Table 1",
               "verdict": "; ".join(f"{short}: {o[0]}" for short, o in
                                    zip(("distilled vs alone", "transfer set vs distilled", "transfer set vs alone"),
                                        outcomes.values())),
               "intervals": {claim: str(o[1]) for claim, o in outcomes.items()},
               "teacher": f"{teacher_acc:.2f}",
               **{arm: common.fmt(common.last_accuracies(result, arm)) for arm in (ALONE, DISTILLED, TRANSFER)},
               "parameters": params, "batch_ms": {k: round(v, 3) for k, v in batch_ms.items()},
               "one_ms": {k: round(v, 3) for k, v in one_ms.items()}}
    common.write(FOLDER, "\n".join(lines), summary)
    return summary
