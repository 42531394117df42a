"""DistilBERT (Sanh et al. 2019) at small scale: the triple loss and its ablations, and what
the student retains of the teacher for its size and speed."""

import json
from pathlib import Path

import common
from featkd.config import load_config
from featkd.data import build_data
from featkd.models import build_model, count_parameters

FOLDER = Path(__file__).resolve().parent
ABLATIONS = ("without cosine", "without soft targets", "random initialisation")


def inference_speedup() -> tuple[float, float, int, int]:
    """Teacher and student forward times (ms, median of 20, batch 32 of 32 tokens, CPU) and sizes."""
    config = load_config(FOLDER / "base.yaml")
    bundle = build_data(config.data.name, {**config.data.args, "train_size": 2, "test_size": 2, "validation_size": 0})
    teacher, student = (build_model(spec.model, bundle.num_classes, bundle.input_shape, spec.args, text=bundle.text)
                        for spec in (config.teacher[0], config.student))
    times = common.forward_ms({"teacher": teacher, "student": student}, bundle.text.example(32))
    return times["teacher"], times["student"], count_parameters(teacher), count_parameters(student)


def main() -> dict:
    result = common.compare(FOLDER)
    triple = common.last_accuracies(result, "triple loss")
    teacher = json.loads((Path(common.rows_of(result, "triple loss")[0].run_dir) / "state.json").read_text())
    teacher_acc = teacher["stages"]["teacher"]["result"]["last_acc"]
    outcomes = {arm: common.judge(result, "triple loss", arm) for arm in ABLATIONS}
    teacher_ms, student_ms, teacher_params, student_params = inference_speedup()
    mean = sum(triple) / len(triple)
    verdicts = "; ".join(f"triple loss vs {arm}: {common.said(o)}" for arm, o in outcomes.items())
    markdown = (result.markdown() + "\n\n"
                f"Accuracy is on the masked tokens of the test sentences. Verdicts (the triple loss beats each "
                f"ablation, last epoch): {verdicts}.\n\n"
                f"Retained: the student keeps {100 * mean / teacher_acc:.1f}% of the teacher's masked-token accuracy "
                f"({mean:.2f} of {teacher_acc:.2f}) with {student_params:,} parameters against {teacher_params:,} "
                f"({100 * (1 - student_params / teacher_params):.0f}% fewer) and a forward {teacher_ms / student_ms:.2f}x "
                f"as fast ({student_ms:.1f} ms against {teacher_ms:.1f} ms for 32 sequences of 32 tokens on this CPU, "
                "median of 20).")
    summary = {"claim": "each part of DistilBERT's triple loss and its initialisation from the teacher helps the student",
               "paper": "Sanh et al. 2019, Table 4",
               "verdict": ", ".join(f"{arm}: {o[0]}" for arm, o in outcomes.items()),
               "intervals": {arm: str(o[1]) for arm, o in outcomes.items()},
               "triple": common.fmt(triple), "teacher": f"{teacher_acc:.2f}",
               "retained_percent": round(100 * mean / teacher_acc, 1),
               "parameters": [teacher_params, student_params],
               "forward_ms": [round(teacher_ms, 1), round(student_ms, 1)]}
    common.write(FOLDER, markdown, summary)
    return summary
