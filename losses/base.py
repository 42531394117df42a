"""The contract every loss term follows (see featkd.Distiller for how terms are wired).

A loss is an `nn.Module` registered in `featkd.losses.LOSSES`. Its kind is its base class,
which fixes the signature of `forward`:

- `LogitLoss`: `forward(student_logits, teacher_logits, targets)`, where `teacher_logits`
  is one tensor, or a tuple of tensors for a teacher ensemble;
- `FeaturePairLoss`: `forward(student, teacher)` with one (adapted) student feature and the
  teacher feature it is matched with, called once per matched pair;
- `FeatureSetLoss`: `forward(students, teachers)` with the lists of all matched pairs at once
  (for losses that relate layers to each other or weight them by depth).

Hooks a loss may use, all called by the Distiller (and so by the trainer) in a generic way:

- `bind(student_shapes, teacher_shapes)`: build shape-dependent modules (regressors, heads);
  set `has_shape_dependent_parameters = True` so they exist before the optimizer is made;
- `bind_modules(student_modules, teacher_modules)`: the modules the pairs read (OFD's teacher
  batch norms);
- `bind_classes(classes)`: the width of the student's logits, before `bind`, for losses that
  set `reads_class_count` (OFA's branches classify into as many classes);
- `prepare_data(dataset)`: wrap the training set to add fields to each batch (CRD adds the
  sample index), named in `batch_keys` and passed to `forward` as keywords;
- `set_epoch(epoch)`: the loss sees the epoch (DKD's warm-up);
- `pretrain`: a `PretrainStage` the method runs before distillation, with
  `pretrain_loss()` and `pretrain_parameters()` saying on what and what it trains;
- `trained_parameters()`: what distillation trains of the loss (FT's paraphraser is fixed);
- `smoke_params(params)`: cheaper hyper-parameters for a seconds-long wiring check;
- `inference_head()`: the module the student answers through at inference when the method
  replaces its classifier (SimKD), with `head_args()` and the classmethod `build_head(**args)`
  that rebuilds it for a checkpoint (see `featkd.heads`).

It returns a scalar tensor, or a dict of named scalar parts (logged separately, summed into
the term); a `FeatureSetLoss` may return one value per pair. The term's weight is applied
once, by the Distiller, never inside the loss. Teacher inputs are detached, so no gradient
reaches a teacher through a loss. Hyper-parameters are typed constructor arguments with the
literature's defaults, learnable state lives in registered parameters or buffers, and the
docstring cites the paper and gives the formula. `example` shows the loss on the built-in
`cnn` models; the test suite runs every registered loss from it.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from featkd import distributed
from featkd.errors import ConfigError
from featkd.registry import Registry

LOSSES: Registry = Registry("loss", "losses")

Shape = tuple[int, ...]
#: The label of a position nothing is predicted for (an unmasked or padded token of a
#: language-model batch), as in PyTorch's and Hugging Face's losses.
IGNORE_INDEX = -100
TeacherLogits = torch.Tensor | Sequence[torch.Tensor]
#: What a loss returns: a scalar, named scalar parts, or (feature sets) one of those per pair.
LossValue = torch.Tensor | dict[str, torch.Tensor] | list[Any]


@dataclass(frozen=True)
class PretrainStage:
    """A stage a method runs before distillation: what it trains, on what, for how long.

    `trains` names parameter groups: "student" (the student network), "adapters" (this
    term's adapters), "loss" (the loss's own modules, see `pretrain_parameters`). The stage
    minimises `pretrain_loss`, which reads student features only if `uses_student`.
    """

    trains: tuple[str, ...]
    epochs: int = 30
    uses_student: bool = True
    description: str = ""


@dataclass(frozen=True)
class Example:
    """The loss in use on built-in models: the features to capture and the arguments for a
    quick run. Documentation for users, and the data the test suite runs every registered
    loss with. `models` says on which pair: "cnn" (teacher and student of `cnn`'s stage
    layout, `layer1..3`, `fc`, on images) or "transformer" (a 4-layer teacher and a 2-layer
    student of the built-in `transformer`, names `embeddings`, `encoder.layer.N`, ...,
    on padded text)."""

    student: str | Sequence[str] | None = None
    teacher: str | Sequence[str] | None = None
    adapter: str | None = "default"
    params: Mapping[str, Any] = field(default_factory=dict)
    models: str = "cnn"


@dataclass
class TermInputs:
    """What one term reads in one step; the Distiller fills it, the loss's kind reads it."""

    student_logits: torch.Tensor | None
    teacher_logits: TeacherLogits | None
    targets: torch.Tensor | None
    #: adapted student features and their teacher features, one per matched pair
    students: list[torch.Tensor | None] = field(default_factory=list)
    teachers: list[torch.Tensor] = field(default_factory=list)
    #: batch fields the loss asked for in `batch_keys` (CRD's sample index)
    extras: dict[str, Any] = field(default_factory=dict)
    #: (B, T) bool, True at real tokens, for text inputs with an attention mask (else None);
    #: passed to losses that set `reads_mask` as the keyword `mask`
    mask: torch.Tensor | None = None

    def keywords(self, loss: DistillLoss) -> dict[str, Any]:
        """The keyword arguments `loss.forward` takes besides its kind's positional ones."""
        return {**self.extras, "mask": self.mask} if loss.reads_mask else self.extras

    def gathered(self) -> TermInputs:
        """Every tensor concatenated over the processes of a DDP run, gradients flowing to
        this process's own rows only."""

        def gather(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                return distributed.gather_with_local_grad(value)
            if isinstance(value, (list, tuple)):
                return type(value)(gather(v) for v in value)
            return value

        return dataclasses.replace(self, **{f.name: gather(getattr(self, f.name)) for f in dataclasses.fields(self)
                                            if f.name != "extras"},
                                   extras={k: gather(v) for k, v in self.extras.items()})


class DistillLoss(nn.Module):
    """Base class of loss terms: subclass its kind, `LogitLoss`, `FeaturePairLoss` or
    `FeatureSetLoss`, and set the class attributes below as the method needs."""

    #: True for the feature kinds: the term names student and teacher features to capture.
    reads_features: ClassVar[bool] = False
    #: False for losses that only read the student and labels (cross-entropy).
    needs_teacher: ClassVar[bool] = True
    #: Reads the labels of the batch.
    needs_targets: ClassVar[bool] = False
    #: Term weight when the config or Term gives none (the literature's value).
    default_weight: ClassVar[float] = 1.0
    #: Adapter used for the student side when the Term gives none (feature losses).
    default_adapter: ClassVar[str | None] = None
    #: Feature losses comparing element by element: (adapted) shapes must be equal.
    needs_same_shape: ClassVar[bool] = False
    #: `bind` creates parameters, so shapes must be probed before the optimizer is made.
    has_shape_dependent_parameters: ClassVar[bool] = False
    #: `bind_classes` wants the width of the student's logits (probed at set-up).
    reads_class_count: ClassVar[bool] = False
    #: Extra batch fields `forward` takes as keywords (supplied by `prepare_data`).
    batch_keys: ClassVar[tuple[str, ...]] = ()
    #: A stage this method runs before distillation, or None.
    pretrain: ClassVar[PretrainStage | None] = None
    #: Relates samples of a batch, so DDP runs may gather the global batch (`gather: true`).
    relational: ClassVar[bool] = False
    #: Some trained parameters get no gradient in some steps, so a multi-process run must
    #: search the graph for unused parameters at every step (costly: only where needed).
    leaves_parameters_unused: ClassVar[bool] = False
    #: Token-level: `forward` takes `mask=` ((B, T) bool, True at real tokens, or None when
    #: the inputs have no padding) and leaves padding positions out of its value.
    reads_mask: ClassVar[bool] = False
    #: What the student must offer when a feature the term names is missing (added to the error).
    student_hint: ClassVar[str] = ""
    #: How to use the loss on the built-in CNNs (see `Example`).
    example: ClassVar[Example] = Example()

    epoch: int | None = None
    #: Set by a Term with `gather`: in a DDP run, the inputs already hold every process's
    #: samples, so per-sample state needs no gathering of its own.
    sees_global_batch: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        legacy = cls.__dict__.get("consumes")
        if legacy is not None and not issubclass(cls, _KINDS):
            kind = _legacy_kind(legacy, cls.__dict__.get("pairwise", True))
            warnings.warn(f"{cls.__name__}: `consumes = {legacy!r}` is deprecated; subclass "
                          f"featkd.losses.{kind.__name__} instead.", DeprecationWarning, stacklevel=2)
            cls.reads_features, cls.evaluate = kind.reads_features, kind.evaluate  # type: ignore[method-assign]

    def evaluate(self, inputs: TermInputs, objective: Callable[..., LossValue] | None = None) -> LossValue:
        """Call `objective` (default: the loss itself) on what this kind reads; the Distiller's
        only way into a loss. A direct DistillLoss subclass reads logits, as a LogitLoss does."""
        return (objective or self)(inputs.student_logits, inputs.teacher_logits, inputs.targets, **inputs.keywords(self))

    def bind(self, student_shapes: Sequence[Shape], teacher_shapes: Sequence[Shape]) -> None:
        """Called once with the probed per-sample shapes of the (adapted) student features
        and the teacher features, before training; build shape-dependent state here."""

    def bind_classes(self, classes: int) -> None:
        """Called before `bind`, when `reads_class_count` is set, with the width of the
        student's logits (classes, or a vocabulary) probed on the example batch."""

    def bind_modules(self, student_modules: Sequence[nn.Module | None],
                     teacher_modules: Sequence[nn.Module | None]) -> None:
        """Called after `bind` with, per matched pair, the module whose output the pair reads
        (None where it reads an input, an element of a tuple or one call of several): for
        methods that read a module's own state (OFD's margins from the teacher's batch norms)."""

    def prepare_data(self, dataset: Any) -> Any:
        """Return the training set, wrapped if this loss needs more than (input, label)."""
        return dataset

    def set_epoch(self, epoch: int) -> None:
        """The current epoch (1-based), for losses whose weight or state depends on it."""
        self.epoch = epoch

    def trained_parameters(self) -> Iterator[nn.Parameter]:
        """The loss's own parameters distillation trains (all of them, unless a stage fixed some)."""
        return self.parameters()

    def pretrain_loss(self, *args: Any, **kwargs: Any) -> LossValue:
        """The objective of the `pretrain` stage, with `forward`'s signature; by default the loss itself."""
        return self(*args, **kwargs)

    def pretrain_parameters(self) -> Iterator[nn.Parameter]:
        """The loss's own parameters the `pretrain` stage trains (when it trains "loss")."""
        return self.parameters()

    def inference_head(self) -> nn.Module | None:
        """The module the student answers through at inference, fed the (unadapted) student
        feature of the term's first pair, for a method that replaces the student's classifier
        (SimKD's projector and the teacher's classifier); None: the student's own output. A
        loss returning one also defines `head_args()` and `build_head(**head_args())`."""
        return None

    @classmethod
    def smoke_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        """Hyper-parameters for a seconds-long check of a config's wiring (`--smoke`); the
        method's own, unless they cost more than tiny data can use."""
        return params


class LogitLoss(DistillLoss):
    """A loss on outputs: `forward(student_logits, teacher_logits, targets)`.

    `teacher_logits` is one teacher's logits, a tuple of an ensemble's (see `as_ensemble`),
    or None when `needs_teacher` is False; `targets` are the labels (None when the batch has
    none: set `needs_targets` if the loss reads them).
    """


class FeatureLoss(DistillLoss):
    """A loss on captured features (the Term names them with `student=` and `teacher=`)."""

    reads_features = True


class FeaturePairLoss(FeatureLoss):
    """A loss on one matched pair of features: `forward(student, teacher)`, called once per
    pair (`student="layer*"` matches stage by stage); the term is the sum over pairs."""

    def evaluate(self, inputs: TermInputs, objective: Callable[..., LossValue] | None = None) -> LossValue:
        objective = objective or self
        return [objective(s, t, **inputs.keywords(self)) for s, t in zip(inputs.students, inputs.teachers)]


class FeatureSetLoss(FeatureLoss):
    """A loss on all matched pairs at once: `forward(students, teachers)` with lists in
    pair order; it returns one value, or one per pair (logged under each pair's name)."""

    def evaluate(self, inputs: TermInputs, objective: Callable[..., LossValue] | None = None) -> LossValue:
        return (objective or self)(inputs.students, inputs.teachers, **inputs.keywords(self))


_KINDS = (LogitLoss, FeaturePairLoss, FeatureSetLoss)


def _legacy_kind(consumes: str, pairwise: bool) -> type[DistillLoss]:
    """The kind a loss written for featkd 0.1 (`consumes`, `pairwise` flags) declared."""
    if consumes == "logits":
        return LogitLoss
    return FeaturePairLoss if pairwise else FeatureSetLoss


def full_precision(x: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors as float32 (losses are computed in fp32 or better under AMP)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def as_ensemble(teacher_logits: TeacherLogits) -> list[torch.Tensor]:
    """One teacher's logits or an ensemble's, as a list."""
    if isinstance(teacher_logits, torch.Tensor):
        return [teacher_logits]
    return list(teacher_logits)


def ensemble_log_probs(teacher_logits: TeacherLogits, temperature: float) -> torch.Tensor:
    """log of the mean of the teachers' softened probabilities, computed stably.

    log (1/K) sum_k softmax(t_k / T) = logsumexp_k log_softmax(t_k / T) - log K, the softmax
    over the last dimension: classes of (B, C) logits, the vocabulary of (B, T, V) ones.
    """
    logs = [torch.log_softmax(full_precision(t.detach()) / temperature, dim=-1) for t in as_ensemble(teacher_logits)]
    if len(logs) == 1:
        return logs[0]
    return torch.logsumexp(torch.stack(logs), dim=0) - math.log(len(logs))


def check_temperature(name: str, temperature: float) -> None:
    """A softmax temperature must be a finite number above zero."""
    if not temperature > 0 or not math.isfinite(temperature):
        raise ConfigError(f"{name}: temperature must be > 0 (and finite), got {temperature}.")


def softened_kl(student_logits: torch.Tensor, teacher_logits: TeacherLogits, temperature: float) -> torch.Tensor:
    """Hinton's soft-target term, T^2 KL(softmax(t/T) || softmax(s/T)) averaged over the batch
    (over the mean of the teachers' softened probabilities when there are several)."""
    log_p_student = F.log_softmax(full_precision(student_logits) / temperature, dim=1)
    kl = F.kl_div(log_p_student, ensemble_log_probs(teacher_logits, temperature), reduction="batchmean",
                  log_target=True)
    return kl * (temperature * temperature)


def standardize_logits(logits: torch.Tensor, eps: float = 1e-7, unbiased: bool = True) -> torch.Tensor:
    """Z-score of each row of logits over the last dimension (classes, or a vocabulary):
    (z - mean(z)) / (std(z) + eps).

    `unbiased=True` divides the variance by K - 1, as the logit-standardization code does
    (`torch.std`); `unbiased=False` by K (the population standard deviation). The result is
    invariant to a positive scale and a shift of each row.
    """
    if logits.shape[-1] < 2:
        raise ConfigError(f"standardize_logits: a z-score needs at least 2 logits per row, got shape "
                          f"{tuple(logits.shape)}; standardize class or vocabulary logits (last dimension).")
    if not eps >= 0:
        raise ConfigError(f"standardize_logits: eps must be >= 0, got {eps}.")
    logits = full_precision(logits)
    std, mean = torch.std_mean(logits, dim=-1, keepdim=True, correction=1 if unbiased else 0)
    return (logits - mean) / (std + eps)


def standardized(student_logits: torch.Tensor, teacher_logits: TeacherLogits,
                 on: bool) -> tuple[torch.Tensor, TeacherLogits]:
    """Both sides z-scored (logit standardization, Sun et al. 2024) when `on`; each teacher of an
    ensemble on its own."""
    if not on:
        return student_logits, teacher_logits
    teachers = [standardize_logits(t.detach()) for t in as_ensemble(teacher_logits)]
    return standardize_logits(student_logits), teachers[0] if len(teachers) == 1 else teachers


def ensemble_mean_logits(teacher_logits: TeacherLogits) -> torch.Tensor:
    """Mean of the teachers' raw logits (for losses defined on logits, not probabilities)."""
    logits = [t.detach() for t in as_ensemble(teacher_logits)]
    return logits[0] if len(logits) == 1 else torch.stack(logits).mean(0)
