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
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from featkd import distributed
from featkd.adapters import ADAPTERS, Layout, infer_layout
from featkd.capture import FeatureCapture, StaleFeatureError, _call, resolve
from featkd.data import with_index
from featkd.errors import AdapterError, ConfigError, FeatkdError, did_you_mean
from featkd.losses import LOSSES, DistillLoss
from featkd.losses.base import PretrainStage
from featkd.teacher_cache import TeacherCache, TeacherCacheSettings



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
        self.adapter = cls.default_adapter if adapter == "default" else adapter
        self.name = name or self.loss
        self.teacher_index = teacher_index
        self.gather = gather
        if gather and not cls.relational:
            raise ConfigError(f"Term {self.name!r}: gather is for losses that relate samples of a batch.")
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
        self._cache = self._make_cache(teacher_cache)
        self.losses = nn.ModuleDict({t.name: t.module for t in self.terms})
        self.adapters = nn.ModuleDict()
        self._pairs: dict[str, list[_Pair]] = {}
        self._student_capture: FeatureCapture | None = None
        self._teacher_captures: list[FeatureCapture | None] = []
        self._build_captures()
        self._ready = False
        self._pretraining: Term | None = None
        self._wanted_cache: dict[tuple[str, ...], tuple[frozenset[str], dict[int, frozenset[str]]]] = {}
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

    def _make_cache(self, settings: TeacherCacheSettings | None) -> TeacherCache | None:
        if settings is None:
            return None
        if not self._teachers:
            raise ConfigError("teacher_cache: there is no teacher whose outputs could be cached.")
        for term in self._feature_terms():
            missing = [name for name in term.teacher if name not in settings.features]
            if missing:
                raise ConfigError(
                    f"teacher_cache: term {term.name!r} reads teacher features {missing} that the cache does not "
                    "keep; list them in teacher_cache.features (each costs one stored value per element, per "
                    "training view) or turn the cache off."
                )
        return TeacherCache(settings, len(self._teachers))

    def _build_captures(self) -> None:
        student_names: list[str] = []
        teacher_names: list[list[str]] = [[] for _ in self._teachers]
        if self._cache is not None:  # features the cache keeps are captured whenever the teachers run
            for i, teacher in enumerate(self._teachers):
                teacher_names[i] += [s.name for s in resolve(teacher, self._cache.settings.features, "teacher")]
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
        """One distillation forward: teacher(s) without grad, student with grad, all terms.

        Extra keyword arguments are batch fields some losses read (CRD's `index`).
        """
        if not self._ready:
            self.setup(x)
        if self._pretraining is not None:
            return self._pretrain_forward(self._pretraining, x, batch)
        active = [t for t in self.terms if t.weight != 0.0]
        if not active:
            raise ConfigError("every term has weight 0: nothing to optimize.")
        teacher_indices = sorted({i for t in active if t.module.needs_teacher
                                  for i in (range(len(self._teachers)) if t.module.consumes == "logits"
                                            else [t.teacher_index])})
        student_names, teacher_names = self._wanted(active)
        if self._cache is not None and self._cache.ready and teacher_indices:
            teacher_logits, teacher_feats = self._cached_teacher_pass(x, batch, teacher_names)
        else:
            teacher_logits, teacher_feats = self._teacher_pass(x, teacher_indices, teacher_names)
        try:
            logits, student_feats = self._run(self.student, self._student_capture, x, student_names)
            t_logits = self._ensemble_logits(teacher_logits)
            losses: dict[str, torch.Tensor] = {}
            parts: dict[str, torch.Tensor] = {}
            for term in active:
                if term.module.needs_targets and targets is None:
                    raise ConfigError(f"term {term.name!r} needs labels: call distiller(x, targets).")
                extras = self._batch_fields(term, batch)
                if term.module.consumes == "logits":
                    with full_precision_losses(logits):
                        value = term.module(logits, t_logits, targets, **extras)
                    total = self._record(parts, term.name, value)
                else:
                    total = self._feature_term(term, term.module, student_feats,
                                               teacher_feats.get(term.teacher_index, {}), parts, extras)
                losses[term.name] = term.weight * total
        finally:
            self._clear_captures()
        loss = torch.stack(list(losses.values())).sum() if len(losses) > 1 else next(iter(losses.values()))
        return DistillOutput(logits, loss, losses, parts, t_logits)

    def _wanted(self, terms: Sequence[Term]) -> tuple[frozenset[str], dict[int, frozenset[str]]]:
        """Feature names the given terms read, on the student and on each teacher."""
        key = tuple(t.name for t in terms)
        if key not in self._wanted_cache:
            student: set[str] = set()
            teachers: dict[int, set[str]] = {}
            for term in terms:
                for pair in self._pairs.get(term.name, []):
                    student.add(pair.student)
                    teachers.setdefault(term.teacher_index, set()).add(pair.teacher)
            self._wanted_cache[key] = (frozenset(student), {i: frozenset(v) for i, v in teachers.items()})
        return self._wanted_cache[key]

    def _teacher_pass(self, x: Any, indices: Sequence[int],
                      names: dict[int, frozenset[str]]) -> tuple[dict[int, torch.Tensor], dict[int, dict]]:
        logits, feats = {}, {}
        with torch.no_grad():
            for i in indices:
                teacher = self._teachers[i]
                if teacher.training:  # someone called .train() on it: pin it back
                    teacher.eval()
                logits[i], feats[i] = self._run(teacher, self._teacher_captures[i], x, names.get(i, frozenset()))
        return logits, feats

    def _cached_teacher_pass(self, x: Any, batch: dict[str, Any], names: dict[int, frozenset[str]]
                             ) -> tuple[dict[int, torch.Tensor], dict[int, dict]]:
        cache = self._cache
        keys = cache.keys(batch)
        missing = cache.missing(keys)
        kept = frozenset(cache.settings.features)
        everything = {i: names.get(i, frozenset()) | kept for i in range(len(self._teachers))}
        teachers = range(len(self._teachers))
        if distributed.is_distributed():  # ranks agree, then fill from every rank's full batch
            flag = distributed.all_reduce_sum(missing.any().float().reshape(1))
            if bool(flag > 0):
                logits, feats = self._teacher_pass(x, teachers, everything)
                cache.store(keys, logits, feats, gather=True)
                return logits, feats
        elif bool(missing.any()):
            if not isinstance(x, torch.Tensor) or bool(missing.all()):
                logits, feats = self._teacher_pass(x, teachers, everything)
                cache.store(keys, logits, feats)
                return logits, feats
            # only the samples seen for the first time go through the teachers (eval mode:
            # a sample's outputs do not depend on the rest of its batch)
            logits, feats = self._teacher_pass(x[missing], teachers, everything)
            cache.store(keys[missing], logits, feats)
        cached_logits, cached_feats = cache.lookup(keys)
        return dict(enumerate(cached_logits)), {i: cached_feats.get(i, {}) for i in teachers}

    def _ensemble_logits(self, logits: dict[int, torch.Tensor]) -> torch.Tensor | tuple[torch.Tensor, ...] | None:
        if len(logits) < len(self._teachers) or not logits:
            return None  # only feature terms ran a teacher: no ensemble output to offer
        return logits[0] if len(logits) == 1 else tuple(logits[i] for i in range(len(self._teachers)))

    def _clear_captures(self) -> None:
        for capture in [self._student_capture, *self._teacher_captures]:
            if capture is not None:
                capture.clear()

    @staticmethod
    def _batch_fields(term: Term, batch: dict[str, Any]) -> dict[str, Any]:
        missing = [k for k in term.module.batch_keys if k not in batch]
        if missing:
            raise ConfigError(
                f"term {term.name!r} needs {', '.join(repr(k) for k in missing)} in every batch. Wrap the "
                "training set with `train_set = distiller.prepare_data(train_set)` before building the "
                f"DataLoader and pass the extra fields, e.g. distiller(x, y, **extras) (the featkd trainer "
                "does both)."
            )
        return {k: batch[k] for k in term.module.batch_keys}

    def _run(self, model: nn.Module, capture: FeatureCapture | None, x: Any,
             names: frozenset[str] = frozenset()) -> tuple[torch.Tensor, dict]:
        if capture is None or not names:
            return logits_of(_call(model, x)), {}
        for attempt in range(2):
            with capture.recording(names):
                output = _call(model, x)
            try:
                return logits_of(output), capture.collect()
            except StaleFeatureError:
                if attempt:  # cloning did not help: should not happen
                    raise
        raise AssertionError("unreachable")

    def _feature_term(self, term: Term, objective: Callable, s_feats: dict, t_feats: dict, parts: dict,
                      extras: dict[str, Any], suffix: str = "") -> torch.Tensor:
        pairs = self._pairs[term.name]
        adapters = self.adapters[term.name] if term.name in self.adapters else None
        students = [
            (adapters[i](s_feats[p.student]) if adapters is not None else s_feats[p.student]) if s_feats else None
            for i, p in enumerate(pairs)
        ]
        teachers = [t_feats[p.teacher] for p in pairs]
        name = term.name + suffix
        if term.gather and distributed.is_distributed():
            students = [distributed.gather_with_local_grad(s) if s is not None else None for s in students]
            teachers = [distributed.gather_with_local_grad(t) for t in teachers]
            extras = {k: distributed.gather_with_local_grad(v) if isinstance(v, torch.Tensor) else v
                      for k, v in extras.items()}
            value = self._feature_value(term, objective, pairs, students, teachers, extras, parts, name)
            return distributed.gradient_scale(value)
        return self._feature_value(term, objective, pairs, students, teachers, extras, parts, name)

    def _feature_value(self, term: Term, objective: Callable, pairs: list[_Pair], students: list, teachers: list,
                       extras: dict[str, Any], parts: dict, name: str) -> torch.Tensor:
        with full_precision_losses(teachers[0]):  # adapters ran under autocast; losses do not
            return self._feature_objective(term, objective, pairs, students, teachers, extras, parts, name)

    def _feature_objective(self, term: Term, objective: Callable, pairs: list[_Pair], students: list, teachers: list,
                           extras: dict[str, Any], parts: dict, name: str) -> torch.Tensor:
        if not term.module.pairwise:
            value = objective(students, teachers, **extras)
            if isinstance(value, (list, tuple)):  # one value per pair, logged under the pair's name
                labels = [p.label for p in pairs] if len(value) == len(pairs) else [str(i) for i in range(len(value))]
                totals = [self._record(parts, f"{name}/{label}" if label else name, v) for label, v in zip(labels, value)]
                return totals[0] if len(totals) == 1 else torch.stack(totals).sum()
            return self._record(parts, name, value)
        totals = [
            self._record(parts, f"{name}/{p.label}" if p.label else name, objective(s, t, **extras))
            for p, s, t in zip(pairs, students, teachers)
        ]
        return totals[0] if len(totals) == 1 else torch.stack(totals).sum()

    # -- epochs, data, pre-training stages -----------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Tell every loss the current epoch (1-based); call it at the start of each epoch."""
        for term in self.terms:
            term.module.set_epoch(epoch)

    def prepare_data(self, dataset: Any) -> Any:
        """The training set wrapped as the losses and the teacher cache need (sample indices)."""
        for term in self.terms:
            dataset = term.module.prepare_data(dataset)
        if self._cache is not None:
            dataset = with_index(dataset)
            self._cache.attach(dataset)
        return dataset

    def pretrain_stages(self) -> list[tuple[str, PretrainStage]]:
        """(term name, stage) for every term whose method has a pre-training stage."""
        return [(t.name, t.module.pretrain) for t in self.terms if t.module.pretrain is not None]

    def pretrain_parameters(self, term_name: str) -> list[nn.Parameter]:
        """What the pre-training stage of `term_name` optimizes."""
        term = self._term(term_name)
        stage = term.module.pretrain
        if stage is None:
            raise ConfigError(f"term {term_name!r} ({term.loss}) has no pre-training stage.")
        groups = {
            "student": lambda: self.student.parameters(),
            "adapters": lambda: self.adapters[term.name].parameters() if term.name in self.adapters else iter(()),
            "loss": lambda: term.module.pretrain_parameters(),
        }
        params = list(dict.fromkeys(p for group in stage.trains for p in groups[group]() if p.requires_grad))
        return params

    @contextmanager
    def pretraining(self, term_name: str) -> Iterator[Distiller]:
        """Inside this block, `forward` computes only the pre-training objective of `term_name`."""
        term = self._term(term_name)
        if term.module.pretrain is None:
            raise ConfigError(f"term {term_name!r} ({term.loss}) has no pre-training stage.")
        self._pretraining = term
        try:
            yield self
        finally:
            self._pretraining = None

    def _term(self, name: str) -> Term:
        for term in self.terms:
            if term.name == name:
                return term
        raise ConfigError(f"no term named {name!r}.{did_you_mean(name, [t.name for t in self.terms])}")

    def _pretrain_forward(self, term: Term, x: Any, batch: dict[str, Any]) -> DistillOutput:
        stage = term.module.pretrain
        student_names, teacher_names = self._wanted([term])
        teacher_logits, teacher_feats = self._teacher_pass(x, [term.teacher_index], teacher_names)
        try:
            if stage.uses_student:
                logits, student_feats = self._run(self.student, self._student_capture, x, student_names)
            else:
                logits, student_feats = teacher_logits[term.teacher_index], {}
            parts: dict[str, torch.Tensor] = {}
            value = self._feature_term(term, term.module.pretrain_loss, student_feats,
                                       teacher_feats[term.teacher_index], parts, {}, "/pretrain")
        finally:
            self._clear_captures()
        return DistillOutput(logits, value, {f"{term.name}/pretrain": value}, parts,
                             self._ensemble_logits(teacher_logits))

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


def full_precision_losses(reference: torch.Tensor):
    """Autocast off while losses compute: under mixed precision their inputs arrive in half
    precision, losses upcast them, and matrix products in the losses stay in fp32."""
    return torch.autocast(reference.device.type, enabled=False)


def _device_of(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")
