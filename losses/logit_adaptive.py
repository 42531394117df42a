"""Logit distillation beyond one KL divergence at one fixed temperature: relations at several
temperatures (MLKD), a temperature learned adversarially (CTKD), and optimal transport between
class distributions (WKD-L)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from featkd import distributed
from featkd.errors import ConfigError
from featkd.losses.base import (
    IGNORE_INDEX,
    LOSSES,
    Example,
    LogitLoss,
    TeacherLogits,
    as_ensemble,
    check_temperature,
    ensemble_log_probs,
    ensemble_mean_logits,
    full_precision,
)

__all__ = ["CTKDLoss", "MLKDLoss", "WKDLoss", "cka_distances", "gradient_reversal", "sinkhorn_cost"]


def _check_logits(name: str, student_logits: torch.Tensor, teacher_logits: TeacherLogits) -> None:
    """Class logits (B, C), C >= 2, the same shape for the student and every teacher."""
    if student_logits.dim() != 2 or student_logits.shape[1] < 2:
        raise ConfigError(f"{name}: expects class logits of shape (batch, classes >= 2), got student logits "
                          f"{tuple(student_logits.shape)}; token-level logits are not supported by this loss.")
    for t in as_ensemble(teacher_logits):
        if t.shape != student_logits.shape:
            raise ConfigError(f"{name}: teacher logits {tuple(t.shape)} and student logits "
                              f"{tuple(student_logits.shape)} differ; both must predict the same classes.")


# -- MLKD ----------------------------------------------------------------------------------


def _kept(values: torch.Tensor, keep: str) -> torch.Tensor:
    """Which entries of `values` a confidence mask keeps: at most (or at least) their median,
    the median interpolated between the two middle values as numpy's percentile does."""
    if keep == "all":
        return torch.ones_like(values, dtype=torch.bool)
    median = torch.quantile(values, 0.5)
    return values <= median if keep == "less_confident" else values >= median


