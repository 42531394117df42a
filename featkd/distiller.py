"""Distiller: teacher(s) + student + feature capture + adapters + weighted loss terms.

    distiller = Distiller(teacher, student, terms=[
        Term("ce"),
        Term("kd", weight=0.9, temperature=4),
        Term("fitnet", student="layer2", teacher="layer3"),        # adapter "auto" by default
        Term("at", student="layer*", teacher="layer*"),
        Term("rkd", student="fc:in", teacher="fc:in"),
    ], example_input=x0)
    optimizer = torch.optim.SGD(distiller.parameters(), lr=0.05)   # student + adapters + loss state
    out = distiller(x, y)       # out.logits, out.losses (weighted, by term), out.loss (their sum)
    out.loss.backward()

The teacher is pinned to eval mode, frozen, and run under `torch.no_grad()`; it is not a
submodule, so `parameters()`, `state_dict()` and optimizers never see it, while `.to()`
moves it along with the student.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from featkd.adapters import ADAPTERS, Layout, infer_layout
from featkd.capture import FeatureCapture, StaleFeatureError, _call, resolve
from featkd.errors import AdapterError, ConfigError, FeatkdError
from featkd.losses import LOSSES, DistillLoss

_DEFAULT = object()


class Term:
    """One loss term: a registered loss (or a loss module), its weight, and what it reads.

    Args:
        loss: registry name (`featkd list losses`) or a `DistillLoss` instance.
        weight: multiplies the term; default: the loss's literature default.
        student, teacher: feature names (globs allowed) for feature losses; pairs are
            matched in order, so `student="layer*", teacher="layer*"` matches stage by stage.
        adapter: student-side adapter name (`featkd list adapters`), `None` for none; default:
            the loss's own default (`auto` for FitNets, none for AT and RKD).
        name: the term's name in logs and `out.losses`; default: the loss name.
        teacher_index: which teacher of an ensemble a feature term reads (default 0).
        **params: the loss's hyper-parameters (e.g. `temperature=4`).
    """

    def __init__(
        self,
        loss: str | DistillLoss,
        weight: float | None = None,
        *,
        student: str | Sequence[str] | None = None,
        teacher: str | Sequence[str] | None = None,
        adapter: str | None | object = _DEFAULT,
        name: str | None = None,
        teacher_index: int = 0,
        **params: Any,
    ) -> None:
        if isinstance(loss, DistillLoss):
            if params:
                raise ConfigError("Term: pass hyper-parameters to the loss module itself, not to Term.")
            self.module = loss
            self.loss = type(loss).__name__
        elif isinstance(loss, str):
            self.module = LOSSES.build(loss, **params)
            self.loss = loss
        else:
            raise ConfigError(f"Term: loss must be a registered name or a DistillLoss, got {type(loss).__name__}.")
        cls = type(self.module)
        self.weight = float(cls.default_weight if weight is None else weight)
        self.student = [student] if isinstance(student, str) else list(student or [])
        self.teacher = [teacher] if isinstance(teacher, str) else list(teacher or [])
        self.adapter = cls.default_adapter if adapter is _DEFAULT else adapter
        self.name = name or self.loss
        self.teacher_index = teacher_index
        self.params = params

    def __repr__(self) -> str:
        where = f", student={self.student}, teacher={self.teacher}" if self.student else ""
        return f"Term({self.loss!r}, weight={self.weight}{where}, name={self.name!r})"


@dataclass
class DistillOutput:
    """What one distillation forward returns."""

    logits: torch.Tensor
    loss: torch.Tensor
    #: weighted value of each term, by term name; they sum to `loss`
    losses: dict[str, torch.Tensor]
    #: unweighted, detached parts for logging: "kd", "at/layer1", "rkd/angle", ...
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_logits: torch.Tensor | tuple[torch.Tensor, ...] | None = None


@dataclass
class _Pair:
    student: str
    teacher: str
    label: str


def logits_of(output: Any) -> torch.Tensor:
    """The logits in a model's output: the tensor itself, `.logits`, or the first tensor."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits") and isinstance(output.logits, torch.Tensor):
        return output.logits
    if isinstance(output, dict):
        value = output.get("logits")
        if isinstance(value, torch.Tensor):
            return value
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    raise FeatkdError(f"cannot find logits in a model output of type {type(output).__name__}")


