"""Methods that pass the student's feature through the teacher's classifier (SimKD, SRD)."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from featkd.errors import ConfigError
from featkd.heads import PooledClassifierHead, global_pool
from featkd.losses.base import LOSSES, Example, FeatureSetLoss, Shape, full_precision

__all__ = ["ReusedTeacherClassifier", "SoftmaxRegression", "simkd_projector", "srd_connector"]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d}
_NORM = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d}


def simkd_projector(student_channels: int, teacher_channels: int, factor: int = 2, dims: int = 2) -> nn.Sequential:
    """SimKD's bottleneck projector on a conv map of `dims` spatial dimensions: 1x1 conv to
    C_t / factor, 3x3 conv, 1x1 conv to C_t, each followed by batch norm and ReLU (no biases)."""
    conv, norm, middle = _CONV[dims], _NORM[dims], teacher_channels // factor
    return nn.Sequential(
        conv(student_channels, middle, 1, bias=False), norm(middle), nn.ReLU(),
        conv(middle, middle, 3, padding=1, bias=False), norm(middle), nn.ReLU(),
        conv(middle, teacher_channels, 1, bias=False), norm(teacher_channels), nn.ReLU(),
    )


def srd_connector(student_channels: int, teacher_channels: int, dims: int = 0) -> nn.Sequential:
    """SRD's connector: a 1x1 conv (a linear map on a (B, C) vector) to the teacher's width,
    batch norm and ReLU."""
    layer = nn.Linear(student_channels, teacher_channels, bias=False) if dims == 0 else \
        _CONV[dims](student_channels, teacher_channels, 1, bias=False)
    return nn.Sequential(layer, _NORM[dims](teacher_channels), nn.ReLU())


class _ReusesTeacherClassifier(FeatureSetLoss):
    """Two pairs: the feature the method projects, then the classifiers' outputs, whose
    teacher module is copied (frozen) into the loss's head."""

    has_shape_dependent_parameters = True
    #: the method's registered name, for messages and for rebuilding its head
    name = ""
    #: the ranks of the feature the method reads, per sample (channels first)
    feature_ranks: tuple[int, ...] = (2, 3)
    feature_help = ""

    def __init__(self) -> None:
        super().__init__()
        self.head: PooledClassifierHead | None = None
        self.shapes: tuple[Shape, Shape] = ((), ())
        self.classes = 0
        self.classifier_bias = True

    def bind(self, student_shapes: Sequence[Shape], teacher_shapes: Sequence[Shape]) -> None:
        if len(student_shapes) != 2:
            raise ConfigError(f"{self.name}: reads two pairs, {self.feature_help} and the classifiers' outputs, e.g. "
                              f"{self.example_names()}; got {len(student_shapes)} pair(s).")
        s, t = tuple(student_shapes[0]), tuple(teacher_shapes[0])
        if len(s) not in self.feature_ranks or len(t) != len(s):
            raise ConfigError(f"{self.name}: the first pair must be {self.feature_help}, of one layout on both sides; "
                              f"got student {s} and teacher {t}.")
        sk, tk = tuple(student_shapes[1]), tuple(teacher_shapes[1])
        if len(tk) != 1 or sk != tk:
            raise ConfigError(f"{self.name}: the second pair must be the classifiers' outputs (K,) with as many classes "
                              f"on both sides (e.g. 'fc'); got student {sk} and teacher {tk}.")
        self.shapes, self.classes = (s, t), tk[0]

    def bind_modules(self, student_modules: Sequence[nn.Module | None],
                     teacher_modules: Sequence[nn.Module | None]) -> None:
        """Copy the teacher's classifier (the second pair's teacher module) into the head, frozen."""
        module = teacher_modules[1] if len(teacher_modules) > 1 else None
        channels = self.shapes[1][0]
        if not isinstance(module, nn.Linear):
            what = type(module).__name__ if module is not None else "not a module output"
            raise ConfigError(f"{self.name}: the second teacher feature must be the output of the teacher's classifier, "
                              f"a linear layer (e.g. 'fc', not 'fc:in'); it is {what}.")
        if module.in_features != channels:
            raise ConfigError(f"{self.name}: the teacher's classifier takes {module.in_features} features but the "
                              f"teacher feature of the first pair has {channels} channels; name the one the classifier "
                              "reads (its last conv map, or 'fc:in').")
        self.bind_classifier(module)

    def bind_classifier(self, classifier: nn.Linear) -> None:
        """Build the head around a copy of `classifier` (outside a Distiller: after `bind`)."""
        if not self.shapes[0]:
            raise ConfigError(f"{self.name}: call bind with the feature shapes first.")
        self.classifier_bias = classifier.bias is not None
        frozen = copy.deepcopy(classifier).requires_grad_(False)
        self.head = self.build_head(**self.head_args(), classifier=frozen)

    def head_args(self) -> dict[str, Any]:
        """What `build_head` rebuilds the head from (kept in checkpoints)."""
        raise NotImplementedError

    def trained_parameters(self) -> Iterator[nn.Parameter]:
        """The projector; the teacher's classifier stays as the teacher trained it."""
        return (p for p in self.parameters() if p.requires_grad)

    def bound_head(self) -> PooledClassifierHead:
        if self.head is None:
            raise ConfigError(f"{self.name}: not bound to its features; build it through a Distiller with "
                              "example_input (or call bind, then bind_classifier with the teacher's classifier).")
        return self.head

    @classmethod
    def example_names(cls) -> str:
        return f"student: {list(cls.example.student)}, teacher: {list(cls.example.teacher)}"


