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
from featkd.capture import call_model, logits_of
from featkd.data import TextInfo
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


TEXT_METHODS = ["kd", "distilbert", "minilm", "minilmv2", "tinybert"]


def is_text_model(name: str) -> bool:
    return name.startswith("hf:") or name == "transformer"


def text_feature_names(model: nn.Module) -> dict[str, list[str]]:
    """Per layer of a transformer: its output, its self-attention module and value projection."""
    from featkd.capture import attention_parts
    from featkd.text_models import layer_stack

    stack, layers = layer_stack(model)
    names = {"layers": [f"{stack}.{i}" for i in range(len(layers))], "attention": [], "query": [], "key": [],
             "value": []}
    for layer in names["layers"]:
        for name, module in model.named_modules():
            if name.startswith(layer + ".") and any(c in dict(module.named_children()) for c in ("value", "v_lin", "v_proj")):
                query, key, _ = attention_parts(module, name)
                value = next(c for c in ("value", "v_lin", "v_proj") if hasattr(module, c))
                names["attention"].append(name)
                names["query"].append(f"{name}.{query}")
                names["key"].append(f"{name}.{key}")
                names["value"].append(f"{name}.{value}")
                break
    return names


def text_terms_for(method: str, teacher: nn.Module, student: nn.Module) -> list[Term]:
    """The terms of each method as its paper combines them, on the last layers (MiniLM) or
    every layer (TinyBERT, mapped uniformly)."""
    t, s = text_feature_names(teacher), text_feature_names(student)
    last = lambda names, key: names[key][-1]  # noqa: E731
    width = lambda m: m.get_input_embeddings().embedding_dim if hasattr(m, "get_input_embeddings") else None  # noqa: E731
    same_width = width(teacher) == width(student) and width(student) is not None
    parts = {
        "kd": [Term("kd", 0.9, temperature=4)],
        # DistilBERT: soft targets at T = 2 (5), the task loss (2), cosine of the last hidden states (1)
        "distilbert": [Term("kd", 5.0, temperature=2), Term("hidden_cosine", 1.0, student=last(s, "layers"),
                                                          teacher=last(t, "layers"),
                                                          adapter=None if same_width else "linear")],
        "minilm": [Term("minilm", student=[f"{last(s, 'attention')}:attention", last(s, "value")],
                        teacher=[f"{last(t, 'attention')}:attention", last(t, "value")])],
        "minilmv2": [Term("minilmv2", student=[last(s, k) for k in ("query", "key", "value")],
                          teacher=[last(t, k) for k in ("query", "key", "value")], relation_heads=4)],
        "tinybert": [Term("hidden_mse", student=s["layers"], teacher=t["layers"], layer_map="uniform"),
                     Term("attention_mse", student=[f"{a}:scores" for a in s["attention"]],
                          teacher=[f"{a}:scores" for a in t["attention"]], layer_map="uniform"),
                     Term("soft_ce")],
    }
    chosen = [p for name in method.split("+") for p in parts[name]]
    ce_weight = {"kd": 0.1, "distilbert": 2.0}.get(method.split("+")[0], 1.0)
    return [Term("ce", ce_weight), *chosen]


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


def text_batch(vocab: int, length: int, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random token ids with padding: half the sequences end a quarter early."""
    ids = torch.randint(1, vocab, (batch, length), device=device)
    mask = torch.ones_like(ids)
    mask[: batch // 2, length - length // 4:] = 0
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def build(kind: str, teacher: str, student: str, input_shape: list[int], classes: int, batch: int,
          device: str = "cpu", precision: str = "fp32", channels_last: bool = False, vocab: int = 1000,
          teacher_args: dict[str, Any] | None = None, student_args: dict[str, Any] | None = None) -> Step:
    """One step of `kind`: "student" (plain training), "teacher" (forward, no grad), or a method.
    Text models (`hf:`, `transformer`) take `input_shape` as the sequence length and classify
    sequences of random tokens."""
    dev = torch.device(device)
    torch.manual_seed(0)
    text = TextInfo(vocab, input_shape[0]) if is_text_model(teacher) else None
    t_model = build_model(teacher, classes, input_shape, teacher_args, text=text).to(dev).eval()
    s_model = build_model(student, classes, input_shape, student_args, text=text).to(dev)
    fmt = torch.channels_last if channels_last and len(input_shape) == 3 else torch.contiguous_format
    t_model, s_model = t_model.to(memory_format=fmt), s_model.to(memory_format=fmt)
    if text is not None:
        x: Any = text_batch(vocab, input_shape[0], batch, dev)
    else:
        x = torch.randn(batch, *input_shape, device=dev).to(memory_format=fmt)
    y = torch.randint(0, classes, (batch,), device=dev)
    index = torch.randperm(DATASET_SIZE, device=dev)[:batch]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = lambda: torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None)  # noqa: E731

    if kind == "teacher":
        t_model.requires_grad_(False)

        def teacher_step() -> None:
            with torch.no_grad(), autocast():
                call_model(t_model, x)

        return teacher_step
    if kind == "student":
        optimizer = torch.optim.SGD(s_model.parameters(), lr=0.01, momentum=0.9)

        def student_step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                loss = nn.functional.cross_entropy(logits_of(call_model(s_model, x)), y)
            loss.backward()
            optimizer.step()

        return student_step
    terms = (text_terms_for if text is not None else terms_for)(kind, t_model, s_model)
    distiller = Distiller(t_model, s_model, terms, example_input=x)
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
        memory: bool = True, precision: str = "fp32", channels_last: bool = False, vocab: int = 1000,
        teacher_args: dict[str, Any] | None = None, student_args: dict[str, Any] | None = None) -> list[Row]:
    common = {"teacher": teacher, "student": student, "input_shape": list(input_shape), "classes": classes,
              "batch": batch, "device": device, "precision": precision, "channels_last": channels_last,
              "vocab": vocab, "teacher_args": teacher_args, "student_args": student_args}
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
