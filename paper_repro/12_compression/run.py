"""Compression with the teacher in the loop (Mishra & Marr 2018; Polino et al. 2018; Zhu &
Gupta 2018), on digits and MNIST-1D: a teacher, the student alone, the KD student, its int8
post-training quantization, int8 quantization-aware training and two kinds of pruning, each
fine-tuned with the labels only or with the teacher distilling; accuracy as deployed (int8 as
ONNX Runtime runs it), parameters, file size and CPU latency."""

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import common
from featkd.bench.deploy import DeployRow
from featkd.bench.deploy import run as bench_deploy
from featkd.compare import ComparisonResult, RunRow, slug
from featkd.deploy.export import export

FOLDER = Path(__file__).resolve().parent
ALONE, KD = "student alone", "KD student"
PTQ = "KD student, int8 post-training"
COMPRESSIONS = ("int8 QAT", "50% channels pruned", "80% weights pruned")
CHANNELS_INT8 = "50% channels pruned + KD, int8 post-training"
#: post hoc (control.yaml): the KD student trained as long as the compression arms, uncompressed
CONTROL = "KD student, trained as long + KD"


@dataclass(frozen=True)
class Setting:
    """One dataset of the claim: its comparison files (fp32 arms, fine-tuning arms, control),
    the overrides that select it, and the compressions that apply to its models."""

    label: str
    files: tuple[str, str, str]
    overrides: tuple[str, ...] = ()
    compressions: tuple[str, ...] = COMPRESSIONS


SIGNALS = ("compare.yaml", "finetune.yaml", "control.yaml")
SETTINGS = {"digits": Setting("digits", SIGNALS, ("data.name=digits",)),
            "mnist1d": Setting("MNIST-1D", SIGNALS, ("data.name=mnist1d",)),
            # torch-pruning cannot cut the transformer's width: no channel pruning on text
            "text": Setting("generated sentiment (text)", ("compare_text.yaml", "finetune_text.yaml",
                                                           "control_text.yaml"),
                            compressions=("int8 QAT", "80% weights pruned"))}
INT8_ARMS = {"int8 QAT, labels only", "int8 QAT + KD", PTQ, CHANNELS_INT8}
#: "keeps the KD student's accuracy": its int8 or pruned version loses less than this many points
MARGIN = 0.5
HELPS = "the teacher in the loop beats fine-tuning on the labels"
KEPT = f"with the teacher, the KD student's accuracy is kept (within {MARGIN} points)"


def int8_correct(rows: list[RunRow], folder: Path) -> np.ndarray:
    """(seeds, test samples): 1 where the run's student, exported to ONNX and quantized to int8
    by ONNX Runtime (static, calibrated), classifies the test sample right."""
    correct = []
    for row in sorted(rows, key=lambda r: r.seed):
        done = export(row.run_dir, "onnx", "int8", out=folder / f"{slug(row.variant)}-seed{row.seed}",
                      measure=False)
        correct.append(done.outputs.correct())
    return np.stack(correct)


def costs(run_dir: str, rows: list[str]) -> list[DeployRow]:
    """`featkd bench deploy` on one run (one thread): the rows named ("teacher": the run's
    teacher), each with its ratios to that teacher, timed in the same loop."""
    measured = bench_deploy(run_dir, repeats=5 if common.SMOKE else 30, threads=1)
    teacher = measured[0]
    teacher.name = "teacher"
    return [r for r in measured if r.name in rows]


