"""Losses on intermediate feature maps."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from featkd.errors import ConfigError
from featkd.losses.base import LOSSES, DistillLoss, full_precision


@LOSSES.register("fitnet")
class FitNetHint(DistillLoss):
    """FitNets hint (Romero et al. 2015): regress the teacher's hint layer from the student's.

    L = mean (r(s) - t)^2, where r is the adapter (a 1x1 conv + BN regressor by default) that
    maps the student's guided layer to the teacher's hint layer.
    """

    consumes = "features"
    default_weight = 100.0
    default_adapter = "auto"
    needs_same_shape = True

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(full_precision(student), full_precision(teacher.detach()))


def attention_map(feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Spatial attention of a (B, C, ...) map: normalize(mean_c |f|^p), flattened to (B, HW)."""
    return F.normalize(full_precision(feature).abs().pow(p).mean(1).flatten(1), dim=1)


def pool_to_common_size(
    student: torch.Tensor, teacher: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool the larger of two maps to the spatial size of the smaller one."""
    s_size, t_size = student.shape[2:], teacher.shape[2:]
    if s_size == t_size:
        return student, teacher
    size = tuple(min(a, b) for a, b in zip(s_size, t_size))
    pool = F.adaptive_avg_pool2d if len(size) == 2 else F.adaptive_avg_pool1d
    return (pool(student, size) if s_size != size else student,
            pool(teacher, size) if t_size != size else teacher)


@LOSSES.register("at")
class AttentionTransfer(DistillLoss):
    """Attention transfer (Zagoruyko & Komodakis 2017): match normalized spatial attention maps.

    a(f) = normalize(mean_c |f_c|^p) flattened over positions; L = mean (a(s) - a(t))^2 per
    matched pair of layers (the pairs are summed). Channel counts may differ; spatial sizes
    are pooled to the smaller of the two.
    """

    consumes = "features"
    default_weight = 1000.0

    def __init__(self, p: float = 2.0) -> None:
        super().__init__()
        if p <= 0:
            raise ConfigError(f"at: p must be > 0, got {p}.")
        self.p = p

    def bind(self, student_shapes, teacher_shapes) -> None:
        for s, t in zip(student_shapes, teacher_shapes):
            if len(s) not in (2, 3) or len(t) != len(s):
                raise ConfigError(
                    f"at: attention transfer needs conv maps (C, H, W) or (C, L) on both sides, "
                    f"got student {tuple(s)} and teacher {tuple(t)}. Capture conv layers."
                )

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        student, teacher = pool_to_common_size(student, teacher.detach())
        return (attention_map(student, self.p) - attention_map(teacher, self.p)).pow(2).mean()

    def extra_repr(self) -> str:
        return f"p={self.p}"
