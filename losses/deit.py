"""DeiT's distillation through a distillation token (Touvron et al. 2021, "Training
data-efficient image transformers & distillation through attention").

A distilled DeiT (`timm:deit_tiny_distilled_patch16_224` and its siblings) carries a second
learned token next to the class token; its output goes through a second classifier,
`head_dist`. The class head learns from the labels (the `ce` term) and the distillation
head from the teacher (a term below), and at inference the model averages the two heads
(featkd's `timm:` builder sets this up: see `featkd.models._timm`).

Both terms read the student's distillation head as a captured feature, `student: head_dist`
(its (B, classes) output), against the teacher's logits captured from its classifier
module, `teacher: fc` on featkd's CNNs (`head` on a timm ViT, `classifier` on some others):

    loss:
      ce:        {weight: 0.5}
      deit_hard: {weight: 0.5, student: head_dist, teacher: fc}
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from featkd.errors import ConfigError
from featkd.losses.base import (LOSSES, Example, FeaturePairLoss, Shape, check_temperature, full_precision,
                                softened_kl)

#: What to use when a DeiT term's student feature is not a distillation head.
USE_A_DISTILLED_DEIT = (
    "Use a distilled DeiT student (a model with a distillation token, e.g. "
    "`student: {model: timm:deit_tiny_distilled_patch16_224, args: {img_size: 8, patch_size: 2, embed_dim: 64, "
    "depth: 4, num_heads: 4}}`) with `student: head_dist`, and the teacher's classifier as `teacher:` "
    "(`fc` on featkd's CNNs, `head` on a timm ViT)"
)


class DistillationTokenLoss(FeaturePairLoss):
    """The common part of DeiT's terms: the student feature is the logits of a distillation
    head (B, C), the teacher feature the teacher's logits (B, C); no adapter."""

    #: The example runs on the built-in CNN pair, where the student's classifier output
    #: stands in for a distillation head (it checks the formula and the gradients); on a
    #: real DeiT student write `student: head_dist` (configs/vision/deit.yaml).
    example = Example(student="fc", teacher="fc")
    #: The term's name in messages (the registered name of each subclass).
    registry_name = "deit"
    student_hint = f"DeiT terms read a distillation head. {USE_A_DISTILLED_DEIT}."

    def bind(self, student_shapes: Sequence[Shape], teacher_shapes: Sequence[Shape]) -> None:
        name = type(self).registry_name
        for s, t in zip(student_shapes, teacher_shapes):
            if len(s) != 1 or len(t) != 1:
                raise ConfigError(
                    f"{name}: DeiT distillation reads the logits of the student's distillation head and the "
                    f"teacher's logits, (classes,) per sample on both sides; got student {tuple(s)} and teacher "
                    f"{tuple(t)}. {USE_A_DISTILLED_DEIT}."
                )
            if s != t:
                raise ConfigError(
                    f"{name}: the student's distillation head predicts {s[0]} classes and the teacher {t[0]}; "
                    "they must predict over the same classes (capture the teacher's classifier output)."
                )


@LOSSES.register("deit_hard")
class DeiTHardDistillation(DistillationTokenLoss):
    """DeiT hard-label distillation (Touvron et al. 2021, Sec. 4 "Hard-label distillation").

    y_t = argmax_c Z_t(c), the teacher's hard decision, is a label for the student's
    distillation head: L = CE(Z_dist, y_t), averaged over the batch. The paper's objective is
    1/2 CE(Z_cls, y) + 1/2 CE(Z_dist, y_t), hence the default weight 0.5 next to `ce` at 0.5
    (the class head). `label_smoothing` smooths y_t (the paper notes that hard labels can be
    smoothed; its epsilon = 0.1 is for the true labels, and its code uses none on y_t, so the
    default is 0). The student must be a distilled DeiT and the term must read its
    distillation head: `student: head_dist` (the teacher's logits: `teacher: fc` on featkd's
    CNNs); on another student the feature does not exist, and the error says so.
    """

    registry_name = "deit_hard"
    default_weight = 0.5

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing <= 1.0:
            raise ConfigError(f"deit_hard: label_smoothing must be in [0, 1], got {label_smoothing}.")
        self.label_smoothing = label_smoothing

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        hard = teacher.detach().argmax(dim=1)
        return F.cross_entropy(full_precision(student), hard, label_smoothing=self.label_smoothing)

    def extra_repr(self) -> str:
        return f"label_smoothing={self.label_smoothing}"


@LOSSES.register("deit_soft")
class DeiTSoftDistillation(DistillationTokenLoss):
    """DeiT soft distillation (Touvron et al. 2021, Sec. 4 "Soft distillation") on the
    distillation head.

    L = tau^2 KL(softmax(Z_t / tau) || softmax(Z_dist / tau)), averaged over the batch. The
    paper's objective is (1 - lambda) CE(Z_cls, y) + lambda tau^2 KL(...), with tau = 3 and
    lambda = 0.1 in its experiments: so temperature 3, default weight 0.1, and `ce` at 0.9
    next to it. (The official code's defaults are tau = 1, lambda = 0.5, and it divides the
    summed KL by batch x classes instead of the batch, a factor 1/classes; featkd follows
    the paper's formula, as `kd` does.) Reads `student: head_dist` of a distilled DeiT and
    the teacher's logits (`teacher: fc` on featkd's CNNs).
    """

    registry_name = "deit_soft"
    default_weight = 0.1

    def __init__(self, temperature: float = 3.0) -> None:
        super().__init__()
        check_temperature("deit_soft", temperature)
        self.temperature = temperature

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return softened_kl(student, teacher, self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
