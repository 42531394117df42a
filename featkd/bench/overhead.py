"""`featkd bench overhead`: what a distillation step costs against its lower bound.

A distillation step cannot cost less than one plain student training step (T_s) plus one
teacher forward without gradients (T_t). For each method, T_d is one featkd step (teacher
forward, student forward with captures, adapters, losses, backward, optimizer step) and the
overhead ratio is T_d / (T_s + T_t); memory likewise against the two steps' peaks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from featkd.bench.common import Step, peaks, time_interleaved
from featkd.distiller import Distiller, Term
from featkd.models import build_model

METHODS = ["kd", "fitnet", "at", "sp", "rkd", "crd", "kd+at+rkd"]
DATASET_SIZE = 50_000  # CRD's memory bank is sized as for CIFAR


def feature_names(model: nn.Module) -> dict[str, Any]:
    """Stages (`layerN`) and the embedding (input of the last linear layer) of a classifier."""
    names = [n for n, _ in model.named_modules()]
    stages = [n for n in names if re.fullmatch(r"layer\d+", n)]
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not stages or not linear:
        raise ValueError("the benchmark needs models with stages named layer1, layer2, ... and a final linear layer")
    return {"stages": stages, "embedding": f"{linear[-1]}:in"}


def terms_for(method: str, teacher: nn.Module, student: nn.Module) -> list[Term]:
    t, s = feature_names(teacher), feature_names(student)
    mid = len(s["stages"]) // 2 - 1
    parts = {
        "kd": [Term("kd", 0.9, temperature=4)],
        "fitnet": [Term("fitnet", student=s["stages"][mid], teacher=t["stages"][min(mid + 1, len(t["stages"]) - 1)])],
        "at": [Term("at", student="layer*", teacher="layer*")],
        "sp": [Term("sp", student=s["stages"][-1], teacher=t["stages"][-1])],
        "rkd": [Term("rkd", student=s["embedding"], teacher=t["embedding"])],
        "crd": [Term("crd", student=s["embedding"], teacher=t["embedding"])],
    }
    chosen = [p for name in method.split("+") for p in parts[name]]
    return [Term("ce", 0.1 if "kd" in method.split("+") else 1.0), *chosen]


class _IndexOnly(torch.utils.data.Dataset):
    """Labels of a synthetic training set, so that CRD can size its memory bank."""

    def __init__(self, n: int, classes: int) -> None:
        self.targets = torch.arange(n) % classes

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return torch.zeros(1), self.targets[i]


def build(kind: str, teacher: str, student: str, input_shape: list[int], classes: int, batch: int,
          device: str = "cpu", precision: str = "fp32", channels_last: bool = False) -> Step:
    """One step of `kind`: "student" (plain training), "teacher" (forward, no grad), or a method."""
    dev = torch.device(device)
    torch.manual_seed(0)
    t_model = build_model(teacher, classes, input_shape).to(dev).eval()
    s_model = build_model(student, classes, input_shape).to(dev)
    fmt = torch.channels_last if channels_last and len(input_shape) == 3 else torch.contiguous_format
    t_model, s_model = t_model.to(memory_format=fmt), s_model.to(memory_format=fmt)
    x = torch.randn(batch, *input_shape, device=dev).to(memory_format=fmt)
    y = torch.randint(0, classes, (batch,), device=dev)
    index = torch.randperm(DATASET_SIZE, device=dev)[:batch]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = lambda: torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None)  # noqa: E731

    if kind == "teacher":
        t_model.requires_grad_(False)

        def teacher_step() -> None:
            with torch.no_grad(), autocast():
                t_model(x)

        return teacher_step
    if kind == "student":
        optimizer = torch.optim.SGD(s_model.parameters(), lr=0.01, momentum=0.9)

        def student_step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                loss = nn.functional.cross_entropy(s_model(x), y)
            loss.backward()
            optimizer.step()

        return student_step
    distiller = Distiller(t_model, s_model, terms_for(kind, t_model, s_model), example_input=x)
    distiller.prepare_data(_IndexOnly(DATASET_SIZE, classes))
    distiller.train()
    distiller.set_epoch(1)
    optimizer = torch.optim.SGD([p for p in distiller.parameters() if p.requires_grad], lr=0.01, momentum=0.9)

    def distill_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            out = distiller(x, y, index=index)
        out.loss.backward()
        optimizer.step()

    return distill_step


@dataclass
class Row:
    name: str
    seconds: float
    ratio: float | None
    peak_mib: float | None
    memory_ratio: float | None


def run(teacher: str = "torchvision:resnet34", student: str = "torchvision:resnet18", input_shape: tuple = (3, 32, 32),
        classes: int = 100, batch: int = 64, repeats: int = 10, device: str = "cpu", methods: list[str] = METHODS,
        memory: bool = True, precision: str = "fp32", channels_last: bool = False) -> list[Row]:
    common = {"teacher": teacher, "student": student, "input_shape": list(input_shape), "classes": classes,
              "batch": batch, "device": device, "precision": precision, "channels_last": channels_last}
    kinds = ["student", "teacher", *methods]
    steps = {kind: build(kind, **common) for kind in kinds}
    times = time_interleaved(steps, repeats, torch.device(device))
    del steps
    peak = dict(zip(kinds, peaks("featkd.bench.overhead.build", [{"kind": k, **common} for k in kinds], device))) \
        if memory else {}
    bound_time = times["student"] + times["teacher"]
    bound_memory = peak["student"] + peak["teacher"] if memory else None
    rows = []
    for kind in kinds:
        is_method = kind not in ("student", "teacher")
        rows.append(Row(kind, times[kind], times[kind] / bound_time if is_method else None,
                        peak[kind] / 2**20 if memory else None,
                        peak[kind] / bound_memory if memory and is_method and bound_memory else None))
    return rows


def report(rows: list[Row], settings: dict[str, Any]) -> None:
    print(f"Distillation step overhead: teacher {settings['teacher']}, student {settings['student']}, input "
          f"{'x'.join(map(str, settings['input_shape']))}, batch {settings['batch']}, {settings['device']}, "
          f"{settings['precision']}, median of {settings['repeats']}")
    print(f"{'step':<12} {'time (ms)':>10} {'T_d/(T_s+T_t)':>14} {'peak (MiB)':>11} {'mem ratio':>10}")
    for r in rows:
        ratio = f"{r.ratio:.3f}" if r.ratio is not None else "-"
        memory = f"{r.peak_mib:.1f}" if r.peak_mib is not None else "-"
        memory_ratio = f"{r.memory_ratio:.3f}" if r.memory_ratio is not None else "-"
        print(f"{r.name:<12} {r.seconds * 1e3:>10.1f} {ratio:>14} {memory:>11} {memory_ratio:>10}")
    print("student = plain training step (T_s); teacher = forward without gradients (T_t); memory ratio = peak / "
          "(student peak + teacher peak)")
