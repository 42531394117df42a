"""Logit distillation on normalized logits: spherical (SKD) and normalized non-target (NKD)
knowledge distillation. (Logit standardization, Sun et al. 2024, is the `standardize` option
of `kd`, `dkd` and `dist`: `featkd.losses.base.standardize_logits`.)"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from featkd.errors import ConfigError
from featkd.losses.base import (
    IGNORE_INDEX,
    LOSSES,
    LogitLoss,
    TeacherLogits,
    as_ensemble,
    check_temperature,
    ensemble_log_probs,
    full_precision,
)


def _check_logits(name: str, student_logits: torch.Tensor, teacher_logits: TeacherLogits) -> list[torch.Tensor]:
    """The teachers' logits as a list, each of the student's shape (B, C), C >= 2."""
    teachers = as_ensemble(teacher_logits)
    if student_logits.dim() != 2 or student_logits.shape[1] < 2:
        raise ConfigError(f"{name}: expects class logits of shape (batch, classes >= 2), got student logits "
                          f"{tuple(student_logits.shape)}.")
    for t in teachers:
        if t.shape != student_logits.shape:
            raise ConfigError(f"{name}: teacher logits {tuple(t.shape)} and student logits "
                              f"{tuple(student_logits.shape)} differ; both must predict the same classes.")
    return teachers


def _check_targets(name: str, targets: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
    """Integer labels (B,), each a class index or IGNORE_INDEX (-100, unlabelled); returns the labelled rows."""
    if targets is None:
        raise ConfigError(f"{name}: needs the labels; call the loss (or the Distiller) with targets.")
    if targets.dim() != 1 or len(targets) != len(logits) or targets.is_floating_point():
        raise ConfigError(f"{name}: needs one integer class label per sample, shape ({len(logits)},), got "
                          f"{tuple(targets.shape)} of {targets.dtype}.")
    labelled = targets != IGNORE_INDEX
    bad = labelled & ((targets < 0) | (targets >= logits.shape[1]))
    if bad.any():
        raise ConfigError(f"{name}: label {targets[bad][0].item()} is not a class index in [0, {logits.shape[1]}).")
    return labelled


def _layer_normalized(logits: torch.Tensor, eps: float) -> torch.Tensor:
    """(z - mean(z)) / sqrt(var(z) + eps) over the classes, variance divided by C: layer
    normalization without affine parameters, as the spherical-KD code normalizes."""
    logits = full_precision(logits)
    return F.layer_norm(logits, logits.shape[-1:], eps=eps)


@LOSSES.register("skd")
class SphericalKD(LogitLoss):
    """Spherical KD (Guo et al. 2020, "Reducing the Teacher-Student Gap via Spherical
    Knowledge Distillation").

    Student and teacher logits are centred and put on one sphere, so the student learns the
    teacher's direction, not its confidence:
    z' = r * (z - mean(z)) / sqrt(var(z) + eps)  (layer normalization over the C classes),
    with r the teacher's std averaged over the batch, so that the sphere's radius is the
    teacher's mean norm of centred logits; a fixed `multiplier` replaces r, as the official
    code's `--multiplier` does (2 in its ImageNet command). The cross-entropy with the labels
    is computed on the student's projected logits too, as the official code requires:
    L = alpha * T^2 * KL(softmax(t'/T) || softmax(s'/T)) + (1 - alpha) * CE(s', y),
    parts "kd" and "ce" (so a config leaves out the separate `ce` term). The projection keeps
    each sample's predicted class. Defaults: T = 4, alpha = 0.9 (the official script's value
    for its first 60 of 100 ImageNet epochs, then 0.5 and 0.1). Labels of -100 leave their
    samples out of the cross-entropy. With several teachers, r is their mean and their
    softened probabilities are averaged.
    """

    needs_targets = True

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9, multiplier: float | None = None,
                 eps: float = 1e-7) -> None:
        super().__init__()
        check_temperature("skd", temperature)
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"skd: alpha is the share of the distillation part, in [0, 1], got {alpha}.")
        if multiplier is not None and (not multiplier > 0 or not math.isfinite(multiplier)):
            raise ConfigError(f"skd: multiplier (the projected logits' std) must be a finite number > 0, or None "
                              f"for the teacher's mean std; got {multiplier}.")
        if not eps >= 0:
            raise ConfigError(f"skd: eps must be >= 0, got {eps}.")
        self.temperature, self.alpha, self.multiplier, self.eps = temperature, alpha, multiplier, eps

    def forward(self, student_logits: torch.Tensor, teacher_logits: TeacherLogits,
                targets: torch.Tensor) -> dict[str, torch.Tensor]:
        teachers = [full_precision(z.detach()) for z in _check_logits("skd", student_logits, teacher_logits)]
        if self.multiplier is None:
            radius = torch.stack([z.std(dim=1, correction=0).mean() for z in teachers]).mean()
        else:
            radius = self.multiplier
        student = _layer_normalized(student_logits, self.eps) * radius
        teachers = [_layer_normalized(z, self.eps) * radius for z in teachers]
        t = self.temperature
        kl = F.kl_div(F.log_softmax(student / t, dim=1), ensemble_log_probs(teachers, t), reduction="batchmean",
                      log_target=True)
        parts = {"kd": self.alpha * t * t * kl}
        if self.alpha < 1.0:
            labelled = _check_targets("skd", targets, student)
            # a batch with no labelled sample gives 0, not 0/0
            ce = F.cross_entropy(student, targets, ignore_index=IGNORE_INDEX) if labelled.any() else student.sum() * 0
            parts["ce"] = (1.0 - self.alpha) * ce
        return parts

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}, multiplier={self.multiplier}, eps={self.eps}"


def _without_target(log_p: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax over the non-target classes of each row, from log-probabilities (B, C - 1)."""
    keep = torch.ones_like(log_p, dtype=torch.bool).scatter_(1, targets[:, None], False)
    rest = log_p[keep].view(len(log_p), -1)
    return rest - rest.logsumexp(1, keepdim=True)


@LOSSES.register("nkd")
class NormalizedKD(LogitLoss):
    """Normalized KD (Yang et al., ICCV 2023, "From Knowledge Distillation to
    Self-Knowledge Distillation: A Unified Approach with Normalized Loss and Customized Soft
    Labels").

    KD's soft loss split at the target class, its non-target part normalized to sum to 1:
    L = -(1/B) sum_i [ p^t_{y_i} log p^s_{y_i}
                       + gamma * T^2 * sum_{j != y_i} q^t_j log q^s_j ],
    p = softmax(z) at temperature 1, q = softmax over the non-target logits z_j / T (the
    softened non-target distribution renormalized). Parts "target" and "non_target". It is a
    cross-entropy form, as in the paper: the non-target part is smallest, at gamma T^2 times
    the teacher's non-target entropy, when q^s = q^t, and does not depend on the target
    logit. Used next to the cross-entropy with the labels (weight 1). Defaults are the
    official ImageNet setting, T = 1, gamma = 1.5; its CIFAR-100 config uses T = 3 and
    gamma = 3.5. Labels of -100 leave their samples out. With several teachers, p^t is the
    mean of their probabilities.
    """

    needs_targets = True

    def __init__(self, temperature: float = 1.0, gamma: float = 1.5) -> None:
        super().__init__()
        check_temperature("nkd", temperature)
        if not gamma >= 0 or not math.isfinite(gamma):
            raise ConfigError(f"nkd: gamma weighs the non-target part and must be a finite number >= 0, got {gamma}.")
        self.temperature, self.gamma = temperature, gamma

    def forward(self, student_logits: torch.Tensor, teacher_logits: TeacherLogits,
                targets: torch.Tensor) -> dict[str, torch.Tensor]:
        teachers = _check_logits("nkd", student_logits, teacher_logits)
        labelled = _check_targets("nkd", targets, student_logits)
        if not labelled.all():  # unlabelled samples (-100) have no target class to split at
            if not labelled.any():
                zero = full_precision(student_logits).sum() * 0.0
                return {"target": zero, "non_target": zero}
            student_logits, targets = student_logits[labelled], targets[labelled]
            teachers = [z[labelled] for z in teachers]
        s = full_precision(student_logits)
        y = targets[:, None]
        log_p_s = F.log_softmax(s, dim=1)
        p_t = ensemble_log_probs(teachers, 1.0).exp()
        target = -(p_t.gather(1, y) * log_p_s.gather(1, y)).mean()
        t = self.temperature
        log_q_s = _without_target(F.log_softmax(s / t, dim=1), targets)
        q_t = _without_target(ensemble_log_probs(teachers, t), targets).exp()
        non_target = -(q_t * log_q_s).sum(1).mean()
        return {"target": target, "non_target": self.gamma * t * t * non_target}

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gamma={self.gamma}"
