"""`featkd bench overhead`: what a distillation step costs against its lower bound.

A distillation step cannot cost less than one plain student training step (T_s) plus one
teacher forward without gradients (T_t). For each method, T_d is one featkd step (teacher
forward, student forward with captures, adapters, losses, backward, optimizer step) and the
overhead ratio is T_d / (T_s + T_t); memory likewise against the two steps' peaks.

Each method runs as its paper combines it with the task loss, on the features its paper
reads, named for any model with stages `layer1..N` and a final linear layer
(`feature_names`). Method groups for `--methods`: `default` (the suite's default run: KD,
FitNets, AT, SP, RKD, CRD and KD + AT + RKD), `zoo2` (the zoo's later methods, their own
group so that the default run stays short) and `all`. A method's batch is laid out by its
losses' `prepare_data` and the set's `collate`, as the trainer lays it out (SSKD's rotated
copies); `+dot` trains a method's terms with the DOT optimizer through `featkd.step`'s
`TrainStep` (two backward passes). A method with a pre-training stage is timed in its
distillation step.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import default_collate

from featkd.bench.common import Step, peaks, time_interleaved
from featkd.capture import call_model, logits_of
from featkd.config import TrainConfig
from featkd.data import TextInfo, collate_of
from featkd.distiller import Distiller, Term
from featkd.errors import ConfigError
from featkd.evaluation import unpack
from featkd.models import build_model
from featkd.step import TrainStep

METHODS = ["kd", "fitnet", "at", "sp", "rkd", "crd", "kd+at+rkd"]
#: The zoo's later methods, each at its zoo config's setting (the CIFAR-100 one where the paper
#: has several) on the bench's pair. A group of their own (`--methods zoo2`, or `all`) so that
#: the default run stays short: 21 more steps would more than double it.
ZOO2_METHODS = ["kd_ls", "skd", "nkd", "dist_plus", "mlkd", "ctkd", "wkd", "kd+dot", "ofd", "pad_l2", "kdsvd", "cwd",
                "chsim", "affinity", "ktaad", "reviewkd", "catkd", "sskd", "ofa", "simkd", "srd"]
GROUPS = {"default": METHODS, "zoo2": ZOO2_METHODS, "all": [*METHODS, *ZOO2_METHODS]}
DATASET_SIZE = 50_000  # CRD's memory bank is sized as for CIFAR
#: DOT as its paper runs it on CIFAR-100 (lr 0.05, momentum 0.9 +- 0.075, weight decay 5e-4)
DOT = {"name": "dot", "lr": 0.05, "momentum": 0.9, "delta": 0.075, "weight_decay": 5e-4}
_BRANCHES = {"downsample", "shortcut"}  # a residual block's projection, beside its main path
_NORMS = (nn.modules.batchnorm._BatchNorm,)
_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def expand_methods(methods: Sequence[str]) -> list[str]:
    """Method names with the groups (`default`, `zoo2`, `all`) spelled out, each once."""
    out: list[str] = []
    for name in methods:
        out += GROUPS.get(name, [name])
    return list(dict.fromkeys(out))


def pre_relu(model: nn.Module, stage: str) -> str:
    """The batch norm whose output the last ReLU of `stage` reads (its last block's last batch
    norm on the main path: `bn2` of a basic block, `bn3` of a bottleneck, a plain conv-BN-ReLU
    stage's last BN), where the model has one; else the stage's output (a pre-activation
    block, whose stage already ends before its ReLU). Modules are taken in registration
    order, which is the order these blocks run them in."""
    inside = [(n, m) for n, m in model.named_modules()
              if n.startswith(stage + ".") and not set(n[len(stage) + 1:].split(".")) & _BRANCHES]
    norms = [i for i, (_, m) in enumerate(inside) if isinstance(m, _NORMS)]
    if not norms or any(isinstance(m, _WEIGHTED) for _, m in inside[norms[-1] + 1:]):
        return stage
    return inside[norms[-1]][0]


def feature_names(model: nn.Module) -> dict[str, Any]:
    """Stages (`layerN`), their pre-ReLU batch norms (`pre_relu`, OFD's and ReviewKD's teacher
    features), the embedding (input of the last linear layer), the classifier (that layer),
    its width and the number of classes of a classifier."""
    names = [n for n, _ in model.named_modules()]
    stages = [n for n in names if re.fullmatch(r"layer\d+", n)]
    linear = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not stages or not linear:
        raise ValueError("the benchmark needs models with stages named layer1, layer2, ... and a final linear layer")
    name, classifier = linear[-1]
    return {"stages": stages, "pre_relu": [pre_relu(model, s) for s in stages], "embedding": f"{name}:in",
            "classifier": name, "width": classifier.in_features, "classes": classifier.out_features}


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
    unknown = [name for name in method.split("+") if name not in parts]
    if unknown:
        raise ConfigError(f"bench: unknown text method {unknown[0]!r}; text methods: {', '.join(parts)} (joined by "
                          "'+', '+dot' for the DOT optimizer).")
    chosen = [p for name in method.split("+") for p in parts[name]]
    ce_weight = {"kd": 0.1, "distilbert": 2.0}.get(method.split("+")[0], 1.0)
    return [Term("ce", ce_weight), *chosen]


def _image_parts(t: dict[str, Any], s: dict[str, Any]) -> dict[str, Callable[[], list[Term]]]:
    """The terms of each image method besides the task loss, built on demand; `t` and `s` are
    the `feature_names` of teacher and student."""
    mid = len(s["stages"]) // 2 - 1
    return {
        "kd": lambda: [Term("kd", 0.9, temperature=4)],
        "fitnet": lambda: [Term("fitnet", student=s["stages"][mid],
                                teacher=t["stages"][min(mid + 1, len(t["stages"]) - 1)])],
        "at": lambda: [Term("at", student="layer*", teacher="layer*")],
        "sp": lambda: [Term("sp", student=s["stages"][-1], teacher=t["stages"][-1])],
        "rkd": lambda: [Term("rkd", student=s["embedding"], teacher=t["embedding"])],
        "crd": lambda: [Term("crd", student=s["embedding"], teacher=t["embedding"])],
        # logit standardization: z-scored logits, T 2, weight 9 (CE 0.1)
        "kd_ls": lambda: [Term("kd", 9.0, temperature=2.0, standardize=True)],
        # SKD's term holds its cross-entropy, on the projected logits: no separate `ce`
        "skd": lambda: [Term("skd", 1.0, temperature=4.0, alpha=0.9)],
        "nkd": lambda: [Term("nkd", 1.0, temperature=3.0, gamma=3.5)],
        # DIST+: DIST on the logits and the Pearson relations of the last stage's maps
        "dist_plus": lambda: [Term("dist", 2.0, beta=2.0, gamma=2.0, temperature=1.0),
                              Term("dist_feature", 2.0, student=s["stages"][-1], teacher=t["stages"][-1],
                                   adapter="auto")],
        "mlkd": lambda: [Term("mlkd", 0.9, temperatures=[2.0, 3.0, 4.0, 5.0, 6.0])],
        # the learned temperature in (1, 21) through gradient reversal, lambda 0 -> 1 over 10 epochs
        "ctkd": lambda: [Term("ctkd", 0.9, curriculum_epochs=10)],
        # 10 Sinkhorn iterations over the non-target classes, cost from the teacher's class means
        "wkd": lambda: [Term("wkd", 1.0, temperature=8.0, wasserstein_weight=600.0, sinkhorn_iterations=10)],
        # every stage's pre-ReLU map (its batch norm, whose beta and gamma give the margins)
        # through 1x1 conv + BN connectors
        "ofd": lambda: [Term("ofd", 1e-3, student=s["pre_relu"], teacher=t["pre_relu"], adapter="conv")],
        "pad_l2": lambda: [Term("pad_l2", 1.0, student=s["embedding"], teacher=t["embedding"], adapter="auto")],
        "kdsvd": lambda: [Term("kdsvd", 1.0, student=s["stages"], teacher=t["stages"], adapter="auto")],
        "cwd": lambda: [Term("cwd", 3.0, student=s["stages"][-2:], teacher=t["stages"][-2:], temperature=4.0)],
        "chsim": lambda: [Term("chsim", 2.5, student=s["stages"][-1], teacher=t["stages"][-1])],
        "affinity": lambda: [Term("affinity", 1.0, student=s["stages"][-2:], teacher=t["stages"][-2:])],
        # the autoencoder of its pre-training stage stays fixed; timed: adapt 50 + affinity 1
        "ktaad": lambda: [Term("ktaad", 1.0, student=s["stages"][-1], teacher=t["stages"][-1])],
        # every student stage and the embedding, fused from the deepest, against the teacher's
        # pre-ReLU stages and embedding
        "reviewkd": lambda: [Term("reviewkd", 5.0, student=[*s["stages"], s["embedding"]],
                                  teacher=[*t["pre_relu"], t["embedding"]])],
        # class activation maps of the last stage through each classifier's weight
        "catkd": lambda: [Term("catkd", 15.0, student=[s["stages"][-1], s["classifier"]],
                               teacher=[t["stages"][-1], t["classifier"]], resolution=2, normalize=False)],
        # on batches of 4x the rows: each image and its three rotated copies (`prepare_data`)
        "sskd": lambda: [Term("sskd", 1.0, student=s["embedding"], teacher=t["embedding"])],
        # a branch on every student stage, as wide as the wider embedding
        "ofa": lambda: [Term("ofa", 1.0, student=s["stages"], teacher=t["stages"], num_classes=s["classes"], eps=1.0,
                             temperature=1.0, embed_dim=max(s["width"], t["width"]))],
        # the last stage through the bottleneck projector (the teacher's classifier only at inference)
        "simkd": lambda: [Term("simkd", 1.0, student=[s["stages"][-1], s["classifier"]],
                               teacher=[t["stages"][-1], t["classifier"]])],
        # the embedding through the connector, and through the teacher's classifier
        "srd": lambda: [Term("srd", 1.0, student=[s["embedding"], s["classifier"]],
                             teacher=[t["embedding"], t["classifier"]])],
    }

#: methods trained without a separate task loss: SKD's term computes its cross-entropy itself,
#: SimKD trains on its feature loss alone
WITHOUT_TASK_LOSS = {"skd", "simkd"}


#: the task loss's weight next to a method (1 where not named)
CE_WEIGHTS = {"kd": 0.1, "kd_ls": 0.1, "mlkd": 0.1, "ctkd": 0.1, "sskd": 0.1}


def split_method(method: str) -> tuple[list[str], bool]:
    """(the methods whose terms are summed, whether DOT trains them): "kd+at+rkd", "kd+dot"."""
    parts = method.split("+")
    objective = [p for p in parts if p != "dot"]
    if not objective:
        raise ConfigError(f"bench: {method!r}: dot is an optimizer, not a loss; give it a method, e.g. kd+dot.")
    return objective, len(objective) < len(parts)


def terms_for(method: str, teacher: nn.Module, student: nn.Module) -> list[Term]:
    """The task loss and the terms of `method`: one method, or several joined by `+` (their
    terms summed, the task loss at the smallest of their weights)."""
    t, s = feature_names(teacher), feature_names(student)
    parts, _ = split_method(method)
    table = _image_parts(t, s)
    unknown = [p for p in parts if p not in table]
    if unknown:
        raise ConfigError(f"bench: unknown method {unknown[0]!r}; methods: {', '.join(table)} (joined by '+', "
                          f"'+dot' for the DOT optimizer), or a group: {', '.join(GROUPS)}.")
    chosen = [term for name in parts for term in table[name]()]
    if WITHOUT_TASK_LOSS & set(parts):
        return chosen
    ce = Term("ce", min(CE_WEIGHTS.get(p, 1.0) for p in parts),
              **({"label_smoothing": 0.1} if "ofa" in parts else {}))  # OFA's recipe smooths the labels
    return [ce, *chosen]


class _TrainingSet(torch.utils.data.Dataset):
    """A training set of CIFAR's size whose samples at `index` are the step's batch: labels for
    all (CRD sizes its memory bank and draws its negatives from them), images for those."""

    def __init__(self, size: int, classes: int, x: Any, y: torch.Tensor, index: torch.Tensor) -> None:
        self.targets = torch.arange(size) % classes
        self.targets[index] = y
        self.x, self.rows = x, {int(i): k for k, i in enumerate(index)}

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.x[self.rows.get(i, 0)], self.targets[i]


def method_batch(distiller: Distiller, x: Any, y: torch.Tensor, index: torch.Tensor, classes: int,
                 device: torch.device, channels_last: bool) -> tuple[Any, torch.Tensor, dict[str, Any]]:
    """(inputs, labels, extra fields) of one step, laid out as the trainer lays them out: the
    training set through the losses' `prepare_data` (CRD adds sample indices, SSKD each image's
    rotated copies), the samples at `index` batched by its `collate`."""
    data = _TrainingSet(DATASET_SIZE, classes, x.cpu() if isinstance(x, torch.Tensor) else x, y.cpu(), index)
    prepared = distiller.prepare_data(data)
    if prepared is data:  # nothing to add: the batch as drawn
        return x, y, {}
    batch = (collate_of(prepared) or default_collate)([prepared[int(i)] for i in index])
    return unpack(batch, device, channels_last)


class MethodStep:
    """One training step of a method: `distiller(x, y, **extras)`, backward, optimizer step;
    with DOT (`train_step`), featkd's `TrainStep`: the distillation terms' backward, their
    gradient set aside, the task terms' backward, then the DOT update."""

    def __init__(self, distiller: Distiller, batch: tuple[Any, torch.Tensor, dict[str, Any]], precision: str,
                 device: torch.device, dot: bool, channels_last: bool = False) -> None:
        self.distiller, self.batch = distiller, batch
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)  # noqa: E731
        self.train_step: TrainStep | None = None
        if dot:
            train = TrainConfig.model_validate({"optimizer": DOT, "scheduler": {"name": "constant"}})
            self.train_step = TrainStep(distiller, train, precision, device, steps_per_epoch=1,
                                        channels_last=channels_last)
            self.optimizer = self.train_step.optimizer
        else:
            self.optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.01, momentum=0.9)

    def __call__(self) -> None:
        if self.train_step is not None:
            self.train_step.forward_backward(self.batch, closes_step=True, stop_requested=False)
            self.train_step.update()
            return
        x, y, extras = self.batch
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            out = self.distiller(x, y, **extras)
        out.loss.backward()
        self.optimizer.step()


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
    index = torch.randperm(DATASET_SIZE, device=dev)[:batch].cpu()
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
    objective, dot = split_method(kind)
    terms = (text_terms_for if text is not None else terms_for)("+".join(objective), t_model, s_model)
    distiller = Distiller(t_model, s_model, terms, example_input=x)
    # the batch as the trainer lays it out; SSKD's is 4x the rows (each image and its three
    # rotated copies), so its step costs what it costs, against the bound of the plain batch
    step_batch = method_batch(distiller, x, y, index, classes, dev, channels_last)
    distiller.train()
    distiller.set_epoch(1)
    return MethodStep(distiller, step_batch, precision, dev, dot, channels_last)


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
    kinds = ["student", "teacher", *expand_methods(methods)]
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