class Distiller(nn.Module):
    """Runs teacher(s) and student, captures features, adapts them and sums weighted terms.

    Args:
        teacher: a model, a list of models (an ensemble: logit losses average their softened
            probabilities), or None for plain training of the student.
        student: the model being trained.
        terms: `Term`s (or loss names) making up the objective.
        example_input: one batch of inputs, used to probe feature shapes and build adapters.
            Required when a term uses an adapter: adapters must exist before you create the
            optimizer. Without it, shapes are probed on the first batch.
    """

    def __init__(
        self,
        teacher: nn.Module | Sequence[nn.Module] | None,
        student: nn.Module,
        terms: Sequence[Term | str],
        example_input: Any = None,
    ) -> None:
        super().__init__()
        if teacher is None:
            teachers: list[nn.Module] = []
        elif isinstance(teacher, nn.Module):
            teachers = [teacher]
        else:
            teachers = list(teacher)
        for t in teachers:
            t.eval()
            t.requires_grad_(False)
        # not submodules: kept out of parameters(), state_dict() and optimizers
        object.__setattr__(self, "_teachers", teachers)
        self.student = student
        self.terms = [t if isinstance(t, Term) else Term(t) for t in terms]
        if not self.terms:
            raise ConfigError("Distiller needs at least one term, e.g. Term('ce').")
        self._check_names()
        self.losses = nn.ModuleDict({t.name: t.module for t in self.terms})
        self.adapters = nn.ModuleDict()
        self._pairs: dict[str, list[_Pair]] = {}
        self._student_capture: FeatureCapture | None = None
        self._teacher_captures: list[FeatureCapture | None] = []
        self._build_captures()
        self._ready = False
        if example_input is not None:
            self.setup(example_input)
        elif any(t.adapter is not None for t in self._feature_terms()):
            self.close()
            raise ConfigError(
                "Distiller: a term uses an adapter, which is built from probed feature shapes; "
                "pass example_input= (one batch of inputs) so the adapter exists before you "
                "create the optimizer."
            )

    # -- construction --------------------------------------------------------------------
    @property
    def teachers(self) -> list[nn.Module]:
        return self._teachers

    @property
    def teacher(self) -> nn.Module | None:
        return self._teachers[0] if self._teachers else None

    def _feature_terms(self) -> list[Term]:
        return [t for t in self.terms if t.module.consumes == "features"]

    def _check_names(self) -> None:
        seen: set[str] = set()
        for term in self.terms:
            if term.name in seen:
                raise ConfigError(
                    f"two terms are named {term.name!r}; give one a distinct name= "
                    f"(e.g. Term({term.loss!r}, name='{term.name}_2', ...))."
                )
            seen.add(term.name)
            if term.module.needs_teacher and not self._teachers:
                raise ConfigError(f"term {term.name!r} needs a teacher, but none was given.")
            if not 0 <= term.teacher_index < max(1, len(self._teachers)):
                raise ConfigError(
                    f"term {term.name!r}: teacher_index {term.teacher_index} is out of range for "
                    f"{len(self._teachers)} teacher(s)."
                )
            if term.module.consumes == "features" and not (term.student and term.teacher):
                raise ConfigError(
                    f"term {term.name!r} ({term.loss}) compares features: give student= and teacher= "
                    "feature names (`featkd inspect MODEL` lists them)."
                )

    def _build_captures(self) -> None:
        student_names: list[str] = []
        teacher_names: list[list[str]] = [[] for _ in self._teachers]
        for term in self._feature_terms():
            s_specs = resolve(self.student, term.student, "student")
            t_specs = resolve(self._teachers[term.teacher_index], term.teacher, f"teacher {term.teacher_index}"
                              if len(self._teachers) > 1 else "teacher")
            if len(s_specs) != len(t_specs):
                raise ConfigError(
                    f"term {term.name!r}: student features {[s.name for s in s_specs]} and teacher "
                    f"features {[s.name for s in t_specs]} differ in number; they are paired in order."
                )
            many = len(s_specs) > 1
            self._pairs[term.name] = [
                _Pair(s.name, t.name, s.name if many else "") for s, t in zip(s_specs, t_specs)
            ]
            student_names += [s.name for s in s_specs]
            teacher_names[term.teacher_index] += [t.name for t in t_specs]
        if student_names:
            self._student_capture = FeatureCapture(self.student, list(dict.fromkeys(student_names)), "student")
        self._teacher_captures = [
            FeatureCapture(t, list(dict.fromkeys(names)), "teacher") if names else None
            for t, names in zip(self._teachers, teacher_names)
        ]

    def setup(self, example_input: Any) -> None:
        """Probe feature shapes with one batch, build adapters and bind losses to the shapes."""
        student_shapes = self._student_capture.probe(self.student, example_input) if self._student_capture else {}
        teacher_shapes = [c.probe(t, example_input) if c else {} for t, c in zip(self._teachers, self._teacher_captures)]
        device = _device_of(self.student)
        for term in self._feature_terms():
            t_shapes = teacher_shapes[term.teacher_index]
            adapted, targets = [], []
            adapters = nn.ModuleList()
            for pair in self._pairs[term.name]:
                s_shape, t_shape = tuple(student_shapes[pair.student][1:]), tuple(t_shapes[pair.teacher][1:])
                if term.adapter is not None:
                    adapter = self._make_adapter(term, pair, s_shape, t_shape).to(device)
                    adapters.append(adapter)
                    s_shape = self._adapted_shape(adapter, s_shape, device)
                    if s_shape != t_shape:
                        raise AdapterError(
                            f"term {term.name!r}: adapter {term.adapter!r} maps student {pair.student!r} to "
                            f"{s_shape}, but teacher {pair.teacher!r} is {t_shape}."
                        )
                if term.module.needs_same_shape and s_shape != t_shape:
                    raise AdapterError(
                        f"term {term.name!r} compares {pair.student!r} {s_shape} with {pair.teacher!r} "
                        f"{t_shape} element by element; set adapter: auto (or another adapter) for it."
                    )
                adapted.append(s_shape)
                targets.append(t_shape)
            if term.adapter is not None:
                self.adapters[term.name] = adapters
            term.module.bind(adapted, targets)
        self.losses.to(device)
        self._ready = True

    def _make_adapter(self, term: Term, pair: _Pair, s_shape: tuple, t_shape: tuple) -> nn.Module:
        s_layout: Layout = infer_layout(s_shape, self.student)
        t_layout: Layout = infer_layout(t_shape, self._teachers[term.teacher_index])
        try:
            return ADAPTERS.get(term.adapter)(s_shape, t_shape, s_layout, t_layout)
        except AdapterError as exc:
            raise AdapterError(f"term {term.name!r} ({pair.student} -> {pair.teacher}): {exc}") from None

    @staticmethod
    @torch.no_grad()
    def _adapted_shape(adapter: nn.Module, shape: tuple, device: torch.device) -> tuple:
        flag = adapter.training
        adapter.eval()
        try:
            return tuple(adapter(torch.zeros((2, *shape), device=device)).shape[1:])
        finally:
            adapter.train(flag)

    # -- running -------------------------------------------------------------------------
    def forward(self, x: Any, targets: torch.Tensor | None = None, **batch: Any) -> DistillOutput:
        """One distillation forward: teacher(s) without grad, student with grad, all terms."""
        if not self._ready:
            self.setup(x)
        active = [t for t in self.terms if t.weight != 0.0]
        need_teacher = any(t.module.needs_teacher for t in active)
        teacher_logits: list[torch.Tensor] = []
        teacher_feats: list[dict[str, torch.Tensor]] = []
        if need_teacher:
            with torch.no_grad():
                for teacher, capture in zip(self._teachers, self._teacher_captures):
                    if teacher.training:  # someone called .train() on it: pin it back
                        teacher.eval()
                    logits, feats = self._run(teacher, capture, x)
                    teacher_logits.append(logits)
                    teacher_feats.append(feats)
        logits, student_feats = self._run(self.student, self._student_capture, x)
        t_logits = (teacher_logits[0] if len(teacher_logits) == 1 else tuple(teacher_logits)) if teacher_logits else None

        losses: dict[str, torch.Tensor] = {}
        parts: dict[str, torch.Tensor] = {}
        try:
            for term in active:
                if term.module.needs_targets and targets is None:
                    raise ConfigError(f"term {term.name!r} needs labels: call distiller(x, targets).")
                if term.module.consumes == "logits":
                    value = term.module(logits, t_logits, targets)
                    total = self._record(parts, term.name, value)
                else:
                    total = self._feature_term(term, student_feats, teacher_feats[term.teacher_index], parts)
                losses[term.name] = term.weight * total
        finally:
            for capture in [self._student_capture, *self._teacher_captures]:
                if capture is not None:
                    capture.clear()
        if not losses:
            raise ConfigError("every term has weight 0: nothing to optimize.")
        loss = torch.stack(list(losses.values())).sum() if len(losses) > 1 else next(iter(losses.values()))
        return DistillOutput(logits, loss, losses, parts, t_logits)

    def _run(self, model: nn.Module, capture: FeatureCapture | None, x: Any) -> tuple[torch.Tensor, dict]:
        if capture is None:
            return logits_of(_call(model, x)), {}
        for attempt in range(2):
            with capture.recording():
                output = _call(model, x)
            try:
                return logits_of(output), capture.collect()
            except StaleFeatureError:
                if attempt:  # cloning did not help: should not happen
                    raise
        raise AssertionError("unreachable")

    def _feature_term(self, term: Term, s_feats: dict, t_feats: dict, parts: dict) -> torch.Tensor:
        pairs = self._pairs[term.name]
        adapters = self.adapters[term.name] if term.name in self.adapters else None
        students = [
            adapters[i](s_feats[p.student]) if adapters is not None else s_feats[p.student]
            for i, p in enumerate(pairs)
        ]
        teachers = [t_feats[p.teacher] for p in pairs]
        if not term.module.pairwise:
            return self._record(parts, term.name, term.module(students, teachers))
        totals = [
            self._record(parts, f"{term.name}/{p.label}" if p.label else term.name, term.module(s, t))
            for p, s, t in zip(pairs, students, teachers)
        ]
        return totals[0] if len(totals) == 1 else torch.stack(totals).sum()

    @staticmethod
    def _record(parts: dict, name: str, value: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
        if isinstance(value, dict):
            for key, part in value.items():
                parts[f"{name}/{key}"] = part.detach()
            return torch.stack(list(value.values())).sum()
        parts[name] = value.detach()
        return value

    # -- module behaviour ----------------------------------------------------------------
    def train(self, mode: bool = True) -> Distiller:
        """Student, adapters and losses follow `mode`; teachers stay in eval mode."""
        super().train(mode)
        for teacher in self._teachers:
            teacher.eval()
        return self

    def _apply(self, fn: Callable, recurse: bool = True) -> Distiller:  # .to(), .cuda(), .half()
        super()._apply(fn, recurse)
        for teacher in self._teachers:
            teacher._apply(fn, recurse)
        return self

    def student_parameters(self) -> Iterator[nn.Parameter]:
        return self.student.parameters()

    @property
    def cloned_features(self) -> dict[str, list[str]]:
        """Features captured as clones because the model overwrites them in place."""
        out = {}
        if self._student_capture:
            out["student"] = self._student_capture.cloned
        for i, capture in enumerate(self._teacher_captures):
            if capture:
                out[f"teacher{i}"] = capture.cloned
        return out

    def close(self) -> None:
        """Remove every hook from student and teachers; the models are left as they were."""
        for capture in [self._student_capture, *self._teacher_captures]:
            if capture is not None:
                capture.close()

    def __enter__(self) -> Distiller:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _device_of(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")
