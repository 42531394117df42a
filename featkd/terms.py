"""Loss terms: what a term is (`Term`), the rules a set of terms must follow, and how one
term's value is computed from what it reads (`term_value`).

Every rule about terms lives here, once, with one message; the message names the fields the
way the user wrote them: `student=` in Python, `loss.at.student` in a config.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from featkd import distributed
from featkd.adapters import ADAPTERS
from featkd.errors import ConfigError, FeatkdError
from featkd.losses import LOSSES, DistillLoss
from featkd.losses.base import LossValue, TermInputs
from featkd.registry import check_arguments


#: How a term pairs its student features with its teacher's (see `Term`).
LAYER_MAPS = ("in_order", "uniform")


def map_layers(students: Sequence[str], teachers: Sequence[str], layer_map: str, subject: str) -> list[tuple[str, str]]:
    """(student, teacher) feature pairs of a term by its `layer_map`."""
    m, n = len(students), len(teachers)
    if layer_map == "uniform":
        if n % m:
            raise ConfigError(f"{subject}: layer_map uniform pairs each of {m} student features with every "
                              f"{n}/{m}-th teacher feature, but {n} is not a multiple of {m}; list the teacher "
                              "layers to use instead.")
        return [(students[i], teachers[(i + 1) * n // m - 1]) for i in range(m)]
    if m != n:
        raise ConfigError(
            f"{subject}: student features {list(students)} and teacher features {list(teachers)} differ in "
            "number; they are paired in order (or set layer_map: uniform for TinyBERT's mapping)."
        )
    return list(zip(students, teachers))


@dataclass(frozen=True)
class TermSource:
    """Where a term was written, so that its errors speak of the user's own keys."""

    #: what the term is called in messages: "term 'kd'" or a config key "loss.kd"
    subject: str
    #: a config key: fields are `subject.field`; in Python they are keyword arguments
    keyed: bool = False
    #: how to give the term a teacher where it was written
    add_teacher: str = "give the Distiller a teacher"

    def field(self, name: str) -> str:
        return f"{self.subject}.{name}" if self.keyed else f"{name}="

    def where(self, name: str) -> str:
        """The prefix of an error about field `name`."""
        return f"{self.subject}.{name}" if self.keyed else self.subject

    def value(self, name: str, value: Any) -> str:
        """The start of an error about the value of field `name`."""
        return f"{self.subject}.{name}: {value!r}" if self.keyed else f"{self.subject}: {name}={value!r}"

    def setting(self, *names: str) -> str:
        fields = " and ".join(self.field(n) for n in names)
        return f"set {fields}" if self.keyed else f"give {fields}"

    @property
    def removal(self) -> str:
        return f" with {self.subject}=null" if self.keyed else ""


def _named(prefix: str | None, build: Callable[[], Any]) -> Any:
    """Run `build`; with a config key as `prefix`, a featkd error it raises becomes a
    ConfigError that starts with the key."""
    if prefix is None:
        return build()
    try:
        return build()
    except FeatkdError as exc:
        message = str(exc)
        raise ConfigError(message if message.startswith(prefix) else f"{prefix}: {message}") from None


