"""Losses on logits: the task loss and logit distillation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from featkd.errors import ConfigError
from featkd.losses.base import (
    IGNORE_INDEX,
    LOSSES,
    Example,
    LogitLoss,
    TeacherLogits,
    check_temperature,
    ensemble_log_probs,
    ensemble_mean_logits,
    full_precision,
    softened_kl,
    standardized,
)

#: The label of positions nothing is predicted for (padding, unmasked tokens of masked-LM).


@LOSSES.register("ce")
class CrossEntropy(LogitLoss):
    """Cross-entropy with the labels (the task loss; no teacher).

    L = -(1/B) sum_i log softmax(s_i)[y_i], optionally with label smoothing. Samples labelled
    -100 have no label and are left out of the mean (the augmented copies of a transfer set,
    `featkd.transfer_set`); a batch with none labelled gives 0. Token-level logits (B, T, V)
    with labels (B, T) give the language-modelling loss: the mean over the positions whose
    label is not -100 (the masked tokens of masked-LM, DistilBERT's L_mlm; padding), 0 when a
    batch has none.
    """

    needs_teacher = False
    needs_targets = True

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing <= 1.0:
            raise ConfigError(f"ce: label_smoothing must be in [0, 1], got {label_smoothing}.")
        self.label_smoothing = label_smoothing

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: TeacherLogits | None, targets: torch.Tensor
    ) -> torch.Tensor:
        logits = full_precision(student_logits)
        if logits.dim() <= 2:
            if not (targets != IGNORE_INDEX).any():  # no sample of this batch is labelled: 0, not 0/0
                return logits.sum() * 0.0
            return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, label_smoothing=self.label_smoothing)
        if targets.shape != logits.shape[:-1]:
            raise ConfigError(f"ce: token-level logits {tuple(logits.shape)} need labels of shape "
                              f"{tuple(logits.shape[:-1])}, got {tuple(targets.shape)}.")
        targets = targets.reshape(-1)
        if not (targets != IGNORE_INDEX).any():  # nothing to predict in this batch: 0, not 0/0
            return logits.sum() * 0.0
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, ignore_index=IGNORE_INDEX,
                               label_smoothing=self.label_smoothing)


@LOSSES.register("kd")
class KDLoss(LogitLoss):
    """Hinton KD (Hinton, Vinyals & Dean 2015): match the teacher's softened outputs.

    L = T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over the batch. The T^2 factor keeps
    the gradient scale independent of T. With several teachers, softmax(t/T) is the mean of
    their softened probabilities (Hinton's ensemble distillation).

    `standardize` (logit standardization, Sun et al. 2024, as in kd, dkd and dist): each
    sample's logits, student and teacher apart, are z-scored first, Z(z) = (z - mean z) /
    (std z + 1e-7) with the std over C - 1 as the authors' code. The student then matches the
    teacher's logit relations, not their range: the loss is 0 for s = a t + b, a > 0. The
    paper's CIFAR-100 setting is T = 2 with weight 9 (cross-entropy 0.1).
    """

    default_weight = 0.9

    def __init__(self, temperature: float = 4.0, standardize: bool = False) -> None:
        super().__init__()
        check_temperature("kd", temperature)
        self.temperature, self.standardize = temperature, standardize

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: TeacherLogits, targets: torch.Tensor | None = None
    ) -> torch.Tensor:
        return softened_kl(*standardized(student_logits, teacher_logits, self.standardize), self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, standardize={self.standardize}"


@LOSSES.register("logit_mse")
class LogitMSE(LogitLoss):
    """Logit matching (Ba & Caruana 2014): regress the teacher's raw logits.

    L = mean over batch and classes of (s - t)^2, on logits before the softmax. With several
    teachers, t is the mean of their logits.
    """

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: TeacherLogits, targets: torch.Tensor | None = None
    ) -> torch.Tensor:
        return F.mse_loss(full_precision(student_logits), full_precision(ensemble_mean_logits(teacher_logits)))


@LOSSES.register("dkd")
class DKDLoss(LogitLoss):
    """Decoupled KD (Zhao et al. 2022): KD split into target-class and non-target-class parts.

    L = w(epoch) * T^2 * (alpha * KL(b_t || b_s) + beta * KL(q_t || q_s)), where b = (p_gt,
    1 - p_gt) are the binary target/non-target probabilities, q the softmax over the
    non-target classes, all at temperature T; w(epoch) = min(epoch / warmup, 1) ramps the
    term in over the first `warmup` epochs (call `distiller.set_epoch`; the trainer does).
    `standardize` z-scores the logits first (see `kd`); with it the paper of logit
    standardization uses T = 2 and alpha, beta multiplied by 9 (9 and 72).
    """

    needs_targets = True
    default_weight = 1.0
    example = Example(params={"warmup": 0})

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, warmup: int = 20,
                 standardize: bool = False) -> None:
        super().__init__()
        check_temperature("dkd", temperature)
        if warmup < 0:
            raise ConfigError(f"dkd: warmup is a number of epochs >= 0, got {warmup}.")
        self.alpha, self.beta, self.temperature, self.warmup = alpha, beta, temperature, warmup
        self.standardize = standardize

    def forward(self, student_logits: torch.Tensor, teacher_logits: TeacherLogits,
                targets: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.warmup and self.epoch is None:
            raise ConfigError(
                "dkd: the warm-up needs the epoch; call distiller.set_epoch(epoch) at the start of each "
                "epoch (the featkd trainer does), or set warmup=0."
            )
        ramp = min(self.epoch / self.warmup, 1.0) if self.warmup else 1.0
        student_logits, teacher_logits = standardized(student_logits, teacher_logits, self.standardize)
        t = self.temperature
        log_p_s = F.log_softmax(full_precision(student_logits) / t, dim=1)
        log_p_t = ensemble_log_probs(teacher_logits, t)
        target_mask = F.one_hot(targets, log_p_s.shape[1]).bool()
        tckd = F.kl_div(_binary_log_probs(log_p_s, target_mask), _binary_log_probs(log_p_t, target_mask),
                        reduction="batchmean", log_target=True)
        nckd = F.kl_div(_non_target_log_probs(log_p_s, target_mask), _non_target_log_probs(log_p_t, target_mask),
                        reduction="batchmean", log_target=True)
        scale = ramp * t * t
        return {"tckd": scale * self.alpha * tckd, "nckd": scale * self.beta * nckd}

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}, warmup={self.warmup}, "
                f"standardize={self.standardize}")


def _binary_log_probs(log_p: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """(log p_gt, log(1 - p_gt)) per row, from log-probabilities, without cancellation."""
    log_target = log_p.masked_fill(~target_mask, float("-inf")).logsumexp(1)
    log_rest = log_p.masked_fill(target_mask, float("-inf")).logsumexp(1)
    return torch.stack([log_target, log_rest], dim=1)


def _non_target_log_probs(log_p: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """log softmax over the non-target classes only; the target column is dropped."""
    rest = log_p[~target_mask].view(len(log_p), -1)
    return rest - rest.logsumexp(1, keepdim=True)


@LOSSES.register("dist")
class DISTLoss(LogitLoss):
    """DIST (Huang et al. 2022): match relations of predictions, not their exact values.

    With p = softmax(z / T) over a batch (B x C): L = T^2 * (beta * (1 - mean_i rho(p_s[i], p_t[i]))
    + gamma * (1 - mean_c rho(p_s[:, c], p_t[:, c]))), rho the Pearson correlation: the
    inter-class relation per sample and the intra-class relation per class. The paper uses
    T = 1 on ImageNet; its CIFAR setting is T = 4 with term weight 2. `standardize` z-scores
    the logits first (see `kd`; no published DIST setting uses it).
    """

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0,
                 standardize: bool = False) -> None:
        super().__init__()
        check_temperature("dist", temperature)
        self.beta, self.gamma, self.temperature, self.standardize = beta, gamma, temperature, standardize

    def forward(self, student_logits: torch.Tensor, teacher_logits: TeacherLogits,
                targets: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        student_logits, teacher_logits = standardized(student_logits, teacher_logits, self.standardize)
        t = self.temperature
        p_s = F.softmax(full_precision(student_logits) / t, dim=1)
        p_t = ensemble_log_probs(teacher_logits, t).exp()
        inter = 1 - _pearson(p_s, p_t).mean()
        intra = 1 - _pearson(p_s.t(), p_t.t()).mean()
        return {"inter": t * t * self.beta * inter, "intra": t * t * self.gamma * intra}

    def extra_repr(self) -> str:
        return f"beta={self.beta}, gamma={self.gamma}, temperature={self.temperature}, standardize={self.standardize}"


def _pearson(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row of a with the same row of b."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)
