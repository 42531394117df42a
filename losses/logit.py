"""Losses on logits: the task loss and logit distillation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from featkd.errors import ConfigError
from featkd.losses.base import LOSSES, DistillLoss, TeacherLogits, ensemble_log_probs, full_precision


@LOSSES.register("ce")
class CrossEntropy(DistillLoss):
    """Cross-entropy with the labels (the task loss; no teacher).

    L = -(1/B) sum_i log softmax(s_i)[y_i], optionally with label smoothing.
    """

    needs_teacher = False
    needs_targets = True

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: TeacherLogits | None, targets: torch.Tensor
    ) -> torch.Tensor:
        return F.cross_entropy(student_logits, targets, label_smoothing=self.label_smoothing)


@LOSSES.register("kd")
class KDLoss(DistillLoss):
    """Hinton KD (Hinton, Vinyals & Dean 2015): match the teacher's softened outputs.

    L = T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over the batch. The T^2 factor keeps
    the gradient scale independent of T. With several teachers, softmax(t/T) is the mean of
    their softened probabilities (Hinton's ensemble distillation).
    """

    default_weight = 0.9

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ConfigError(f"kd: temperature must be > 0, got {temperature}.")
        self.temperature = temperature

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: TeacherLogits, targets: torch.Tensor | None = None
    ) -> torch.Tensor:
        t = self.temperature
        log_p_student = F.log_softmax(full_precision(student_logits) / t, dim=1)
        log_p_teacher = ensemble_log_probs(teacher_logits, t)
        kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
        return kl * (t * t)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