class Term:
    """One loss term: a registered loss (or a loss module), its weight, and what it reads.

    Args:
        loss: registry name (`featkd list losses`) or a `DistillLoss` instance.
        weight: multiplies the term; default: the loss's literature default.
        student, teacher: feature names (globs allowed) for feature losses; pairs are
            matched in order, so `student="layer*", teacher="layer*"` matches stage by stage.
        adapter: student-side adapter name (`featkd list adapters`), `None` for none; "default":
            the loss's own default (`auto` for FitNets, none for AT and RKD).
        name: the term's name in logs and `out.losses`; default: the loss name.
        teacher_index: which teacher of an ensemble a feature term reads (default 0).
        gather: in a multi-process (DDP) run, compute a relational loss over the global batch
            gathered from every process, with gradients to each process's own samples.
        layer_map: how student features pair with teacher features: "in_order" (one to one,
            equal counts) or "uniform" (TinyBERT's g(m) = m * N / M: M student layers learn
            from every (N / M)-th of N teacher layers, e.g. `student="encoder.layer.*"` with 4
            layers and `teacher="bert.encoder.layer.*"` with 12 pairs 0-2, 1-5, 2-8, 3-11).
        source: where the term was written (config terms name their keys in errors).
        **params: the loss's hyper-parameters (e.g. `temperature=4`).
    """

    def __init__(
        self,
        loss: str | DistillLoss,
        weight: float | None = None,
        *,
        student: str | Sequence[str] | None = None,
        teacher: str | Sequence[str] | None = None,
        adapter: str | None = "default",
        name: str | None = None,
        teacher_index: int = 0,
        gather: bool = False,
        layer_map: str = "in_order",
        source: TermSource | None = None,
        **params: Any,
    ) -> None:
        if isinstance(loss, DistillLoss):
            if params:
                raise ConfigError("Term: pass hyper-parameters to the loss module itself, not to Term.")
            self.module, self.loss = loss, type(loss).__name__
        elif isinstance(loss, str):
            self.loss = loss
        else:
            raise ConfigError(f"Term: loss must be a registered name or a DistillLoss, got {type(loss).__name__}.")
        self.name = name or self.loss
        self.source = source or TermSource(f"term {self.name!r}")
        if isinstance(loss, str):
            self.module = self._build(loss, params)
        cls = type(self.module)
        self.weight = float(cls.default_weight if weight is None else weight)
        self.student = [student] if isinstance(student, str) else list(student or [])
        self.teacher = [teacher] if isinstance(teacher, str) else list(teacher or [])
        self.adapter = cls.default_adapter if adapter == "default" else adapter
        self.teacher_index = teacher_index
        self.gather = gather
        self.layer_map = layer_map
        self.params = params
        self._check()
        self.module.sees_global_batch = gather

    def _build(self, loss: str, params: dict[str, Any]) -> DistillLoss:
        source = self.source
        key = (source.where("type") if loss != self.name else source.subject) if source.keyed else None
        cls = _named(key, lambda: LOSSES.get(loss))
        arguments = check_arguments(cls, params, source.subject if source.keyed else f"loss {loss!r}")
        return _named(source.subject if source.keyed else None, lambda: cls(**arguments))  # ranges: the loss's own

    def _check(self) -> None:
        cls, source = type(self.module), self.source
        if not math.isfinite(self.weight) or self.weight < 0:
            raise ConfigError(f"{source.value('weight', self.weight)} is not a weight: a term's weight is a finite "
                              "number >= 0 (0 keeps the term out of distillation).")
        if cls.reads_features and not (self.student and self.teacher):
            raise ConfigError(
                f"{source.subject}: {self.loss!r} compares features; {source.setting('student', 'teacher')} "
                "(names of modules: `featkd inspect MODEL` lists them)."
            )
        if self.adapter is not None:
            _named(source.where("adapter") if source.keyed else None, lambda: ADAPTERS.get(self.adapter))
        if self.layer_map not in LAYER_MAPS:
            raise ConfigError(f"{source.value('layer_map', self.layer_map)} is not a layer map; use one of "
                              f"{', '.join(LAYER_MAPS)}.")
        if self.teacher_index < 0:
            raise ConfigError(f"{source.value('teacher_index', self.teacher_index)} is not a teacher's index.")
        if self.gather and not cls.relational:
            relational = ", ".join(n for n in LOSSES.names() if LOSSES.get(n).relational)
            raise ConfigError(f"{source.value('gather', True)}, but {self.loss!r} does not relate samples of a batch; "
                              f"gather is for relational losses ({relational}).")

    def check_teachers(self, count: int) -> None:
        """The term can be computed with `count` teachers."""
        source = self.source
        if self.module.needs_teacher and not count:
            raise ConfigError(f"{source.subject}: {self.loss!r} needs a teacher; {source.add_teacher} or remove "
                              f"it{source.removal}.")
        if count and self.teacher_index >= count:
            raise ConfigError(f"{source.value('teacher_index', self.teacher_index)} is out of range for {count} "
                              "teacher(s).")

    @classmethod
    def from_config(cls, key: str, name: str, spec: Any, add_teacher: str = "set `teacher:`") -> Term:
        """The term of a config's `loss.<name>` entry (a `TermConfig`) at config key `key`."""
        adapter: dict[str, Any] = {} if spec.adapter == "default" else {"adapter": spec.adapter}
        return cls(spec.type or name, spec.weight, student=spec.student, teacher=spec.teacher, name=name,
                   teacher_index=spec.teacher_index, gather=spec.gather, layer_map=spec.layer_map,
                   source=TermSource(key, keyed=True, add_teacher=add_teacher), **adapter, **spec.params)

    def __repr__(self) -> str:
        where = f", student={self.student}, teacher={self.teacher}" if self.student else ""
        return f"Term({self.loss!r}, weight={self.weight}{where}, name={self.name!r})"


