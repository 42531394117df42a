"""`featkd bench deploy RUN_DIR`: the run's teacher, its fp32 student and the student's exports
(ONNX fp32, ONNX int8, TorchScript) side by side: test top-1, parameters, multiply-adds, file
size and CPU latency at batch 1 and 32 (median and 90th percentile), and each one's ratio to
the teacher. Every model is timed in the same loop, taking turns call by call, on the first
test inputs; exports that fail are listed with the reason.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from featkd.capture import call_model
from featkd.data import eval_loader
from featkd.deploy.export import Quantization, export, load_student, numpy_inputs, run_teachers
from featkd.deploy.footprint import Footprint, Latency, busy_note, ratios, time_calls, weights_bytes
from featkd.deploy.predict import Runner
from featkd.errors import ExportError
from featkd.evaluation import evaluate, multiply_adds
from featkd.models import count_parameters

#: the exports compared: (label, format, quantization)
VARIANTS = (("ONNX fp32", "onnx", None), ("ONNX int8", "onnx", "int8"), ("TorchScript", "torchscript", None))


@dataclass
class DeployRow:
    """One model of the table."""

    name: str
    runtime: str
    top1: float | None
    footprint: Footprint
    #: this row / the first teacher's, for size and latency
    vs_teacher: dict[str, float] = field(default_factory=dict)
    note: str = ""


def run(run_dir: str | Path, batch_sizes: tuple[int, ...] = (1, 32), repeats: int = 30,
        threads: int | None = None) -> list[DeployRow]:
    student = load_student(run_dir)
    if student.run_dir is None:
        raise ExportError(f"{str(run_dir)!r}: `featkd bench deploy` compares a run's models; give its run folder.")
    teachers = run_teachers(student)
    loader = eval_loader(student.bundle.test, student.config.data)
    example = student.example(1)
    inputs = {b: student.example(b) for b in batch_sizes}
    cpu = torch.device("cpu")
    rows: list[DeployRow] = []
    calls: dict[str, dict[int, Any]] = {}
    for name, model in [*teachers, ("student", student.model)]:
        rows.append(DeployRow(name, "PyTorch fp32", evaluate(model, loader, cpu)["acc"],
                              Footprint(count_parameters(model), multiply_adds(model, example, cpu),
                                        weights_bytes(model))))
        model.eval()
        calls[name] = {b: (lambda m=model, x=x: call_model(m, x)) for b, x in inputs.items()}
    student_row = rows[-1]
    with tempfile.TemporaryDirectory() as tmp:
        runners = {}
        for label, fmt, quantize in VARIANTS:
            try:
                done = export(student.checkpoint, fmt, quantize, out=Path(tmp) / label.replace(" ", "-"),
                              measure=False, threads=threads)
            except ExportError as exc:
                rows.append(DeployRow(f"student, {label}", "-", None, Footprint(), note=str(exc)))
                continue
            runner = Runner(done.folder, done.card, threads)
            runners[label] = runner
            size = sum(p.stat().st_size for p in done.folder.iterdir() if p.name.startswith("model"))
            note = "" if quantize is None else _describe(done.card["quantization"])
            if not done.passed:
                note = (f"fp32 parity failed: |logit| differs by up to {done.parity['max_abs_logit_difference']:.2e}; "
                        + note)
            rows.append(DeployRow(f"student, {label}", "ONNX Runtime" if fmt == "onnx" else "TorchScript",
                                  done.parity["exported_top1"],
                                  Footprint(student_row.footprint.parameters, student_row.footprint.multiply_adds,
                                            size), note=note))
            calls[f"student, {label}"] = {b: (lambda r=runner, x=numpy_inputs(x, runner.names): r.logits(x))
                                          for b, x in inputs.items()}
        timed = time_calls(calls, repeats, threads=threads)
    for row in rows:
        row.footprint.latency = timed.get(row.name, [])
        if (busy := busy_note(row.footprint.latency)) is not None:
            row.footprint.notes.append(busy)
    if teachers:
        reference = rows[0].footprint
        for row in rows:
            row.vs_teacher = ratios(row.footprint, reference)
    return rows


def _describe(quantization: dict[str, Any] | None) -> str:
    if not quantization:
        return ""
    return Quantization(quantization["method"], quantization["int8"], quantization["fp32"]).describe()


def report(rows: list[DeployRow], settings: dict[str, Any]) -> None:
    batches = settings["batch_sizes"]
    threads = settings.get("threads") or torch.get_num_threads()
    print(f"Deployment of {settings['run_dir']}: CPU latency in ms, median (90th percentile) of {settings['repeats']} "
          f"calls on the first test inputs, {threads} thread(s); ratios are to the first teacher.\n")
    head = ["model", "runtime", "top-1", "parameters", "multiply-adds", "file MB",
            *[f"batch {b} ms" for b in batches], "size vs teacher", *[f"b{b} vs teacher" for b in batches]]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        fp = row.footprint
        lat = {lat.batch: lat for lat in fp.latency}
        cells = [row.name, row.runtime, "-" if row.top1 is None else f"{row.top1:.2f}",
                 "-" if fp.parameters is None else f"{fp.parameters:,}",
                 "-" if fp.multiply_adds is None else f"{fp.multiply_adds / 1e6:.2f}M",
                 "-" if fp.file_bytes is None else f"{fp.file_bytes / 2**20:.3f}",
                 *[_ms(lat.get(b)) for b in batches],
                 _x(row.vs_teacher.get("file_mb")), *[_x(row.vs_teacher.get(f"latency_b{b}_median_ms")) for b in batches]]
        print("| " + " | ".join(cells) + " |")
    notes = [(row.name, n) for row in rows for n in ([row.note] if row.note else []) + row.footprint.notes]
    if notes:
        print()
        for name, note in notes:
            print(f"- {name}: {note}")


def _ms(lat: Latency | None) -> str:
    return "-" if lat is None else f"{lat.median_ms:.3f} ({lat.p90_ms:.3f})"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}x"


def to_json(rows: list[DeployRow]) -> list[dict[str, Any]]:
    return [{"name": r.name, "runtime": r.runtime, "top1": r.top1, **r.footprint.values(),
             "vs_teacher": r.vs_teacher, "note": r.note, "notes": r.footprint.notes} for r in rows]
