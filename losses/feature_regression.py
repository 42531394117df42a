"""Feature regression with a reweighted L2: OFD's margin-clamped partial L2 and PAD's
uncertainty-weighted L2."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from featkd import distributed
from featkd.errors import ConfigError
from featkd.losses.base import LOSSES, Example, FeatureSetLoss, Shape, full_precision
from featkd.losses.feature import check_maps

__all__ = ["OverhaulDistillation", "PADL2", "gaussian_negative_mean", "partial_l2"]

#: P(x < 0) below which the margin is taken as -3 sigma (the reference code's cut-off).
MARGIN_TAIL = 1e-3
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def gaussian_negative_mean(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """E[x | x < 0] for x ~ N(mean, std^2), element-wise: mean - std phi(z) / Phi(-z), z = mean / std.

    Where P(x < 0) = Phi(-z) is at most 1e-3 the value is -3 std instead, as in the paper's
    code. The Mills ratio phi(z) / Phi(-z) is taken in log space, so a channel with std 0
    gives its mean (all negative) or 0 (never negative) rather than 0 / 0.
    """
    std = std.abs()
    z = mean / std.clamp_min(torch.finfo(std.dtype).tiny)
    log_pdf = -0.5 * z * z - 0.5 * math.log(2 * math.pi)
    mills = torch.exp(log_pdf - torch.special.log_ndtr(-z))
    negative = torch.special.ndtr(-z) > MARGIN_TAIL
    return torch.where(negative, mean - std * mills, -3.0 * std)


def partial_l2(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """OFD's partial L2 summed over every element: (s - t)^2 except where the margin-clamped
    teacher value t is <= 0 and the student is already at or below it."""
    keep = (student > target) | (target > 0)
    return ((student - target).pow(2) * keep).sum()


@LOSSES.register("ofd")
class OverhaulDistillation(FeatureSetLoss):
    """Overhaul of feature distillation (Heo et al., ICCV 2019): regress the teacher's
    pre-ReLU maps through a connector, ignoring what the ReLU after them would discard.

    With t the teacher's pre-ReLU map (capture the batch norm before a ReLU), s the student's
    through a 1x1 conv + BN connector (adapter `conv`), and m_c the margin of channel c:
    t' = max(t, m_c) and d(s, t') = sum over elements of (s - t')^2 [s > t' or t' > 0], so
    nothing is asked of a student value already below a non-positive target. Layer i of n
    counts 2^(i - n + 1) (the deepest 1); L = sum_i 2^(i - n + 1) d_i / B. The paper's code
    divides by 1000 on CIFAR (10^4 on ImageNet), hence the default weight 1e-3.

    The margin is the expectation of the teacher's negative responses, m = E[t | t < 0], for
    a Gaussian N(mu, sigma^2): m = mu - sigma phi(mu / sigma) / Phi(-mu / sigma), or -3 sigma
    where P(t < 0) <= 1e-3 (`gaussian_negative_mean`). The paper reads mu = beta and sigma =
    |gamma| off the batch norm before the feature. A loss here sees features, not modules,
    so mu and sigma are by default the per-channel mean and standard deviation of the
    teacher's features themselves, accumulated over every training batch seen so far (in
    buffers, so checkpoints keep them; a multi-process run sums every process's batch). For
    a batch norm's output these estimate beta and |gamma| (exactly so for a teacher whose
    batch norm normalises with batch statistics, as in the paper's code). To use the
    paper's values, call `margins_from_batchnorm` with those batch norms (or `bind_modules`
    with the teacher modules the pairs read).
    """

    example = Example("layer*.0.bn", "layer*.0.bn", adapter="conv")
    default_weight = 1e-3
    default_adapter = "conv"
    needs_same_shape = True
    # the margin statistics are buffers sized by the teacher's channels
    has_shape_dependent_parameters = True

    def __init__(self) -> None:
        super().__init__()
        self.channels: list[int] = []
        self.register_buffer("from_batchnorm", torch.zeros((), dtype=torch.bool))

    def bind(self, student_shapes: Sequence[Shape], teacher_shapes: Sequence[Shape]) -> None:
        check_maps("ofd", student_shapes, teacher_shapes,
                   "Capture conv layers before their ReLU (the batch norm, e.g. 'layer1.0.bn')")
        self.channels = [t[0] for t in teacher_shapes]
        for i, c in enumerate(self.channels):
            # count, sum and sum of squares of the teacher's values, per channel
            self.register_buffer(f"moments_{i}", torch.zeros(3, c, dtype=torch.float64))
            self.register_buffer(f"margin_{i}", torch.zeros(c, dtype=torch.float64))

    def _layer_buffers(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"moments_{i}"), getattr(self, f"margin_{i}")

    def margins_from_batchnorm(self, batchnorms: Sequence[nn.Module]) -> None:
        """Fix the margins from the teacher's batch norms before the captured features, one per
        pair in order, as the paper does: mu = beta, sigma = |gamma| of each channel."""
        if len(batchnorms) != len(self.channels):
            raise ConfigError(f"ofd: {len(batchnorms)} batch norms for {len(self.channels)} feature pairs; give the "
                              "batch norm before each captured teacher feature, in pair order.")
        for i, bn in enumerate(batchnorms):
            weight, bias = getattr(bn, "weight", None), getattr(bn, "bias", None)
            if not isinstance(bn, _BATCH_NORMS) or weight is None or bias is None:
                raise ConfigError(f"ofd: pair {i} was given {type(bn).__name__}, not an affine batch norm; the margin "
                                  "is read off the beta and gamma of the batch norm before the teacher's feature.")
            if len(weight) != self.channels[i]:
                raise ConfigError(f"ofd: the batch norm of pair {i} has {len(weight)} channels, the teacher feature "
                                  f"{self.channels[i]}; give the batch norm that produced that feature.")
            _, margin = self._layer_buffers(i)
            margin.copy_(gaussian_negative_mean(bias.detach().double(), weight.detach().double()))
        self.from_batchnorm.fill_(True)

    def bind_modules(self, student_modules: Sequence[nn.Module | None],
                     teacher_modules: Sequence[nn.Module | None]) -> None:
        """The modules whose outputs the pairs read: when every teacher one is a batch norm,
        the margins come from it as in the paper; otherwise they stay estimated from the data."""
        if teacher_modules and all(isinstance(m, _BATCH_NORMS) and m.affine for m in teacher_modules):
            self.margins_from_batchnorm(list(teacher_modules))  # type: ignore[arg-type]

    @torch.no_grad()
    def margins(self, teachers: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """The per-channel margins, one (C,) tensor per pair. In training mode the statistics of
        this step's teacher features are added to the running ones first; in eval mode they
        are used only while no training step has been seen."""
        if bool(self.from_batchnorm):
            return [self._layer_buffers(i)[1] for i in range(len(self.channels))]
        out = []
        for i, c in enumerate(self.channels):
            moments, _ = self._layer_buffers(i)
            current = moments
            if teachers is not None:
                t = teachers[i].detach().double().transpose(0, 1).reshape(c, -1)
                batch = torch.stack([torch.full_like(t[:, 0], t.shape[1]), t.sum(1), t.pow(2).sum(1)])
                if self.training:  # every process adds the global batch, so margins agree across them
                    moments.add_(distributed.all_reduce_sum(batch))
                elif moments[0, 0] == 0:
                    current = batch
            if current[0, 0] == 0:
                raise ConfigError("ofd: no teacher features seen yet to estimate the margins from; call the loss "
                                  "with a batch, or fix them with margins_from_batchnorm.")
            mean = current[1] / current[0]
            std = (current[2] / current[0] - mean * mean).clamp_min(0).sqrt()
            out.append(gaussian_negative_mean(mean, std))
        return out

    def forward(self, students: list[torch.Tensor], teachers: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(self.channels) != len(students):
            raise ConfigError("ofd: the margin statistics are sized from probed shapes; pass example_input to the "
                              "Distiller (or call bind with the feature shapes).")
        teachers = [full_precision(t.detach()) for t in teachers]
        n = len(students)
        losses = []
        for i, (s, t, m) in enumerate(zip(students, teachers, self.margins(teachers))):
            s = full_precision(s)
            target = torch.maximum(t, m.to(t.dtype).view(1, -1, *([1] * (t.dim() - 2))))
            losses.append(2.0 ** (i - n + 1) * partial_l2(s, target) / len(s))
        return losses


class _VarianceHead(nn.Module):
    """log sigma^2 from the student's feature: linear (1x1 conv on maps) + batch norm, one
    value per element, or one per sample from the spatially pooled feature."""

    def __init__(self, shape: Shape, per: str) -> None:
        super().__init__()
        channels, dims = shape[0], len(shape) - 1
        self.pool = per == "sample" and dims > 0
        if per == "sample" or dims == 0:
            self.project: nn.Module = nn.Linear(channels, 1 if per == "sample" else channels)
            self.norm: nn.Module = nn.BatchNorm1d(1 if per == "sample" else channels)
        else:
            conv, norm = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv1d, nn.BatchNorm1d)
            self.project, self.norm = conv(channels, channels, 1), norm(channels)
        self.dims = dims
        self.per = per

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool:
            x = x.flatten(2).mean(-1)
        v = self.norm(self.project(x))
        # one value per sample broadcasts over every element of it
        return v.view(len(v), *([1] * (self.dims + 1))) if self.per == "sample" else v


@LOSSES.register("pad_l2")
class PADL2(FeatureSetLoss):
    """Prime-aware adaptive distillation with the L2 loss (Zhang et al., ECCV 2020): an L2
    feature regression weighted by an uncertainty the student learns to predict.

    A head on the (adapted) student feature s predicts v = log sigma^2 (a linear layer + batch
    norm; a 1x1 conv + batch norm on maps), and with t the teacher's feature
    L = mean over samples and elements of (t - s)^2 / (exp(v) + eps) + v,
    the Gaussian negative log-likelihood of t around s up to constants, per feature pair.
    Its optimum is sigma^2 = (t - s)^2: what the student cannot match yet is down-weighted,
    what it can (the "prime" samples) counts more, and the v term keeps sigma^2 from growing
    without bound. `per="element"` predicts one variance per element, as the authors' code
    does (head Linear(D, D) + BN on the pooled embedding, eps 1e-6, weight 1, as released in
    torchdistill); `per="sample"` one per sample, from the spatially pooled feature: the
    per-sample weighting the paper describes. torchdistill's reproduction fine-tunes with
    PAD-L2 a student first trained with cross-entropy + plain L2; in featkd that recipe is
    two `stages:`, the first with an L2 term on the same features.
    """

    example = Example("fc:in", "fc:in", adapter="auto")
    default_weight = 1.0
    default_adapter = "auto"
    needs_same_shape = True
    has_shape_dependent_parameters = True

    def __init__(self, per: Literal["element", "sample"] = "element", eps: float = 1e-6) -> None:
        super().__init__()
        if per not in ("element", "sample"):
            raise ConfigError(f"pad_l2: per is 'element' (a variance per feature element, the authors' code) or "
                              f"'sample' (one per sample), got {per!r}.")
        if not eps > 0 or not math.isfinite(eps):
            raise ConfigError(f"pad_l2: eps must be > 0 (it bounds the weight 1 / (sigma^2 + eps)), got {eps}.")
        self.per, self.eps = per, eps
        self.heads = nn.ModuleList()

    def bind(self, student_shapes: Sequence[Shape], teacher_shapes: Sequence[Shape]) -> None:
        for s, t in zip(student_shapes, teacher_shapes):
            if tuple(s) != tuple(t) or len(t) > 3:
                raise ConfigError(
                    f"pad_l2: compares features element by element and predicts their variance from a vector (C,) "
                    f"or a conv map (C, L) / (C, H, W); got student {tuple(s)} and teacher {tuple(t)}. Use adapter "
                    "auto for unequal shapes, and capture embeddings (e.g. 'fc:in') or conv maps."
                )
        self.heads = nn.ModuleList(_VarianceHead(tuple(t), self.per) for t in teacher_shapes)

    def log_variances(self, students: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The predicted log sigma^2 of each pair, broadcastable to its feature's shape."""
        return [head(full_precision(s)) for head, s in zip(self.heads, students)]

    def forward(self, students: list[torch.Tensor], teachers: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(self.heads) != len(students):
            raise ConfigError("pad_l2: the variance heads are built from probed shapes; pass example_input to the "
                              "Distiller (or call bind with the feature shapes).")
        losses = []
        for s, t, v in zip(students, teachers, self.log_variances(students)):
            s, t = full_precision(s), full_precision(t.detach())
            losses.append(((t - s).pow(2) / (v.exp() + self.eps) + v).mean())
        return losses

    def extra_repr(self) -> str:
        return f"per={self.per!r}, eps={self.eps}"