def dataset(name: str) -> tuple[list[str], dict]:
    """Every arm on one dataset: the table, the verdicts and the numbers for claim.json."""
    began = time.perf_counter()
    setting = SETTINGS[name]
    compressions, channels = setting.compressions, "50% channels pruned" in setting.compressions
    overrides = [*setting.overrides, f"output_dir={common.output_dir(FOLDER.name)}/{name}"]
    fp32, tuned, control = (common.compare(FOLDER, file, overrides) for file in setting.files)
    rows = fp32.rows + tuned.rows + control.rows
    arms = [ALONE, KD, PTQ] + [f"{c}{s}" for c in compressions for s in (", labels only", " + KD")] + \
        ([CHANNELS_INT8] if channels else []) + [CONTROL]
    with tempfile.TemporaryDirectory() as tmp:
        correct = {arm: common.correct_of(common.rows_of(rows, arm)) for arm in arms if arm not in INT8_ARMS}
        correct[PTQ] = int8_correct(common.rows_of(rows, KD), Path(tmp))
        if channels:
            correct[CHANNELS_INT8] = int8_correct(common.rows_of(rows, "50% channels pruned + KD"), Path(tmp))
        for arm in ("int8 QAT, labels only", "int8 QAT + KD"):
            correct[arm] = int8_correct(common.rows_of(rows, arm), Path(tmp))
    versus_kd = {arm: common.judge_correct(correct[arm], correct[KD]) for arm in arms if arm != KD}
    verdicts = {}
    for compression in compressions:
        with_kd, without = f"{compression} + KD", f"{compression}, labels only"
        verdicts[f"{compression}: {HELPS}"] = \
            common.judge_correct(correct[with_kd], correct[without])
        verdicts[f"{compression}: {KEPT}"] = \
            common.judge_correct(correct[KD], correct[with_kd], claim="no better", margin=MARGIN)
    verdicts["KD student beats the student alone (fp32)"] = common.judge_correct(correct[KD], correct[ALONE])
    verdicts["int8 post-training loses accuracy against the fp32 KD student"] = \
        common.judge_correct(correct[KD], correct[PTQ])
    post_hoc = {f"{c}: with the teacher, the accuracy of the KD student trained as long is kept (within {MARGIN} "
                "points)": common.judge_correct(correct[CONTROL], correct[f"{c} + KD"], claim="no better", margin=MARGIN)
                for c in compressions}

    teacher = teacher_accuracy(fp32)
    seeds = ", ".join(str(r.seed) for r in sorted(common.rows_of(rows, KD), key=lambda r: r.seed))
    lines = [f"### {setting.label}", "",
             f"Teacher: {teacher:.2f}% top-1 (trained once, seed 0). Test top-1 of each arm as deployed (int8 arms: "
             f"the ONNX Runtime int8 model), mean ± std over seeds {seeds}, last epoch; *best*: the epoch best on the "
             "validation split, as evaluated in training (int8 simulated for QAT; none for post-training). Δ: "
             "difference from the fp32 KD student with its paired 95% bootstrap interval.", "",
             "| arm | as deployed | top-1 last | top-1 best | Δ vs KD student [95% CI] | fine-tuning lr |",
             "|---|---|---|---|---|---|"]
    chosen = {**tuned.chosen, **control.chosen}
    for arm in arms:
        accuracies = 100 * correct[arm].mean(1)
        arm_rows = common.rows_of(rows, arm)
        best = common.fmt([r.best_acc for r in arm_rows]) if arm_rows else "—"
        delta = "—" if arm == KD else str(versus_kd[arm][1])
        lr = next(iter(chosen[arm].values())) if arm in chosen else "—"
        lines.append(f"| {arm} | {'int8 (ONNX Runtime)' if arm in INT8_ARMS else 'fp32 (PyTorch)'} | "
                     f"{common.fmt(accuracies)} | {best} | {delta} | {lr} |")
    sparsity = weight_sparsity(common.rows_of(rows, "80% weights pruned + KD"))
    lines += ["", "Verdicts (last epoch, paired by seed):", ""]
    lines += [f"- {claim}: {common.said(outcome)}" for claim, outcome in verdicts.items()]
    lines += ["", f"Post hoc, against the control arm ({CONTROL}):", ""]
    lines += [f"- {claim}: {common.said(outcome)}" for claim, outcome in post_hoc.items()]
    lines += ["", cost_table(rows, sparsity), "", selection_lines(tuned), "", selection_lines(control), "",
              f"Run time: {(time.perf_counter() - began) / 60:.1f} min."]
    summary = {"teacher": f"{teacher:.2f}", **{arm: common.fmt(100 * correct[arm].mean(1)) for arm in arms},
               "intervals": {claim: str(o[1]) for claim, o in verdicts.items()},
               "verdicts": {claim: o[0] for claim, o in verdicts.items()},
               "post hoc": {claim: f"{o[0]} ({o[1]})" for claim, o in post_hoc.items()},
               "fine-tuning lr": {arm: next(iter(point.values())) for arm, point in chosen.items()}}
    return lines, summary


def teacher_accuracy(result: ComparisonResult) -> float:
    state = json.loads((Path(common.rows_of(result, KD)[0].run_dir) / "state.json").read_text())
    return state["stages"]["teacher"]["result"]["last_acc"]


