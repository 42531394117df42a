"""Knowledge review: the student's stages, fused from the deepest to the shallowest, learn
each of the teacher's stages (ReviewKD)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from featkd.errors import ConfigError
from featkd.losses.base import LOSSES, Example, FeatureSetLoss, Shape, full_precision

__all__ = ["AttentionBasedFusion", "ReviewKD", "hierarchical_context_loss"]


def _as_map(feature: torch.Tensor) -> torch.Tensor:
    """A (B, C, H, W) map as it is, a pooled embedding (B, C) as a (B, C, 1, 1) map."""
    return feature[:, :, None, None] if feature.dim() == 2 else feature


def _spatial(shape: Shape) -> tuple[int, int]:
    return (1, 1) if len(shape) == 1 else (shape[1], shape[2])


def hierarchical_context_loss(student: torch.Tensor, teacher: torch.Tensor,
                              levels: Sequence[int] = (4, 2, 1)) -> torch.Tensor:
    """HCL of one pair of equal-shape (B, C, H, W) maps: the MSE of the maps, plus the MSE
    after average pooling to each size l of `levels` smaller than the map (l < max(H, W); the
    pooled size is min(l, H) x min(l, W)), the k-th pooled level used weighted 2^-k;
    divided by the sum of the weights used (1 + 1/2 + ...)."""
    loss = F.mse_loss(student, teacher)
    weight, total = 1.0, 1.0
    h, w = student.shape[2:]
    for level in levels:
        if level >= max(h, w):
            continue
        size = (min(level, h), min(level, w))
        weight /= 2.0
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(student, size), F.adaptive_avg_pool2d(teacher, size))
        total += weight
    return loss / total


class AttentionBasedFusion(nn.Module):
    """ReviewKD's ABF for one stage: a 1x1 conv + BN brings the student's map to `mid`
    channels; where a deeper stage's residual exists it is upsampled (nearest) to this map's
    size and the two are mixed with per-position weights from a 1x1 conv + sigmoid on their
    concatenation; the mix, resized (nearest) to the teacher's size, is the residual passed
    to the shallower stage, and a 3x3 conv + BN maps it to the teacher's channels."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.output = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                    nn.BatchNorm2d(out_channels))
        self.attention = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        # the reference implementation's initialisation of the two convs
        nn.init.kaiming_uniform_(self.reduce[0].weight, a=1)
        nn.init.kaiming_uniform_(self.output[0].weight, a=1)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None,
                out_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(this stage's output, the residual for the next shallower stage)."""
        x = self.reduce(x)
        if self.attention is not None:
            if residual is None:
                raise ConfigError("reviewkd: a fusing stage needs the residual of the deeper stage.")
            residual = F.interpolate(residual, size=tuple(x.shape[2:]), mode="nearest")
            z = self.attention(torch.cat([x, residual], dim=1))
            x = x * z[:, :1] + residual * z[:, 1:]
        if tuple(x.shape[2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")
        return self.output(x), x


@LOSSES.register("reviewkd")
class ReviewKD(FeatureSetLoss):
    """Knowledge review (Chen, Liu, Zhao & Jia, "Distilling Knowledge via Knowledge Review",
    CVPR 2021): each teacher stage is learned from the student's same stage fused with all
    the deeper ones.

    The pairs are stages from the shallowest to the deepest, F_1..F_n (conv maps, or a
    pooled embedding (C,) taken as a 1x1 map). Going from the deepest, an attention-based
    fusion (`AttentionBasedFusion`) turns F_i and the residual R_{i+1} of the deeper stage
    into an output O_i and the residual R_i (the deepest stage has no residual to fuse). With
    T_i the teacher's stage i (its pre-ReLU map in the paper's code) the loss is
    L = w(epoch) * sum_i HCL(O_i, T_i), the hierarchical context loss
    HCL(O, T) = [MSE(O, T) + sum_k 2^-k MSE(P_k(O), P_k(T))] / (1 + sum_k 2^-k) over average
    poolings P_k to the sizes of `levels` (4, 2, 1) smaller than the map. One value per pair
    is returned. w(epoch) = min(epoch / warmup, 1) ramps the term in over the first `warmup`
    epochs (the trainer calls `set_epoch`).

    The ABFs are the loss's own modules, built from the probed shapes: 1x1 conv + BN to
    `mid_channels` (default min(512, channels of the deepest student feature)), the
    attention 1x1 conv on the concatenation, 3x3 conv + BN to the teacher's channels. CIFAR
    defaults of the authors' code: levels (4, 2, 1), warm-up 20 of 240 epochs, weight 5
    (their script's value for most pairs; 0.6 for ResNet56 -> ResNet20, 1 for ResNet110 ->
    ResNet32, 8 for ResNet32x4 -> ShuffleNetV2).
    """

    example = Example(["layer1", "layer2", "layer3", "fc:in"],
                      ["layer1.0.bn", "layer2.0.bn", "layer3.0.bn", "fc:in"], params={"warmup": 0})
    default_weight = 5.0
    has_shape_dependent_parameters = True
    student_hint = ("ReviewKD reads stage features from the shallowest to the deepest, the last usually the "
                    "pooled embedding ('fc:in').")

    def __init__(self, warmup: int = 20, levels: Sequence[int] = (4, 2, 1), mid_channels: int | None = None) -> None:
        super().__init__()
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ConfigError(f"reviewkd: warmup is a number of epochs >= 0 (0: no warm-up), got {warmup!r}.")
        levels = tuple(levels)
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in levels):
            raise ConfigError(f"reviewkd: levels are the pooled sizes of the context loss, integers >= 1 such as "
                              f"(4, 2, 1), got {levels!r}.")
        if list(levels) != sorted(set(levels), reverse=True):
            raise ConfigError(f"reviewkd: levels go from the largest pooled size to the smallest, each once (their "
                              f"weights halve in that order), got {levels!r}; write e.g. (4, 2, 1).")
        if mid_channels is not None and (isinstance(mid_channels, bool) or not isinstance(mid_channels, int)
                                         or mid_channels < 1):
            raise ConfigError(f"reviewkd: mid_channels is a channel count >= 1, or null for min(512, channels of "
                              f"the deepest student feature), got {mid_channels!r}.")
        self.warmup, self.levels, self.mid_channels = warmup, levels, mid_channels
        self.fusions = nn.ModuleList()
        self.out_sizes: list[tuple[int, int]] = []

    def bind(self, student_shapes: Sequence[Shape], teacher_shapes: Sequence[Shape]) -> None:
        if len(student_shapes) < 2:
            raise ConfigError(
                f"reviewkd: reviews a stage with the deeper ones, so it needs two or more feature pairs, from the "
                f"shallowest stage to the deepest; got {len(student_shapes)}. Name several, e.g. student: "
                "[layer1, layer2, layer3, 'fc:in']."
            )
        for i, (s, t) in enumerate(zip(student_shapes, teacher_shapes)):
            if len(s) not in (1, 3) or len(t) not in (1, 3):
                raise ConfigError(
                    f"reviewkd: pair {i} is student {tuple(s)} and teacher {tuple(t)}; each side must be a conv map "
                    "(C, H, W) or a pooled embedding (C,). Capture stage outputs of a 2-D CNN "
                    "(`featkd inspect MODEL` lists names and shapes)."
                )
        sizes = [_spatial(s) for s in student_shapes]
        for i in range(len(sizes) - 1):
            if sizes[i + 1][0] > sizes[i][0] or sizes[i + 1][1] > sizes[i][1]:
                raise ConfigError(
                    f"reviewkd: student feature {i + 1} is {sizes[i + 1][0]}x{sizes[i + 1][1]}, larger than feature "
                    f"{i} ({sizes[i][0]}x{sizes[i][1]}); list the pairs from the shallowest stage to the deepest "
                    "(the deepest, smallest, last)."
                )
        mid = self.mid_channels or min(512, student_shapes[-1][0])
        n = len(student_shapes)
        self.fusions = nn.ModuleList(AttentionBasedFusion(s[0], mid, t[0], fuse=i < n - 1)
                                     for i, (s, t) in enumerate(zip(student_shapes, teacher_shapes)))
        self.out_sizes = [_spatial(t) for t in teacher_shapes]

    def ramp(self) -> float:
        """The warm-up factor min(epoch / warmup, 1) of the current epoch."""
        if not self.warmup:
            return 1.0
        if self.epoch is None:
            raise ConfigError(
                "reviewkd: the warm-up needs the epoch; call distiller.set_epoch(epoch) at the start of each "
                "epoch (the featkd trainer does), or set warmup=0."
            )
        return min(self.epoch / self.warmup, 1.0)

    def fused(self, students: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The ABF outputs O_1..O_n, in pair order, each the shape of its teacher feature as a map."""
        if len(self.fusions) != len(students):
            raise ConfigError("reviewkd: the fusion modules are built from probed shapes; pass example_input to the "
                              "Distiller (or call bind with the feature shapes); built for "
                              f"{len(self.fusions)} pairs, called with {len(students)}.")
        outputs: list[torch.Tensor] = []
        residual = None
        for i in reversed(range(len(students))):  # from the deepest stage, whose residual the next one fuses
            out, residual = self.fusions[i](_as_map(full_precision(students[i])), residual, self.out_sizes[i])
            outputs.insert(0, out)
        return outputs

    def forward(self, students: list[torch.Tensor], teachers: list[torch.Tensor]) -> list[torch.Tensor]:
        ramp = self.ramp()
        outputs = self.fused(students)
        losses = []
        for i, (o, t) in enumerate(zip(outputs, teachers)):
            t = _as_map(full_precision(t.detach()))
            if o.shape != t.shape:
                raise ConfigError(f"reviewkd: pair {i}: the fused student map is {tuple(o.shape)} but the teacher's "
                                  f"is {tuple(t.shape)}; the loss was bound to other shapes, bind it again.")
            losses.append(ramp * hierarchical_context_loss(full_precision(o), t, self.levels))
        return losses

    def extra_repr(self) -> str:
        return f"warmup={self.warmup}, levels={self.levels}, mid_channels={self.mid_channels}"
