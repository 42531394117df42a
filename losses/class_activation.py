"""Class activation maps transferred from the teacher to the student (CAT-KD)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from featkd.errors import ConfigError
from featkd.losses.base import LOSSES, Example, FeatureSetLoss, Shape, full_precision

__all__ = ["ClassAttentionTransfer", "class_activation_maps"]


def class_activation_maps(feature: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """CAMs of a (B, C, H, W) map for a linear classifier's (K, C) weight: (B, K, H, W),
    CAM_k = sum_c W_kc F_c (Zhou et al. 2016; no bias, so that the CAM's spatial mean is the
    class logit less the bias for a classifier on the average-pooled map)."""
    return torch.einsum("kc,bchw->bkhw", weight.to(feature.dtype), feature)


@LOSSES.register("catkd")
class ClassAttentionTransfer(FeatureSetLoss):
    """Class attention transfer (Guo, Yan, Li & Lin, "Class Attention Transfer Based Knowledge
    Distillation", CVPR 2023): the student learns where the teacher sees each class.

    For each model, the class activation maps of its last conv map F (C, H, W) through its
    classifier's weight W (K, C) are CAM_k = sum_c W_kc F_c (K maps, no bias). Both sides
    are average-pooled to `resolution` x `resolution` (A), each map optionally L2-normalised
    over its positions (phi), and L = mean over samples, classes and positions of
    (phi(A(CAM^s)) - phi(A(CAM^t)))^2. The student's CAMs carry gradients to its last map and
    its classifier's weight; the teacher's are fixed.

    The term reads two pairs: the last conv map, and the classifier (its output, e.g. `fc`),
    whose module gives W: student: [layer3, fc], teacher: [layer3, fc]. The classifier must
    be a linear layer on the average-pooled map, with as many classes on both sides. A model
    whose classifier is a 1x1 conv before the pooling (as the authors' converted models)
    computes the CAMs itself: then the term reads that conv's output, one pair. The authors
    train such a student, whose logits are the CAMs' means; a student with a linear
    classifier keeps its bias in its logits, and its CAMs, like the teacher's, leave it out.

    Defaults are the authors' code's (resolution 2, normalisation on, weight 400). Their
    CIFAR-100 runs set, per pair: without normalisation for teacher and student of one
    family (weight 15 for ResNet32x4 -> ResNet8x4, 12 for WRN-40-2 -> WRN-16-2, 0.7 for
    ResNet56 -> ResNet20), with it across families (600 at resolution 4 for ResNet32x4 ->
    ShuffleNetV1/V2, 15 for VGG13 -> MobileNetV2); always with cross-entropy at weight 1.
    """

    example = Example(["layer3", "fc"], ["layer3", "fc"])
    default_weight = 400.0
    student_hint = ("CAT-KD reads the last conv map and the classifier, e.g. student: [layer3, fc]; "
                    "`featkd inspect MODEL` lists the names.")

    def __init__(self, resolution: int = 2, normalize: bool = True, eps: float = 1e-12) -> None:
        super().__init__()
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
            raise ConfigError(f"catkd: resolution is the size the CAMs are average-pooled to, an integer >= 1 "
                              f"(2 on CIFAR, 4 on ImageNet and for ShuffleNet students), got {resolution!r}.")
        if not isinstance(normalize, bool):
            raise ConfigError(f"catkd: normalize is true or false, got {normalize!r}.")
        if not eps > 0:
            raise ConfigError(f"catkd: eps must be > 0 (it keeps the normalisation of an all-zero map finite), "
                              f"got {eps}.")
        self.resolution, self.normalize, self.eps = resolution, normalize, eps
        self.pairs = 0
        # (student, teacher) classifiers; a plain tuple, not submodules: the student trains its
        # own, and the teacher's must stay out of the loss's parameters and state
        self.classifiers: tuple[nn.Linear, nn.Linear] | None = None
        self.channels: tuple[int, int] = (0, 0)

    def bind(self, student_shapes: Sequence[Shape], teacher_shapes: Sequence[Shape]) -> None:
        self.pairs = len(student_shapes)
        if self.pairs not in (1, 2):
            raise ConfigError(
                f"catkd: reads the last conv map and the classifier (two pairs, e.g. student: [layer3, fc], "
                f"teacher: [layer3, fc]), or the class activation maps themselves (one pair); got {self.pairs} pairs."
            )
        s, t = tuple(student_shapes[0]), tuple(teacher_shapes[0])
        if len(s) != 3 or len(t) != 3:
            raise ConfigError(
                f"catkd: the first pair must be conv maps (C, H, W) on both sides, the last map before the pooling "
                f"and the classifier; got student {s} and teacher {t}. Capture the last conv stage (e.g. layer3)."
            )
        if self.pairs == 1:
            if s[0] != t[0]:
                raise ConfigError(
                    f"catkd: with one pair the maps are taken as class activation maps, one per class, but the "
                    f"student has {s[0]} and the teacher {t[0]}. To compute CAMs from a conv map and the classifier, "
                    "name two pairs: student: [layer3, fc], teacher: [layer3, fc]."
                )
            return
        sk, tk = tuple(student_shapes[1]), tuple(teacher_shapes[1])
        if len(sk) != 1 or len(tk) != 1 or sk != tk:
            raise ConfigError(
                f"catkd: the second pair must be the classifiers' outputs (K,) with as many classes on both sides "
                f"(e.g. 'fc'); got student {sk} and teacher {tk}."
            )
        self.channels = (s[0], t[0])

    def bind_modules(self, student_modules: Sequence[nn.Module | None],
                     teacher_modules: Sequence[nn.Module | None]) -> None:
        """The classifiers the second pair reads: their weights make the CAMs."""
        if self.pairs != 2:
            return
        found = []
        for side, modules, channels in (("student", student_modules, self.channels[0]),
                                        ("teacher", teacher_modules, self.channels[1])):
            module = modules[1] if len(modules) > 1 else None
            if not isinstance(module, nn.Linear):
                what = type(module).__name__ if module is not None else "not a module output"
                raise ConfigError(
                    f"catkd: the second {side} feature must be the output of the classifier, a linear layer (e.g. "
                    f"'fc', not 'fc:in'); it is {what}."
                )
            if module.in_features != channels:
                raise ConfigError(
                    f"catkd: the {side} classifier takes {module.in_features} features but the {side} map has "
                    f"{channels} channels; capture the map the classifier reads after the pooling (the last conv "
                    "stage), with no adapter."
                )
            found.append(module)
        self.classifiers = (found[0], found[1])

    def bind_classifiers(self, student: nn.Linear, teacher: nn.Linear) -> None:
        """Give the classifiers directly (outside a Distiller); shapes as `bind_modules` checks."""
        self.bind_modules([None, student], [None, teacher])

    def pooled(self, cams: torch.Tensor) -> torch.Tensor:
        """A (B, K, H, W) stack of CAMs average-pooled and, if `normalize`, L2-normalised per map."""
        cams = F.adaptive_avg_pool2d(full_precision(cams), self.resolution)
        if self.normalize:
            cams = cams / cams.flatten(2).norm(dim=2).clamp_min(self.eps)[:, :, None, None]
        return cams

    def cams(self, students: Sequence[torch.Tensor],
             teachers: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(student CAMs, teacher CAMs), (B, K, H, W) each; the teacher's without gradient."""
        if self.pairs not in (1, 2) or len(students) != self.pairs or (self.pairs == 2 and self.classifiers is None):
            raise ConfigError(
                "catkd: not bound to its features; build it through a Distiller with example_input (or call bind "
                "with the feature shapes and, for two pairs, bind_classifiers with the two classifiers)."
            )
        s, t = full_precision(students[0]), full_precision(teachers[0].detach())
        if self.pairs == 1:
            return s, t
        student_fc, teacher_fc = self.classifiers  # type: ignore[misc]
        with torch.no_grad():
            cam_t = class_activation_maps(t, teacher_fc.weight.detach())
        return class_activation_maps(s, student_fc.weight), cam_t

    def forward(self, students: list[torch.Tensor], teachers: list[torch.Tensor]) -> torch.Tensor:
        cam_s, cam_t = self.cams(students, teachers)
        return F.mse_loss(self.pooled(cam_s), self.pooled(cam_t))

    def extra_repr(self) -> str:
        return f"resolution={self.resolution}, normalize={self.normalize}"