def weight_sparsity(rows: list[RunRow]) -> float:
    """The share of zero conv and linear weights in the magnitude-pruned students (seed 0's)."""
    from featkd.deploy.export import load_student
    from featkd.deploy.prune import weight_sparsity as sparsity_of

    return sparsity_of(load_student(sorted(rows, key=lambda r: r.seed)[0].run_dir).model)


def cost_table(rows: list[RunRow], sparsity: float) -> str:
    """Sizes and latencies of seed 0's models: teacher, KD student (PyTorch, ONNX fp32, ONNX
    int8) and, where channels were pruned, the channel-pruned KD student (ONNX fp32 and int8)."""
    kd_run = min(common.rows_of(rows, KD), key=lambda r: r.seed).run_dir
    dense = costs(kd_run, ["teacher", "student", "student, ONNX fp32", "student, ONNX int8"])
    pruned_rows = common.rows_of(rows, "50% channels pruned + KD")
    pruned = costs(min(pruned_rows, key=lambda r: r.seed).run_dir, ["student, ONNX fp32", "student, ONNX int8"]) \
        if pruned_rows else []
    labels = {("dense", "teacher"): "teacher (PyTorch)", ("dense", "student"): "KD student (PyTorch)",
              ("dense", "student, ONNX fp32"): "KD student, ONNX fp32 (also the 80%-pruned students: dense zeros)",
              ("dense", "student, ONNX int8"): "KD student, ONNX int8 (also the QAT students)",
              ("pruned", "student, ONNX fp32"): "50% channels pruned + KD, ONNX fp32",
              ("pruned", "student, ONNX int8"): "50% channels pruned + KD, ONNX int8"}
    lines = ["Costs of seed 0's models on the CPU, one thread: file size and median latency of 30 calls on the "
             "first test inputs; × = the teacher's over this one's, the teacher timed in the same loop "
             "(`featkd bench deploy`).", "",
             "| model | parameters | multiply-adds | file | batch 1 | batch 32 | smaller | faster, b1 | faster, b32 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for group, kept in (("dense", dense), ("pruned", pruned)):
        for row in kept:
            fp, ratio = row.footprint, row.vs_teacher
            lat = {x.batch: x.median_ms for x in fp.latency}
            lines.append(f"| {labels[group, row.name]} | {fp.parameters:,} | {fp.multiply_adds / 1e6:.3f}M | "
                         f"{fp.file_bytes / 1e3:.1f} kB | {lat[1]:.3f} ms | {lat[32]:.3f} ms | "
                         f"{_inverse(ratio.get('file_mb'))} | {_inverse(ratio.get('latency_b1_median_ms'))} | "
                         f"{_inverse(ratio.get('latency_b32_median_ms'))} |")
    lines += ["", f"The 80%-pruned students hold {100 * sparsity:.1f}% zero conv and linear weights (seed 0): stored "
                  "and run densely they are no smaller or faster; a sparse format or kernel would be needed."]
    return "\n".join(lines)


def _inverse(ratio: float | None) -> str:
    return "—" if not ratio else f"{1 / ratio:.1f}x"


def selection_lines(result: ComparisonResult) -> str:
    return result.markdown().split("\n\n", 2)[-1] if result.chosen else ""


def main() -> dict:
    lines, summaries = [], {}
    # a smoke run checks the code once per kind of setting
    for name in ("digits", "text") if common.SMOKE else SETTINGS:
        table, summaries[name] = dataset(name)
        lines += table + [""]

    def per_compression(claim: str) -> str:
        return ", ".join(f"{SETTINGS[name].label} " + "/".join(s["verdicts"].get(f"{c}: {claim}", "—")
                                                               for c in COMPRESSIONS)
                         for name, s in summaries.items())

    verdict = f"teacher helps ({' / '.join(COMPRESSIONS)}): {per_compression(HELPS)}; KD student's accuracy kept: " \
              f"{per_compression(KEPT)}"
    summary = {"claim": "distillation recovers the accuracy that int8 quantization and pruning lose",
               "paper": "Mishra & Marr 2018; Polino et al. 2018; Zhu & Gupta 2018",
               "verdict": verdict, **summaries}
    common.write(FOLDER, "\n".join(lines), summary)
    return summary
