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
    distiller.deployed(x)       # the student as it answers at inference (SimKD: through its head)

One step reads top to bottom in `forward`: the teachers run (`TeacherPass`), the student
runs with its features captured, and each active term's value is computed from what it reads
(`featkd.terms.term_value`). The teachers are not submodules, so `parameters()`,
`state_dict()` and optimizers never see them, while `.to()` moves them along with the student.
A method's pre-training objective (FitNets' hint stage, ...) is its own object:
`distiller.pretraining("fitnet")`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from featkd.adapters import ADAPTERS, infer_layout
from featkd.capture import FeatureCapture, call_model, eval_mode, logits_of, resolve, token_mask, unwrap
from featkd.errors import AdapterError, CaptureError, ConfigError, FeatkdError, did_you_mean
from featkd.heads import HeadedStudent
from featkd.losses.base import LOSSES, PretrainStage, TermInputs
from featkd.teacher_cache import TeacherCacheSettings
from featkd.teachers import TeacherOutputs, TeacherPass
from featkd.terms import Pair, Term, check_terms, map_layers, term_value

__all__ = ["DistillOutput", "Distiller", "Pretraining", "Term"]


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
    #: the terms of `losses` that learn from the labels alone (no teacher): the task loss, which
    #: an optimizer such as DOT treats apart from the distillation terms
    task_terms: tuple[str, ...] = ()

    def split(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(task loss, distillation loss): the sums of the task terms and of the others (None
        where there are none)."""
        groups: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        for name, value in self.losses.items():
            groups[name not in self.task_terms].append(value)
        task, distill = (torch.stack(g).sum() if g else None for g in groups)
        return task, distill


@dataclass(frozen=True)
class Reads:
    """The features a set of terms reads: on the student, and per teacher index."""

    student: frozenset[str]
    teachers: dict[int, frozenset[str]]


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
        teacher_cache: keep the teachers' outputs per training view and skip the teacher
            forward when a view comes back (see `featkd.teacher_cache`); the training set
            must go through `prepare_data`, and its views must be replayable.
    """

    def __init__(
        self,
        teacher: nn.Module | Sequence[nn.Module] | None,
        student: nn.Module,
        terms: Sequence[Term | str],
        example_input: Any = None,
        teacher_cache: TeacherCacheSettings | None = None,
    ) -> None:
        super().__init__()
        teachers = [] if teacher is None else [teacher] if isinstance(teacher, nn.Module) else list(teacher)
        self.student = student
        self.terms = [t if isinstance(t, Term) else Term(t) for t in terms]
        check_terms(self.terms, len(teachers))
        self.losses = nn.ModuleDict({t.name: t.module for t in self.terms})
        self.adapters = nn.ModuleDict()
        self._pairs = {t.name: self._match(t, teachers) for t in self.terms if t.module.reads_features}
        # not a module: the teachers stay out of parameters(), state_dict() and optimizers
        self.teacher_pass = TeacherPass(teachers, self._teacher_features(len(teachers)), teacher_cache)
        names = [p.student for pairs in self._pairs.values() for p in pairs]
        self._student_capture = FeatureCapture(student, list(dict.fromkeys(names)), "student") if names else None
        #: called with the epoch by `set_epoch` (a pruning schedule, say)
        self.epoch_listeners: list[Callable[[int], None]] = []
        self._ready = False
        if example_input is not None:
            self.setup(example_input)
        elif any(t.adapter is not None or t.module.has_shape_dependent_parameters for t in self._feature_terms()):
            self.close()
            raise ConfigError(
                "Distiller: a term has an adapter or learnable parts built from probed feature "
                "shapes; pass example_input= (one batch of inputs) so they exist before you "
                "create the optimizer."
            )

    # -- construction --------------------------------------------------------------------
    @property
    def teachers(self) -> list[nn.Module]:
        return self.teacher_pass.teachers

    @property
    def teacher(self) -> nn.Module | None:
        return self.teachers[0] if self.teachers else None

    def _feature_terms(self) -> list[Term]:
        return [t for t in self.terms if t.module.reads_features]

    def _match(self, term: Term, teachers: list[nn.Module]) -> list[Pair]:
        """The term's student features paired in order with its teacher's."""
        try:
            s_specs = resolve(self.student, term.student, "student")
        except CaptureError as exc:
            if not term.module.student_hint:
                raise
            raise CaptureError(f"term {term.name!r}: {exc} {term.module.student_hint}") from None
        t_specs = resolve(teachers[term.teacher_index], term.teacher,
                          f"teacher {term.teacher_index}" if len(teachers) > 1 else "teacher")
        pairs = map_layers([s.name for s in s_specs], [t.name for t in t_specs], term.layer_map, term.source.subject)
        many = len(pairs) > 1
        return [Pair(s, t, s if many else "") for s, t in pairs]

    def _teacher_features(self, teachers: int) -> list[list[str]]:
        names: list[list[str]] = [[] for _ in range(teachers)]
        for term in self._feature_terms():
            names[term.teacher_index] += [p.teacher for p in self._pairs[term.name]]
        return names

    def setup(self, example_input: Any) -> None:
        """Probe feature shapes with one batch, build adapters and bind losses to the shapes."""
        student_shapes = self._student_capture.probe(self.student, example_input) if self._student_capture else {}
        teacher_shapes = self.teacher_pass.probe(example_input)
        device = _device_of(self.student)
        if any(t.module.reads_class_count for t in self.terms):
            classes = output_width(self.student, example_input)
            for term in self.terms:
                if term.module.reads_class_count:
                    term.module.bind_classes(classes)
        for term in self._feature_terms():
            adapted, targets = [], []
            adapters = nn.ModuleList()
            for pair in self._pairs[term.name]:
                s_shape = tuple(student_shapes[pair.student][1:])
                t_shape = tuple(teacher_shapes[term.teacher_index][pair.teacher][1:])
                if term.adapter is not None:
                    adapter = self._make_adapter(term, pair, s_shape, t_shape).to(device)
                    adapters.append(adapter)
                    s_shape = _output_shape(adapter, s_shape, device)
                    if s_shape != t_shape:
                        raise AdapterError(f"term {term.name!r}: adapter {term.adapter!r} maps student "
                                           f"{pair.student!r} to {s_shape}, but teacher {pair.teacher!r} is {t_shape}.")
                if term.module.needs_same_shape and s_shape != t_shape:
                    raise AdapterError(f"term {term.name!r} compares {pair.student!r} {s_shape} with {pair.teacher!r} "
                                       f"{t_shape} element by element; set adapter: auto (or another adapter) for it.")
                adapted.append(s_shape)
                targets.append(t_shape)
            if term.adapter is not None:
                self.adapters[term.name] = adapters
            term.module.bind(adapted, targets)
            pairs, teacher = self._pairs[term.name], self.teachers[term.teacher_index]
            term.module.bind_modules([_output_module(self.student, p.student) for p in pairs],
                                     [_output_module(teacher, p.teacher) for p in pairs])
        self._check_outputs(example_input)
        self._check_heads()
        self.losses.to(device)
        self._ready = True

    def _heads(self) -> list[tuple[Term, nn.Module]]:
        """(term, head) for each active term whose method replaces the student's classifier."""
        return [(t, head) for t in self.active_terms() if (head := t.module.inference_head()) is not None]

    def _check_heads(self) -> None:
        heads = self._heads()
        if len(heads) > 1:
            raise ConfigError(f"terms {[t.name for t, _ in heads]} each replace the student's classifier with their "
                              "own head; keep one of them.")
        for term, _ in heads:
            if term.adapter is not None:
                raise ConfigError(f"term {term.name!r} ({term.loss}) projects the student feature itself, and the "
                                  "student answers through that projection; leave the term's adapter unset.")
            if _registered_name(term) is None:
                raise ConfigError(f"term {term.name!r}: its loss {type(term.module).__name__} gives the student a head "
                                  "but is not registered, so a checkpoint could not rebuild it; register it in LOSSES.")

    @property
    def deployed(self) -> nn.Module:
        """The student as it answers at inference: the student itself, or, when a term's method
        classifies through a head of its own (SimKD), the student wrapped with that head
        (`featkd.heads.HeadedStudent`, sharing its modules). Evaluate and export this."""
        heads = self._heads() if self._ready else []
        if not heads:
            return self.student
        term, head = heads[0]
        return HeadedStudent(self.student, self._pairs[term.name][0].student, head, _registered_name(term),
                             term.module.head_args())

    def _check_outputs(self, example_input: Any) -> None:
        """Logit terms compare student and teacher outputs entry by entry: their last
        dimensions (classes, or a language model's vocabulary) must agree."""
        terms = [t for t in self.terms if t.module.needs_teacher and not t.module.reads_features]
        if not terms:
            return
        sizes = [output_width(m, example_input) for m in (self.student, *self.teachers)]
        if len(set(sizes)) > 1:
            teachers = ", ".join(str(n) for n in sizes[1:])
            raise ConfigError(
                f"{terms[0].source.subject}: the student predicts over {sizes[0]} classes or tokens, the teacher(s) over "
                f"{teachers}; {terms[0].loss!r} compares them entry by entry. Language models distilled token by token "
                "must share one vocabulary: tokenize for both with the same tokenizer (data.args.tokenizer)."
            )

    def _make_adapter(self, term: Term, pair: Pair, s_shape: tuple, t_shape: tuple) -> nn.Module:
        s_layout = infer_layout(s_shape, self.student)
        t_layout = infer_layout(t_shape, self.teachers[term.teacher_index])
        try:
            return ADAPTERS.get(term.adapter)(s_shape, t_shape, s_layout, t_layout)
        except AdapterError as exc:
            raise AdapterError(f"term {term.name!r} ({pair.student} -> {pair.teacher}): {exc}") from None

    # -- one step ------------------------------------------------------------------------
    def forward(self, x: Any, targets: torch.Tensor | None = None, **batch: Any) -> DistillOutput:
        """One distillation forward: teacher(s) without grad, student with grad, all terms.

        Extra keyword arguments are batch fields some losses read (CRD's `index`).
        """
        if not self._ready:
            self.setup(x)
        active = self.active_terms()
        if not active:
            raise ConfigError("every term has weight 0: nothing to optimize.")
        reads = self.reads(active)
        teachers = self.teacher_pass(x, batch, reads.teachers)
        try:
            logits, features = self.run_student(x, reads.student)
            losses: dict[str, torch.Tensor] = {}
            parts: dict[str, torch.Tensor] = {}
            for term in active:
                inputs = self.term_inputs(term, x, logits, features, teachers, targets, batch)
                losses[term.name] = term.weight * term_value(term, inputs, self._pairs.get(term.name, []), parts)
        finally:
            self.clear()
        loss = torch.stack(list(losses.values())).sum() if len(losses) > 1 else next(iter(losses.values()))
        return DistillOutput(logits, loss, losses, parts, teachers.ensemble_logits(),
                             tuple(t.name for t in active if not t.module.needs_teacher))

    def active_terms(self) -> list[Term]:
        """The terms computed in distillation: those of non-zero weight."""
        return [t for t in self.terms if t.weight != 0.0]

    def reads(self, terms: Sequence[Term]) -> Reads:
        """What running `terms` needs of the models: the teachers to run (all of them for a
        logit term, for an ensemble's output) and the features to keep."""
        student: set[str] = set()
        teachers: dict[int, set[str]] = {}
        for term in terms:
            if term.module.needs_teacher and not term.module.reads_features:
                for i in range(len(self.teachers)):
                    teachers.setdefault(i, set())
            for pair in self._pairs.get(term.name, []):
                student.add(pair.student)
                teachers.setdefault(term.teacher_index, set()).add(pair.teacher)
        return Reads(frozenset(student), {i: frozenset(names) for i, names in teachers.items()})

    def run_student(self, x: Any, names: frozenset[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The student's logits on `x` and its captured features among `names`."""
        if self._student_capture is None or not names:
            return logits_of(call_model(self.student, x)), {}
        output, features = self._student_capture.run(self.student, x, names)
        return logits_of(output), features

    def term_inputs(self, term: Term, x: Any, logits: torch.Tensor | None, features: dict[str, torch.Tensor],
                    teachers: TeacherOutputs, targets: torch.Tensor | None, batch: dict[str, Any]) -> TermInputs:
        """What `term` reads this step: adapted student features (None where the student did
        not run) paired with the teacher's, the logits, the labels and its batch fields."""
        if term.module.needs_targets and targets is None:
            raise ConfigError(f"term {term.name!r} needs labels: call distiller(x, targets).")
        missing = [k for k in term.module.batch_keys if k not in batch]
        if missing:
            raise ConfigError(
                f"term {term.name!r} needs {', '.join(repr(k) for k in missing)} in every batch. Wrap the "
                "training set with `train_set = distiller.prepare_data(train_set)` before building the "
                "DataLoader and pass the extra fields, e.g. distiller(x, y, **extras) (the featkd trainer does both)."
            )
        pairs = self._pairs.get(term.name, [])
        adapters = self.adapters[term.name] if term.name in self.adapters else None
        students = [features[p.student] if features else None for p in pairs]
        if adapters is not None:
            students = [adapter(s) if s is not None else None for adapter, s in zip(adapters, students)]
        teacher_features = teachers.features.get(term.teacher_index, {})
        return TermInputs(logits, teachers.ensemble_logits(), targets, students,
                          [teacher_features[p.teacher] for p in pairs], {k: batch[k] for k in term.module.batch_keys},
                          token_mask(x))

    def clear(self) -> None:
        """Drop the captured tensors of the last step."""
        if self._student_capture is not None:
            self._student_capture.clear()
        self.teacher_pass.clear()

    # -- what training needs -------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """What distillation trains: the student (unless frozen), the adapters and the
        learnable parts of the active terms' losses."""
        active = self.active_terms()
        groups = [self.student.parameters(), *(self.adapters[t.name].parameters() for t in active if t.name in self.adapters),
                  *(t.module.trained_parameters() for t in active)]
        return list(dict.fromkeys(p for group in groups for p in group if p.requires_grad))

    @property
    def leaves_parameters_unused(self) -> bool:
        return any(t.module.leaves_parameters_unused for t in self.active_terms())

    def set_epoch(self, epoch: int) -> None:
        """Tell every loss, and every listener (a pruning schedule), the current epoch
        (1-based); call it at the start of each epoch."""
        for term in self.terms:
            term.module.set_epoch(epoch)
        for listener in self.epoch_listeners:
            listener(epoch)

    def prepare_data(self, dataset: Any) -> Any:
        """The training set wrapped as the losses and the teacher cache need (sample indices)."""
        for term in self.terms:
            dataset = term.module.prepare_data(dataset)
        return self.teacher_pass.prepare_data(dataset)

    def pretrain_stages(self) -> list[tuple[str, PretrainStage]]:
        """(term name, stage) for every term whose method has a pre-training stage."""
        return [(t.name, t.module.pretrain) for t in self.terms if t.module.pretrain is not None]

    def pretraining(self, term_name: str) -> Pretraining:
        """The pre-training objective of term `term_name` (FitNets' hint stage, FT's
        paraphraser, ...): call it like the Distiller and optimize its `trainable_parameters()`."""
        return Pretraining(self, self.term(term_name))

    @torch.no_grad()
    def term_features(self, name: str, x: Any) -> list[tuple[Pair, torch.Tensor, torch.Tensor]]:
        """(pair, student feature, teacher feature) for each pair term `name` reads, on inputs
        `x`, before any adapter: the models run in eval mode without gradients and are left as
        they were (train/eval flags, batch-norm statistics, captures), for looking at what the
        term compares."""
        term = self.term(name)
        reads = self.reads([term])
        try:
            with eval_mode(self.student):
                _, students = self.run_student(x, reads.student)
            teachers = self.teacher_pass.run(x, reads.teachers).features.get(term.teacher_index, {})
        finally:
            self.clear()
        return [(pair, students[pair.student], teachers[pair.teacher]) for pair in self._pairs.get(name, [])]

    def term(self, name: str) -> Term:
        for term in self.terms:
            if term.name == name:
                return term
        raise ConfigError(f"no term named {name!r}.{did_you_mean(name, [t.name for t in self.terms])}")

    # -- module behaviour ----------------------------------------------------------------
    def train(self, mode: bool = True) -> Distiller:
        """Student, adapters and losses follow `mode`; teachers stay in eval mode."""
        super().train(mode)
        self.teacher_pass.eval()
        return self

    def _apply(self, fn: Callable, recurse: bool = True) -> Distiller:  # .to(), .cuda(), .half()
        super()._apply(fn, recurse)
        for teacher in self.teachers:
            teacher._apply(fn, recurse)
        return self

    @property
    def cloned_features(self) -> dict[str, list[str]]:
        """Features captured as clones because the model overwrites them in place."""
        out = {"student": self._student_capture.cloned} if self._student_capture else {}
        return {**out, **self.teacher_pass.cloned}

    def close(self) -> None:
        """Remove every hook from student and teachers; the models are left as they were."""
        if self._student_capture is not None:
            self._student_capture.close()
        self.teacher_pass.close()

    def __enter__(self) -> Distiller:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Pretraining:
    """A method's pre-training objective, run before distillation (`PretrainStage`): FitNets
    trains the student up to its guided layer with the regressor, FT the paraphraser on the
    teacher's map alone, AB and FSP the student and connectors on their own loss.

        hint = distiller.pretraining("fitnet")
        optimizer = torch.optim.SGD(hint.trainable_parameters(), lr=0.05)
        out = hint(x, y)              # out.losses == {"fitnet/pretrain": ...}

    It shares the Distiller's models, captures and adapters; its state is the Distiller's.
    """

    def __init__(self, distiller: Distiller, term: Term) -> None:
        if term.module.pretrain is None:
            raise ConfigError(f"term {term.name!r} ({term.loss}) has no pre-training stage.")
        self.distiller, self.term, self.stage = distiller, term, term.module.pretrain

    @property
    def student(self) -> nn.Module:
        return self.distiller.student

    @property
    def deployed(self) -> nn.Module:
        return self.distiller.deployed

    def __call__(self, x: Any, targets: torch.Tensor | None = None, **batch: Any) -> DistillOutput:
        distiller, term = self.distiller, self.term
        if not distiller._ready:
            distiller.setup(x)
        reads = distiller.reads([term])
        teachers = distiller.teacher_pass.run(x, {term.teacher_index: reads.teachers.get(term.teacher_index,
                                                                                         frozenset())})
        try:
            if self.stage.uses_student:
                logits, features = distiller.run_student(x, reads.student)
            else:
                logits, features = teachers.logits[term.teacher_index], {}
            inputs = distiller.term_inputs(term, x, logits, features, teachers, targets, batch)
            parts: dict[str, torch.Tensor] = {}
            value = term_value(term, inputs, distiller._pairs[term.name], parts, term.module.pretrain_loss, "/pretrain")
        finally:
            distiller.clear()
        return DistillOutput(logits, value, {f"{term.name}/pretrain": value}, parts, teachers.ensemble_logits())

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the stage trains, from the groups its `PretrainStage.trains` names."""
        groups: dict[str, Callable[[], Iterator[nn.Parameter]]] = {
            "student": self.student.parameters,
            "adapters": lambda: (self.distiller.adapters[self.term.name].parameters()
                                 if self.term.name in self.distiller.adapters else iter(())),
            "loss": self.term.module.pretrain_parameters,
        }
        return list(dict.fromkeys(p for group in self.stage.trains for p in groups[group]() if p.requires_grad))

    @property
    def leaves_parameters_unused(self) -> bool:
        # a stage on part of the student (up to the guided layer) leaves the rest without gradient
        return "student" in self.stage.trains or self.term.module.leaves_parameters_unused

    def train(self, mode: bool = True) -> Pretraining:
        self.distiller.train(mode)
        return self

    def set_epoch(self, epoch: int) -> None:
        self.distiller.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        return self.distiller.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> Any:
        return self.distiller.load_state_dict(state)

    def __enter__(self) -> None:
        raise FeatkdError(f"distiller.pretraining({self.term.name!r}) is the stage's objective, not a mode of the "
                          "Distiller: call it instead of the Distiller (`out = hint(x, y)`), and optimize "
                          "`hint.trainable_parameters()`.")

    def __exit__(self, *exc: object) -> None:
        pass


def _registered_name(term: Term) -> str | None:
    """The registry name of a term's loss (what a checkpoint rebuilds its head from)."""
    return term.loss if isinstance(term.loss, str) else LOSSES.name_of(type(term.module))


@torch.no_grad()
def output_width(model: nn.Module, example_input: Any) -> int:
    """The size of the last dimension of a model's logits (no side effects: eval mode)."""
    with eval_mode(model):
        return logits_of(call_model(model, example_input)).shape[-1]


def _device_of(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def _output_shape(adapter: nn.Module, shape: tuple, device: torch.device) -> tuple:
    """The per-sample shape an adapter maps `shape` to (probed in eval mode)."""
    flag = adapter.training
    adapter.eval()
    try:
        return tuple(adapter(torch.zeros((2, *shape), device=device)).shape[1:])
    finally:
        adapter.train(flag)


def _output_module(model: nn.Module, feature: str) -> nn.Module | None:
    """The module whose (single) output a feature is, or None for an input, an element of a
    tuple output or one call of several."""
    spec = resolve(model, feature)[0]
    if spec.port != "out" or spec.item is not None or spec.call is not None:
        return None
    return dict(unwrap(model).named_modules())[spec.module]