def terms_from(loss: Mapping[str, Any], key: str = "loss", add_teacher: str = "set `teacher:`") -> list[Term]:
    """The terms of a config's `loss:` section (name -> `TermConfig`) written at config key `key`."""
    return [Term.from_config(f"{key}.{name}", name, spec, add_teacher) for name, spec in loss.items()]


def check_terms(terms: Sequence[Term], teachers: int) -> None:
    """Rules of a set of terms: at least one, distinct names, each computable with `teachers`."""
    if not terms:
        raise ConfigError("Distiller needs at least one term, e.g. Term('ce').")
    seen: set[str] = set()
    for term in terms:
        if term.name in seen:
            raise ConfigError(
                f"two terms are named {term.name!r}; give one a distinct name= "
                f"(e.g. Term({term.loss!r}, name='{term.name}_2', ...))."
            )
        seen.add(term.name)
        term.check_teachers(teachers)


@dataclass(frozen=True)
class Pair:
    """A matched student feature and teacher feature of a term; `label` names the pair's
    part in logs ("" when the term has one pair)."""

    student: str
    teacher: str
    label: str


def term_value(term: Term, inputs: TermInputs, pairs: Sequence[Pair], parts: dict[str, torch.Tensor],
               objective: Callable[..., LossValue] | None = None, suffix: str = "") -> torch.Tensor:
    """The unweighted value of one term on one step, its parts recorded (detached) in `parts`.

    `objective` replaces the loss's own forward (a method's pre-training loss). With `gather`
    in a DDP run the loss sees the global batch and sends each process's samples their
    gradient. Losses compute in full precision: autocast is off inside, whatever the models ran in.
    """
    global_batch = term.gather and distributed.is_distributed()
    if global_batch:
        inputs = inputs.gathered()
    device = next((t for t in (inputs.student_logits, *inputs.teachers) if t is not None)).device
    with torch.autocast(device.type, enabled=False):
        value = term.module.evaluate(inputs, objective)
    total = record(parts, term.name + suffix, value, [p.label for p in pairs])
    return distributed.gradient_scale(total) if global_batch else total


def record(parts: dict[str, torch.Tensor], name: str, value: LossValue, labels: Sequence[str] = ()) -> torch.Tensor:
    """Log `value` under `name` (a dict's entries as `name/key`, a list's as `name/label`, labels
    being the pairs' or else the positions) and return its sum."""
    if isinstance(value, dict):
        for key, part in value.items():
            parts[f"{name}/{key}"] = part.detach()
        return torch.stack(list(value.values())).sum()
    if isinstance(value, (list, tuple)):
        names = list(labels) if len(labels) == len(value) else [str(i) for i in range(len(value))]
        totals = [record(parts, f"{name}/{label}" if label else name, v) for label, v in zip(names, value)]
        return totals[0] if len(totals) == 1 else torch.stack(totals).sum()
    parts[name] = value.detach()
    return value