@LOSSES.register("simkd")
class ReusedTeacherClassifier(_ReusesTeacherClassifier):
    """SimKD (Chen, Mei, Zhang, Wang, Wang & Chen, "Knowledge Distillation with the Reused
    Teacher Classifier", CVPR 2022): the student's last map, projected to the teacher's, is
    classified by the teacher's own classifier.

    A projector P (1x1 conv to C_t / factor, 3x3 conv, 1x1 conv to C_t, each with batch norm
    and ReLU) maps the student's last conv map F_s to the teacher's F_t, and
    L = mean over samples, channels and positions of (P(F_s) - F_t)^2. When the maps differ
    in size, the larger is average-pooled to the smaller first (the student's also at
    inference). The student then answers as softmax(W_t pool(P(F_s)) + b_t), with the
    teacher's classifier (W_t, b_t) copied and frozen: the trained student is the network,
    the projector and that classifier, and its own classifier is not used (it gets no
    gradient). Evaluation, the summary and `featkd export` use that student.

    The term reads two pairs: the last conv map and the classifier, student: [layer3, fc],
    teacher: [layer3, fc]; the teacher's classifier must be a linear layer on the
    average-pooled map. The authors train with this loss alone (no cross-entropy, weight 1,
    factor 2); a `ce` term would train the student's own classifier, which inference does not
    use. Maps of one spatial dimension (signals) use 1-D convolutions.
    """

    name = "simkd"
    example = Example(["layer3", "fc"], ["layer3", "fc"])
    leaves_parameters_unused = True
    feature_help = "the last conv maps (C, H, W) or (C, L)"
    student_hint = ("SimKD reads the last conv map and the classifier, e.g. student: [layer3, fc]; "
                    "`featkd inspect MODEL` lists the names.")

    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ConfigError(f"simkd: factor divides the teacher's channels in the projector's bottleneck, an "
                              f"integer >= 1 (2 in the paper), got {factor!r}.")
        self.factor = factor
        self.pool_to: tuple[int, ...] | None = None
        self.teacher_pool: tuple[int, ...] | None = None

    def bind(self, student_shapes: Sequence[Shape], teacher_shapes: Sequence[Shape]) -> None:
        super().bind(student_shapes, teacher_shapes)
        (cs, *s_size), (ct, *t_size) = self.shapes
        if ct // self.factor < 1:
            raise ConfigError(f"simkd: factor {self.factor} leaves no channel of the teacher's {ct} in the bottleneck.")
        smaller = all(a <= b for a, b in zip(s_size, t_size))
        if not smaller and not all(a >= b for a, b in zip(s_size, t_size)):
            raise ConfigError(f"simkd: the student map {tuple(s_size)} is larger than the teacher's {tuple(t_size)} "
                              "in one dimension and smaller in another; capture maps one can be pooled to.")
        # the larger map is pooled to the smaller: the student's (in its head) or the teacher's
        self.pool_to = None if smaller else tuple(t_size)
        self.teacher_pool = tuple(s_size) if smaller and s_size != t_size else None

    def head_args(self) -> dict[str, Any]:
        (cs, *size), (ct, *_) = self.shapes
        return {"student_channels": cs, "teacher_channels": ct, "factor": self.factor, "dims": len(size),
                "pool_to": list(self.pool_to) if self.pool_to else None, "classes": self.classes,
                "bias": self.classifier_bias}

    @classmethod
    def build_head(cls, student_channels: int, teacher_channels: int, factor: int, dims: int,
                   pool_to: Sequence[int] | None, classes: int, classifier: nn.Linear | None = None,
                   bias: bool = True) -> PooledClassifierHead:
        """The head from `head_args` (a fresh classifier for loading saved weights, unless given)."""
        classifier = classifier if classifier is not None else nn.Linear(teacher_channels, classes, bias=bias)
        return PooledClassifierHead(simkd_projector(student_channels, teacher_channels, factor, dims), classifier,
                                    tuple(pool_to) if pool_to else None)

    def inference_head(self) -> nn.Module:
        return self.bound_head()

    def forward(self, students: list[torch.Tensor], teachers: list[torch.Tensor]) -> torch.Tensor:
        head = self.bound_head()
        target = full_precision(teachers[0].detach())
        if self.teacher_pool is not None:
            pool = F.adaptive_avg_pool1d if len(self.teacher_pool) == 1 else F.adaptive_avg_pool2d
            target = pool(target, self.teacher_pool)
        return F.mse_loss(full_precision(head.project(students[0])), target)

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


