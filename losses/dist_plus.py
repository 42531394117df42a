"""DIST+'s feature-level relations: DIST's Pearson-correlation matching moved from logits to
feature maps."""

from __future__ import annotations

import math

import torch

from featkd.errors import ConfigError
from featkd.losses.base import LOSSES, Example, FeaturePairLoss, full_precision


def pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row of a with the same row of b, (N, D) -> (N,); a row
    without spread (all equal) correlates 0."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def channel_relation(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """1 - the mean, over samples and positions, of the Pearson correlation across channels of
    two (B, C, ...) maps of one shape (DIST's inter-class relation, channels for classes)."""
    c = student.shape[1]
    rows = lambda x: x.movedim(1, -1).reshape(-1, c)  # noqa: E731  one row per (sample, position)
    return 1 - pearson_rows(rows(student), rows(teacher), eps).mean()


def spatial_relation(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """1 - the mean, over positions, of the Pearson correlation across the batch of the
    channel-summed maps (DIST's intra-class relation, positions for classes); channel counts
    may differ."""
    return 1 - pearson_rows(student.sum(1).flatten(1).t(), teacher.sum(1).flatten(1).t(), eps).mean()


@LOSSES.register("dist_feature")
class DISTFeatureRelation(FeaturePairLoss):
    """The feature-level part of DIST+ (Huang et al., TPAMI 2025, "DIST+: Knowledge
    Distillation From a Stronger Adaptive Teacher"), as torchdistill 1.1.4 defines it
    (`DISTPlusLoss`): DIST's relation matching on a pair of (B, C, H, W) maps.

    L = w_c * (1 - mean_{b,h,w} rho_c(s[b,:,h,w], t[b,:,h,w]))
      + w_s * (1 - mean_{h,w} rho_b(sum_c s[:,c,h,w], sum_c t[:,c,h,w])),
    rho the Pearson correlation: across channels at each sample and position (the channel
    relation), and across the batch of the channel-summed activation at each position (the
    spatial relation). DIST+ is `dist` on the logits plus this term; its other half, the
    teacher acclimation, is a training strategy, not a loss. torchdistill adds the channel
    correlation itself (+rho, which rewards an anti-correlated student); here it is 1 - rho,
    like the spatial part and DIST's. The student map is brought to the teacher's channels by
    the adapter (`auto`); spatial sizes must agree. Both parts are invariant to a positive
    scale of either map and 0 when the maps are equal. Weight 2 and w_c = w_s = 1 are those of
    torchdistill's DIST+ sample config.
    """

    relational = True
    needs_same_shape = True
    default_adapter = "auto"
    default_weight = 2.0
    example = Example("layer3", "layer3")

    def __init__(self, channel_weight: float = 1.0, spatial_weight: float = 1.0, eps: float = 1e-8) -> None:
        super().__init__()
        for name, value in (("channel_weight", channel_weight), ("spatial_weight", spatial_weight)):
            if not value >= 0 or not math.isfinite(value):
                raise ConfigError(f"dist_feature: {name} must be a finite number >= 0, got {value}.")
        if not eps > 0:
            raise ConfigError(f"dist_feature: eps must be > 0, got {eps}.")
        self.channel_weight, self.spatial_weight, self.eps = channel_weight, spatial_weight, eps

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> dict[str, torch.Tensor]:
        if student.dim() < 3:
            raise ConfigError(
                f"dist_feature: reads feature maps (batch, channels, positions...), got a {tuple(student.shape)} "
                "feature; match a conv stage (e.g. student=layer3), not a pooled embedding."
            )
        if student.shape != teacher.shape:
            raise ConfigError(
                f"dist_feature: the student map {tuple(student.shape)} and the teacher map {tuple(teacher.shape)} "
                "differ; the channel relation compares them position by position. Set adapter: auto for the "
                "channels and pick stages of the same spatial size."
            )
        student, teacher = full_precision(student), full_precision(teacher.detach())
        return {"channel": self.channel_weight * channel_relation(student, teacher, self.eps),
                "spatial": self.spatial_weight * spatial_relation(student, teacher, self.eps)}

    def extra_repr(self) -> str:
        return f"channel_weight={self.channel_weight}, spatial_weight={self.spatial_weight}, eps={self.eps}"
