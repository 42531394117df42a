"""The contract every loss term follows (see featkd.Distiller for how terms are wired).

A loss is an `nn.Module` registered in `featkd.losses.LOSSES`. It declares what it consumes:

- `consumes = "logits"`: `forward(student_logits, teacher_logits, targets)`, where
  `teacher_logits` is one tensor, or a tuple of tensors for a teacher ensemble;
- `consumes = "features"`: `forward(student, teacher)` with one (adapted) student feature
  and the teacher feature it is matched with, called once per matched pair; a loss with
  `pairwise = False` gets the lists of all pairs at once instead.

Hooks a loss may use, all called by the Distiller (and so by the trainer) in a generic way:

- `bind(student_shapes, teacher_shapes)`: build shape-dependent modules (regressors, heads);
  set `has_shape_dependent_parameters = True` so they exist before the optimizer is made;
- `prepare_data(dataset)`: wrap the training set to add fields to each batch (CRD adds the
  sample index), named in `batch_keys` and passed to `forward` as keywords;
- `set_epoch(epoch)`: the loss sees the epoch (DKD's warm-up);
- `pretrain`: a `PretrainStage` the method runs before distillation, with
  `pretrain_loss()` and `pretrain_parameters()` saying on what and what it trains.

It returns a scalar tensor, or a dict of named scalar parts (logged separately, summed into
the term). The term's weight is applied once, by the Distiller, never inside the loss.
Teacher inputs are detached, so no gradient reaches a teacher through a loss.
Hyper-parameters are typed constructor arguments with the literature's defaults, learnable
state lives in registered parameters or buffers, and the docstring cites the paper and gives
the formula.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from featkd.registry import Registry

LOSSES: Registry = Registry("loss", "losses")

Shape = tuple[int, ...]
TeacherLogits = torch.Tensor | Sequence[torch.Tensor]


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


class DistillLoss(nn.Module):
    """Base class of loss terms; subclasses set the class attributes below."""

    consumes: ClassVar[Literal["logits", "features"]] = "logits"
    #: False for losses that only read the student and labels (cross-entropy).
    needs_teacher: ClassVar[bool] = True
    #: Reads the labels of the batch.
    needs_targets: ClassVar[bool] = False
    #: Term weight when the config or Term gives none (the literature's value).
    default_weight: ClassVar[float] = 1.0
    #: Adapter used for the student side when the Term gives none (feature losses).
    default_adapter: ClassVar[str | None] = None
    #: Feature losses: called per (student, teacher) pair, or once with all pairs.
    pairwise: ClassVar[bool] = True
    #: Feature losses comparing element by element: (adapted) shapes must be equal.
    needs_same_shape: ClassVar[bool] = False
    #: `bind` creates parameters, so shapes must be probed before the optimizer is made.
    has_shape_dependent_parameters: ClassVar[bool] = False
    #: Extra batch fields `forward` takes as keywords (supplied by `prepare_data`).
    batch_keys: ClassVar[tuple[str, ...]] = ()
    #: A stage this method runs before distillation, or None.
    pretrain: ClassVar[PretrainStage | None] = None
    #: Relates samples of a batch, so DDP runs may gather the global batch (`gather: true`).
    relational: ClassVar[bool] = False

    epoch: int | None = None

    def bind(self, student_shapes: Sequence[Shape], teacher_shapes: Sequence[Shape]) -> None:
        """Called once with the probed per-sample shapes of the (adapted) student features
        and the teacher features, before training; build shape-dependent state here."""

    def prepare_data(self, dataset: Any) -> Any:
        """Return the training set, wrapped if this loss needs more than (input, label)."""
        return dataset

    def set_epoch(self, epoch: int) -> None:
        """The current epoch (1-based), for losses whose weight or state depends on it."""
        self.epoch = epoch

    def pretrain_loss(self, student: Any, teacher: Any) -> torch.Tensor | dict[str, torch.Tensor]:
        """The objective of the `pretrain` stage; by default the loss itself."""
        return self(student, teacher)

    def pretrain_parameters(self) -> Iterator[nn.Parameter]:
        """The loss's own parameters the `pretrain` stage trains (when it trains "loss")."""
        return self.parameters()


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

    log (1/K) sum_k softmax(t_k / T) = logsumexp_k log_softmax(t_k / T) - log K
    """
    logs = [torch.log_softmax(full_precision(t.detach()) / temperature, dim=1) for t in as_ensemble(teacher_logits)]
    if len(logs) == 1:
        return logs[0]
    return torch.logsumexp(torch.stack(logs), dim=0) - math.log(len(logs))


def ensemble_mean_logits(teacher_logits: TeacherLogits) -> torch.Tensor:
    """Mean of the teachers' raw logits (for losses defined on logits, not probabilities)."""
    logits = [t.detach() for t in as_ensemble(teacher_logits)]
    return logits[0] if len(logits) == 1 else torch.stack(logits).mean(0)