@LOSSES.register("srd")
class SoftmaxRegression(_ReusesTeacherClassifier):
    """SRD, softmax regression representation learning (Yang, Martinez, Bulat & Tzimiropoulos,
    "Knowledge Distillation via Softmax Regression Representation Learning", ICLR 2021).

    A connector r (1x1 conv, or a linear map on a pooled vector, to the teacher's width, with
    batch norm and ReLU) maps the student's penultimate feature h_s; with pool the average
    over positions (none for a vector),
        L_FM = mean over samples and channels of (pool(r(h_s)) - pool(h_t))^2,
        L_SR = mean over samples and classes of (W_t pool(r(h_s)) + b_t - z_t)^2,
    where (W_t, b_t) is the teacher's classifier, copied and frozen, and z_t the teacher's
    logits; L = feature_weight L_FM + regression_weight L_SR, logged as its two parts. The
    student keeps its own classifier, trained by the run's cross-entropy term, and answers
    with it, as in the authors' code; `classify_with_teacher: true` makes it answer through
    the connector and the teacher's classifier instead (the way SimKD does), which evaluation,
    the summary and `featkd export` then use.

    The term reads two pairs: the penultimate feature and the classifier, student: [fc:in, fc],
    teacher: [fc:in, fc] (the pooled vectors, as the authors' CIFAR code); naming the last conv
    maps instead (layer3) connects the maps before pooling, as their ImageNet code. The
    squared errors on logits and features follow the authors' code (the paper also discusses a
    KL form). Defaults: both weights 1, with cross-entropy at weight 1.
    """

    name = "srd"
    example = Example(["fc:in", "fc"], ["fc:in", "fc"])
    feature_ranks = (1, 2, 3)
    feature_help = "the penultimate features (C,) or the last conv maps (C, H, W) / (C, L)"
    student_hint = ("SRD reads the penultimate feature and the classifier, e.g. student: ['fc:in', fc]; "
                    "`featkd inspect MODEL` lists the names.")

    def __init__(self, feature_weight: float = 1.0, regression_weight: float = 1.0,
                 classify_with_teacher: bool = False) -> None:
        super().__init__()
        for name, value in (("feature_weight", feature_weight), ("regression_weight", regression_weight)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ConfigError(f"srd: {name} is a weight >= 0 of its part of the loss, got {value!r}.")
        if not isinstance(classify_with_teacher, bool):
            raise ConfigError(f"srd: classify_with_teacher is true or false, got {classify_with_teacher!r}.")
        self.feature_weight, self.regression_weight = float(feature_weight), float(regression_weight)
        self.classify_with_teacher = classify_with_teacher

    def head_args(self) -> dict[str, Any]:
        (cs, *size), (ct, *_) = self.shapes
        return {"student_channels": cs, "teacher_channels": ct, "dims": len(size), "classes": self.classes,
                "bias": self.classifier_bias}

    @classmethod
    def build_head(cls, student_channels: int, teacher_channels: int, dims: int, classes: int,
                   classifier: nn.Linear | None = None, bias: bool = True) -> PooledClassifierHead:
        """The head from `head_args` (a fresh classifier for loading saved weights, unless given)."""
        classifier = classifier if classifier is not None else nn.Linear(teacher_channels, classes, bias=bias)
        return PooledClassifierHead(srd_connector(student_channels, teacher_channels, dims), classifier)

    def inference_head(self) -> nn.Module | None:
        return self.bound_head() if self.classify_with_teacher else None

    def forward(self, students: list[torch.Tensor], teachers: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        head = self.bound_head()
        pooled = full_precision(global_pool(head.project(students[0])))
        target = full_precision(global_pool(teachers[0].detach()))
        regressed = head.classifier(pooled.to(head.classifier.weight.dtype))
        return {"feature": self.feature_weight * F.mse_loss(pooled, target),
                "regression": self.regression_weight * F.mse_loss(full_precision(regressed),
                                                                  full_precision(teachers[1].detach()))}

    def extra_repr(self) -> str:
        return (f"feature_weight={self.feature_weight}, regression_weight={self.regression_weight}, "
                f"classify_with_teacher={self.classify_with_teacher}")