@LOSSES.register("mlkd")
class MLKDLoss(LogitLoss):
    """Multi-level logit distillation (Jin, Wang & Lin, CVPR 2023): align predictions at the
    instance, batch and class level, each at several temperatures ("prediction augmentation").

    With P = softmax(z / tau) over the batch (B x C), for every tau in `temperatures`:
    instance: tau^2 (1/B) sum_i m_i KL(p_t,i || p_s,i);
    batch:    (1/B) sum_{i,j} m_i m_j (G_t - G_s)_ij^2 with G = P P^T (B x B, sample relations);
    class:    (1/C) sum_{c,d} k_c k_d (M_t - M_s)_cd^2 with M = P^T P (C x C, class relations);
    each level summed over the temperatures. Confidence masks from the teacher at tau = 1:
    m_i keeps sample i when the teacher's top probability is at most the batch median, k_c
    keeps class c when the teacher's probability mass on c over the batch is at most the median
    over classes (`keep="less_confident"`, the reference code's comparison; "more_confident"
    keeps the other half, "all" masks nothing). Temperatures 2..6 are the CIFAR recipe (the
    reference code's T = 4 plus 3, 5, 2, 6); ImageNet uses 1, 2, 3, 5, 6. The paper's recipe
    also trains on a weakly and a strongly augmented view of each batch (masks on the weak
    view only); that is a data protocol: this loss sees the one view the Distiller gives it.
    """

    default_weight = 0.9

    def __init__(self, temperatures: tuple[float, ...] = (2.0, 3.0, 4.0, 5.0, 6.0),
                 keep: Literal["less_confident", "more_confident", "all"] = "less_confident") -> None:
        super().__init__()
        if not temperatures:
            raise ConfigError("mlkd: temperatures must list at least one temperature, e.g. [2, 3, 4, 5, 6].")
        for t in temperatures:
            check_temperature("mlkd", t)
        if keep not in ("less_confident", "more_confident", "all"):
            raise ConfigError(f"mlkd: keep is 'less_confident', 'more_confident' or 'all', got {keep!r}.")
        self.temperatures, self.keep = tuple(float(t) for t in temperatures), keep

    def masks(self, teacher_logits: TeacherLogits) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) samples and (C,) classes kept, from the teacher's probabilities at tau = 1."""
        with torch.no_grad():
            p_t = ensemble_log_probs(teacher_logits, 1.0).exp()
            return _kept(p_t.max(1).values, self.keep), _kept(p_t.sum(0), self.keep)

    def forward(self, student_logits: torch.Tensor, teacher_logits: TeacherLogits,
                targets: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        _check_logits("mlkd", student_logits, teacher_logits)
        samples, classes = self.masks(teacher_logits)
        batch, num_classes = student_logits.shape
        dtype = full_precision(student_logits).dtype
        m, k = samples.to(dtype), classes.to(dtype)
        pair_samples, pair_classes = m[:, None] * m[None, :], k[:, None] * k[None, :]
        instance = batch_level = class_level = 0.0
        for tau in self.temperatures:
            log_p_s = F.log_softmax(full_precision(student_logits) / tau, dim=1)
            log_p_t = ensemble_log_probs(teacher_logits, tau)
            p_s, p_t = log_p_s.exp(), log_p_t.exp()
            kl = (p_t * (log_p_t - log_p_s)).sum(1)
            instance = instance + tau * tau * (m * kl).sum() / batch
            batch_level = batch_level + (pair_samples * (p_t @ p_t.t() - p_s @ p_s.t()).pow(2)).sum() / batch
            class_level = class_level + (pair_classes * (p_t.t() @ p_t - p_s.t() @ p_s).pow(2)).sum() / num_classes
        return {"instance": instance, "batch": batch_level, "class": class_level}

    def extra_repr(self) -> str:
        return f"temperatures={self.temperatures}, keep={self.keep!r}"


# -- CTKD ----------------------------------------------------------------------------------


class _GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by -scale (Ganin & Lempitsky 2015)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad * -ctx.scale, None


def gradient_reversal(x: torch.Tensor, scale: float) -> torch.Tensor:
    """`x` unchanged; the gradient flowing back through it is multiplied by -scale."""
    return _GradientReversal.apply(x, scale)


@LOSSES.register("ctkd")
class CTKDLoss(LogitLoss):
    """Curriculum temperature for KD (Li et al., AAAI 2023): Hinton's KD at a temperature that
    is learned adversarially, on an easy-to-hard curriculum.

    L = mean_i tau_i^2 KL(softmax(t_i / tau_i) || softmax(s_i / tau_i)), with
    tau = temperature_min + temperature_range * sigmoid(theta). theta is one learned scalar
    (`mode="global"`, initialised to `init`), or the output of a 2-layer MLP on the teacher's and
    the student's logits, one per sample (`mode="instance"`; needs `num_classes`). theta reaches
    the loss through a gradient-reversal layer (identity forward, gradient times -lambda
    backward), so the run's optimizer moves the temperature to *increase* the KD term while the
    student decreases it. lambda follows a cosine curriculum over the (1-based) epoch e:
    lambda(e) = lambda_min + (lambda_max - lambda_min) (1 - cos(pi min(e, E) / E)) / 2,
    E = `curriculum_epochs` (0: lambda_max from the start). The paper's CIFAR setting:
    tau in (1, 21), theta starts at 1 (tau ~ 15.6), lambda from 0 to 1 over 10 epochs, with
    CE 0.1 and KD 0.9. The temperature module's own parameters are trained by the run's
    optimizer (`trained_parameters()`); the MLP reads detached logits, so it never trains
    the student.
    """

    default_weight = 0.9
    example = Example(params={"curriculum_epochs": 0})

    def __init__(self, temperature_min: float = 1.0, temperature_range: float = 20.0, init: float = 1.0,
                 lambda_min: float = 0.0, lambda_max: float = 1.0, curriculum_epochs: int = 10,
                 mode: Literal["global", "instance"] = "global", num_classes: int | None = None,
                 hidden: int = 128) -> None:
        super().__init__()
        check_temperature("ctkd: temperature_min", temperature_min)
        if not temperature_range > 0 or not math.isfinite(temperature_range):
            raise ConfigError(f"ctkd: temperature_range must be > 0 (the temperature's learnable span above "
                              f"temperature_min), got {temperature_range}; for a fixed temperature use kd.")
        if not 0 <= lambda_min <= lambda_max:
            raise ConfigError(f"ctkd: the curriculum needs 0 <= lambda_min <= lambda_max, got lambda_min="
                              f"{lambda_min} and lambda_max={lambda_max}.")
        if curriculum_epochs < 0:
            raise ConfigError(f"ctkd: curriculum_epochs is a number of epochs >= 0, got {curriculum_epochs}.")
        if mode not in ("global", "instance"):
            raise ConfigError(f"ctkd: mode is 'global' (one temperature) or 'instance' (one per sample), got {mode!r}.")
        self.temperature_min, self.temperature_range = float(temperature_min), float(temperature_range)
        self.lambda_min, self.lambda_max, self.curriculum_epochs = lambda_min, lambda_max, curriculum_epochs
        self.mode, self.num_classes, self.hidden = mode, num_classes, hidden
        if mode == "global":
            self.theta = nn.Parameter(torch.full((1,), float(init)))
            return
        if num_classes is None or num_classes < 2 or hidden < 1:
            raise ConfigError(
                "ctkd: mode='instance' predicts each sample's temperature with an MLP on the teacher's and "
                f"student's logits, so it needs num_classes (the logits' width, >= 2) and hidden >= 1; got "
                f"num_classes={num_classes}, hidden={hidden}. Set loss.ctkd.num_classes (10 for digits)."
            )
        self.mlp = nn.Sequential(nn.Linear(2 * num_classes, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        with torch.no_grad():  # every sample starts at the global module's temperature
            self.mlp[2].weight.zero_()
            self.mlp[2].bias.fill_(float(init))

    def curriculum(self, epoch: int | None) -> float:
        """lambda, the gradient-reversal strength, at (1-based) `epoch`."""
        if not self.curriculum_epochs:
            return self.lambda_max
        if epoch is None:
            raise ConfigError(
                "ctkd: the temperature curriculum needs the epoch; call distiller.set_epoch(epoch) at the start "
                "of each epoch (the featkd trainer does), or set curriculum_epochs=0."
            )
        progress = min(max(epoch, 0), self.curriculum_epochs) / self.curriculum_epochs
        return self.lambda_min + (self.lambda_max - self.lambda_min) * (1 - math.cos(math.pi * progress)) / 2

    def _theta(self, student_logits: torch.Tensor, teacher_logits: TeacherLogits) -> torch.Tensor:
        if self.mode == "global":
            return self.theta
        features = torch.cat([full_precision(ensemble_mean_logits(teacher_logits)),
                              full_precision(student_logits.detach())], dim=1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))

    def temperature(self, student_logits: torch.Tensor | None = None,
                    teacher_logits: TeacherLogits | None = None) -> torch.Tensor:
        """The current temperature, detached: (1,) for the global module, (B, 1) per sample
        (from the given logits) for the instance one."""
        with torch.no_grad():
            if self.mode == "instance" and (student_logits is None or teacher_logits is None):
                raise ConfigError("ctkd: the instance-wise temperature depends on the logits; pass them.")
            theta = self._theta(student_logits, teacher_logits)  # type: ignore[arg-type]
            return self.temperature_min + self.temperature_range * torch.sigmoid(theta)

    def forward(self, student_logits: torch.Tensor, teacher_logits: TeacherLogits,
                targets: torch.Tensor | None = None) -> torch.Tensor:
        _check_logits("ctkd", student_logits, teacher_logits)
        if self.mode == "instance" and student_logits.shape[1] != self.num_classes:
            raise ConfigError(f"ctkd: the instance-wise temperature MLP was built for num_classes="
                              f"{self.num_classes}, but the logits have {student_logits.shape[1]} classes.")
        theta = gradient_reversal(self._theta(student_logits, teacher_logits), self.curriculum(self.epoch))
        tau = self.temperature_min + self.temperature_range * torch.sigmoid(full_precision(theta))
        log_p_s = F.log_softmax(full_precision(student_logits) / tau, dim=1)
        log_p_t = ensemble_log_probs(teacher_logits, tau)  # teacher logits detached; tau keeps its graph
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(1)
        return (tau.squeeze(-1) ** 2 * kl).mean()

    def extra_repr(self) -> str:
        return (f"mode={self.mode!r}, temperature_min={self.temperature_min}, temperature_range="
                f"{self.temperature_range}, lambda=[{self.lambda_min}, {self.lambda_max}], "
                f"curriculum_epochs={self.curriculum_epochs}")


# -- WKD-L ---------------------------------------------------------------------------------


def sinkhorn_cost(p: torch.Tensor, q: torch.Tensor, cost: torch.Tensor, reg: float, iterations: int,
                  support: torch.Tensor | None = None, eps: float = 1e-8) -> torch.Tensor:
    """Entropy-regularised transport cost between the rows of `p` and `q` (B, N): sum_jk Pi_jk
    cost_jk, Pi = diag(u) K diag(v), K = exp(-cost / reg), after `iterations` Sinkhorn steps
    v = q / (K^T u + eps), u = p / (K v + eps) from u uniform over `support` (a (B, N) bool
    mask, every entry when None; entries outside it carry no mass). Differentiable through
    the iterations; never builds a (B, N, N) tensor."""
    if iterations < 1:
        raise ConfigError(f"sinkhorn_cost: needs at least one iteration, got {iterations}.")
    kernel = torch.exp(-cost / reg)
    weighted = kernel * cost
    u = torch.ones_like(p) if support is None else support.to(p.dtype)
    u = u / u.sum(1, keepdim=True)
    for _ in range(iterations):
        v = q / (u @ kernel + eps)
        u = p / (v @ kernel.t() + eps)
    return ((u @ weighted) * v).sum(1)


def cka_distances(class_features: torch.Tensor) -> torch.Tensor:
    """1 - linear CKA between the feature matrices of every pair of classes: the category
    distance WKD's paper builds its cost from. `class_features` is (C, n, d): n rows of
    d-dimensional teacher features per class (samples, or samples x positions of a map),
    paired row by row between classes as the reference code does. With X, Y centered over
    rows, CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F). Save the result with
    torch.save and give its path as the `cost` of the `wkd` loss."""
    if class_features.dim() != 3 or len(class_features) < 2:
        raise ConfigError(f"cka_distances: expects (classes >= 2, rows, dims) class features, got shape "
                          f"{tuple(class_features.shape)}.")
    x = class_features.double()
    x = x - x.mean(1, keepdim=True)
    norms = torch.stack([torch.linalg.matrix_norm(f.t() @ f) for f in x])
    out = torch.zeros(len(x), len(x), dtype=torch.float64)
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            cka = torch.linalg.matrix_norm(x[j].t() @ x[i]) ** 2 / (norms[i] * norms[j]).clamp_min(1e-12)
            out[i, j] = out[j, i] = 1 - cka
    return out.to(class_features.dtype if class_features.is_floating_point() else torch.float32)


def _load_distances(path: str) -> torch.Tensor:
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"wkd: cost {path!r} is neither 'teacher_logits' nor 'uniform', and no such file exists; "
                          "give the path of a saved (C, C) category-distance matrix (.pt, .pth or .npy).")
    try:
        if file.suffix == ".npy":
            matrix = torch.from_numpy(np.load(file))
        else:
            matrix = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file: one clear message
        raise ConfigError(f"wkd: could not read the cost matrix {path!r}: {exc}") from None
    return _check_distances(torch.as_tensor(matrix), repr(path))


def _check_distances(matrix: torch.Tensor, where: str) -> torch.Tensor:
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 2:
        raise ConfigError(f"wkd: the category distances {where} must be a square (C, C) matrix, C >= 2, got "
                          f"shape {tuple(matrix.shape)}.")
    matrix = matrix.float() if not matrix.is_floating_point() else matrix
    if not torch.isfinite(matrix).all():
        raise ConfigError(f"wkd: the category distances {where} contain NaN or infinite entries.")
    return matrix.detach().clone()


@LOSSES.register("wkd")
class WKDLoss(LogitLoss):
    """WKD-L, Wasserstein distance KD on logits (Lv, Yang & Li, NeurIPS 2024): the target
    class's probability as in KD, the rest compared *across* categories by optimal transport.

    L = target + gamma(epoch) * (1/B) sum_i W(q_s,i, q_t,i), where
    target = -(1/B) sum_i p_t[i, y_i] log p_s[i, y_i] at temperature 1 (the KL on the target
    probability up to a teacher-only constant, as the reference code computes it);
    q = softmax over the non-target classes of z / T; W the entropy-regularised discrete
    Wasserstein distance of `sinkhorn_cost` (lambda = `sinkhorn_lambda`, `sinkhorn_iterations`
    steps, differentiated through), with the category cost c = relu(1 - exp(-kappa d)) + 1e-8
    (kappa = `sharpen`; c = relu(d) + 1e-8 when kappa = 0) from a category distance d:

    - "teacher_logits" (default): d = 1 - cosine similarity of class prototypes, the mean of
      the teacher's logits (each centered over classes) over the labelled training samples of
      each class, accumulated from the batches the loss sees in training (a class not seen yet
      is at distance 1 from all others). The paper's own d is 1 - linear CKA between the
      teacher's features of each class, computed once over the training set before
      distillation; a loss cannot reach the teacher, so this estimates it from its logits;
    - a path to a saved (C, C) distance matrix (.pt, .pth or .npy), e.g. the paper's, from
      `cka_distances`;
    - "uniform": d = 1 between distinct classes.

    gamma is `wasserstein_weight`, cosine-decayed as in the reference code when `decay_until`
    (the run's last epoch) is set: gamma(e) = gamma (1 + cos(pi (e - a) / (decay_until - a))) / 2
    for epochs e > a = `decay_after`. Defaults: the paper's ImageNet ResNet-34 -> ResNet-18
    setting (T 2, gamma 30, lambda 0.05, 10 iterations, kappa 1, decay over all epochs); CIFAR
    uses T 8, gamma 600 (ResNet-32x4 -> 8x4), decay after 150 of 240 epochs, with CE weight 1.
    Samples labelled -100 (unlabelled) are left out; a batch with none labelled gives 0.
    """

    needs_targets = True
    default_weight = 1.0

    def __init__(self, temperature: float = 2.0, wasserstein_weight: float = 30.0, sinkhorn_lambda: float = 0.05,
                 sinkhorn_iterations: int = 10, sharpen: float = 1.0, cost: str | torch.Tensor = "teacher_logits",
                 decay_after: int = 0, decay_until: int | None = None) -> None:
        super().__init__()
        check_temperature("wkd", temperature)
        if not wasserstein_weight >= 0 or not math.isfinite(wasserstein_weight):
            raise ConfigError(f"wkd: wasserstein_weight must be a finite number >= 0, got {wasserstein_weight}.")
        if not sinkhorn_lambda > 0 or not math.isfinite(sinkhorn_lambda):
            raise ConfigError(f"wkd: sinkhorn_lambda (the entropic regularisation) must be > 0, got {sinkhorn_lambda}.")
        if sinkhorn_iterations < 1:
            raise ConfigError(f"wkd: sinkhorn_iterations must be >= 1, got {sinkhorn_iterations}.")
        if not sharpen >= 0 or not math.isfinite(sharpen):
            raise ConfigError(f"wkd: sharpen (kappa) must be >= 0, got {sharpen}.")
        if decay_after < 0 or (decay_until is not None and decay_until <= decay_after):
            raise ConfigError(f"wkd: the cosine decay runs from epoch decay_after >= 0 to decay_until > decay_after "
                              f"(the run's last epoch), got decay_after={decay_after}, decay_until={decay_until}.")
        self.temperature, self.wasserstein_weight = float(temperature), float(wasserstein_weight)
        self.sinkhorn_lambda, self.sinkhorn_iterations = float(sinkhorn_lambda), sinkhorn_iterations
        self.sharpen, self.decay_after, self.decay_until = float(sharpen), decay_after, decay_until
        if isinstance(cost, torch.Tensor):
            self.cost_source = "matrix"
            self.register_buffer("distances", _check_distances(cost, "given"))
        elif cost in ("teacher_logits", "uniform"):
            self.cost_source = cost
        else:
            self.cost_source = str(cost)
            self.register_buffer("distances", _load_distances(cost))
        if self.cost_source == "teacher_logits":
            # sized to the classes at the first step; _load_from_state_dict resizes them on resume
            self.register_buffer("class_sums", torch.zeros(0, 0))
            self.register_buffer("class_counts", torch.zeros(0))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        for name in ("class_sums", "class_counts"):
            saved = state_dict.get(prefix + name)
            if saved is not None and name in self._buffers and self._buffers[name].shape != saved.shape:
                self._buffers[name] = torch.zeros_like(saved, device=self._buffers[name].device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def weight_at(self, epoch: int | None) -> float:
        """gamma, the Wasserstein part's weight, at (1-based) `epoch`."""
        if self.decay_until is None:
            return self.wasserstein_weight
        if epoch is None:
            raise ConfigError("wkd: the cosine decay of wasserstein_weight needs the epoch; call "
                              "distiller.set_epoch(epoch) each epoch (the featkd trainer does), or unset decay_until.")
        if epoch <= self.decay_after:
            return self.wasserstein_weight
        span = self.decay_until - self.decay_after
        progress = min(epoch - self.decay_after, span) / span
        return 0.5 * self.wasserstein_weight * (1 + math.cos(math.pi * progress))

    @torch.no_grad()
    def observe(self, teacher_logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Add labelled teacher logits (B, C) to the class prototypes ("teacher_logits" cost)."""
        if not self.sees_global_batch:  # every process adds every sample, so the prototypes agree
            teacher_logits, targets = distributed.gather_rows(teacher_logits), distributed.gather_rows(targets)
        num_classes = teacher_logits.shape[1]
        if self.class_sums.numel() == 0:
            self.class_sums = torch.zeros(num_classes, num_classes, device=teacher_logits.device)
            self.class_counts = torch.zeros(num_classes, device=teacher_logits.device)
        centered = teacher_logits.float() - teacher_logits.float().mean(1, keepdim=True)
        self.class_sums.index_add_(0, targets, centered.to(self.class_sums.dtype))
        self.class_counts.index_add_(0, targets, torch.ones_like(targets, dtype=self.class_counts.dtype))

    def category_distances(self, num_classes: int) -> torch.Tensor:
        """d, the (C, C) category distance the cost is built from."""
        if self.cost_source == "uniform":
            return 1.0 - torch.eye(num_classes)
        if self.cost_source != "teacher_logits":
            return self.distances
        if self.class_sums.numel() == 0:  # nothing seen yet: every class unrelated to the others
            return 1.0 - torch.eye(num_classes, device=self.class_sums.device)
        prototypes = F.normalize(self.class_sums / self.class_counts.clamp_min(1)[:, None], dim=1)
        distances = 1.0 - prototypes @ prototypes.t()
        return distances.fill_diagonal_(0.0)

    def cost_matrix(self, num_classes: int) -> torch.Tensor:
        """c, the (C, C) transport cost between categories."""
        d = self.category_distances(num_classes)
        if d.shape != (num_classes, num_classes):
            raise ConfigError(f"wkd: the category distances ({self.cost_source}) are {tuple(d.shape)}, but the "
                              f"logits have {num_classes} classes; give a ({num_classes}, {num_classes}) matrix.")
        c = 1.0 - torch.exp(-self.sharpen * d) if self.sharpen else d
        return F.relu(c) + 1e-8

    def forward(self, student_logits: torch.Tensor, teacher_logits: TeacherLogits,
                targets: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_logits("wkd", student_logits, teacher_logits)
        batch, num_classes = student_logits.shape
        if targets is None or targets.shape != (batch,) or targets.is_floating_point():
            raise ConfigError(f"wkd: needs one integer class label per sample, shape ({batch},), got "
                              f"{None if targets is None else tuple(targets.shape)}.")
        labelled = targets != IGNORE_INDEX
        if ((targets[labelled] < 0) | (targets[labelled] >= num_classes)).any():
            raise ConfigError(f"wkd: labels must be class indices in [0, {num_classes}) or -100 (unlabelled).")
        if not labelled.all():
            student_logits, targets = student_logits[labelled], targets[labelled]
            teacher_logits = [t[labelled] for t in as_ensemble(teacher_logits)]
        if len(targets) == 0:  # nothing labelled: 0, not 0/0
            zero = full_precision(student_logits).sum() * 0.0
            return {"target": zero, "wasserstein": zero}
        if self.cost_source == "teacher_logits" and self.training:
            self.observe(full_precision(ensemble_mean_logits(teacher_logits)), targets)
        logits = full_precision(student_logits)
        target_mask = F.one_hot(targets, num_classes).bool()
        # target part at T = 1: the teacher's target probability weighs the student's log-likelihood
        log_p_s = F.log_softmax(logits, dim=1)
        p_t = ensemble_log_probs(teacher_logits, 1.0).exp()
        target = -(p_t[target_mask] * log_p_s[target_mask]).mean()
        # non-target part: softmax over the other classes (the target carries no mass) at T
        q_s = F.log_softmax(logits.masked_fill(target_mask, float("-inf")) / self.temperature, dim=1).exp()
        masked_teachers = [t.masked_fill(target_mask, float("-inf")) for t in as_ensemble(teacher_logits)]
        q_t = ensemble_log_probs(masked_teachers, self.temperature).exp()
        cost = self.cost_matrix(num_classes).to(device=q_s.device, dtype=q_s.dtype)
        distance = sinkhorn_cost(q_s, q_t, cost, self.sinkhorn_lambda, self.sinkhorn_iterations, ~target_mask)
        return {"target": target, "wasserstein": self.weight_at(self.epoch) * distance.mean()}

    def extra_repr(self) -> str:
        decay = "" if self.decay_until is None else f", decay=({self.decay_after}, {self.decay_until}]"
        return (f"temperature={self.temperature}, wasserstein_weight={self.wasserstein_weight}, cost="
                f"{self.cost_source!r}, sharpen={self.sharpen}, sinkhorn_lambda={self.sinkhorn_lambda}, "
                f"sinkhorn_iterations={self.sinkhorn_iterations}{decay}")
