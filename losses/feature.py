"""Losses on intermediate feature maps."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from featkd.errors import ConfigError
from featkd.losses.base import (
    LOSSES,
    Example,
    FeaturePairLoss,
    FeatureSetLoss,
    PretrainStage,
    Shape,
    full_precision,
)


@LOSSES.register("fitnet")
class FitNetHint(FeaturePairLoss):
    """FitNets hint (Romero et al. 2015): regress the teacher's hint layer from the student's.

    L = mean (r(s) - t)^2, where r is the adapter (a 1x1 conv + BN regressor by default) that
    maps the student's guided layer to the teacher's hint layer. Stage 1 of the paper trains
    the student up to the guided layer and the regressor on this loss alone (the `pretrain`
    stage); the distillation stage then keeps the term with its weight (set it to 0 for the
    paper's pure two-stage recipe, where stage 2 is KD).
    """

    example = Example("layer2", "layer2")
    default_weight = 100.0
    default_adapter = "auto"
    needs_same_shape = True
    pretrain = PretrainStage(
        trains=("student", "adapters"), epochs=30,
        description="hint training: the student's layers up to the guided layer and the regressor learn the hint",
    )

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
class AttentionTransfer(FeaturePairLoss):
    """Attention transfer (Zagoruyko & Komodakis 2017): match normalized spatial attention maps.

    a(f) = normalize(mean_c |f_c|^p) flattened over positions; L = mean (a(s) - a(t))^2 per
    matched pair of layers (the pairs are summed). Channel counts may differ; spatial sizes
    are pooled to the smaller of the two.
    """

    example = Example("layer*", "layer*")
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


def check_maps(name: str, student_shapes: Sequence[Shape], teacher_shapes: Sequence[Shape],
               hint: str = "Capture conv layers") -> None:
    """Each pair must be conv maps, (C, H, W) or (C, L), of the same rank on both sides."""
    for s, t in zip(student_shapes, teacher_shapes):
        if len(s) not in (2, 3) or len(s) != len(t):
            raise ConfigError(
                f"{name}: needs conv maps (C, H, W) or (C, L) on both sides, got student {tuple(s)} and "
                f"teacher {tuple(t)}. {hint} (`featkd inspect MODEL` shows names and shapes)."
            )


@LOSSES.register("nst")
class NSTLoss(FeaturePairLoss):
    """Neuron selectivity transfer (Huang & Wang 2017): match the distributions of channels.

    Each channel's spatial map is L2-normalized; with the polynomial kernel k(a, b) = (a . b)^2,
    L = mean k(t, t') + mean k(s, s') - 2 mean k(s, t) over channel pairs (squared MMD),
    averaged over the batch and summed over layer pairs. Channel counts may differ; spatial
    sizes are pooled to the smaller.
    """

    example = Example("layer*", "layer*")
    default_weight = 50.0

    def bind(self, student_shapes, teacher_shapes) -> None:
        check_maps("nst", student_shapes, teacher_shapes)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        student, teacher = pool_to_common_size(full_precision(student), full_precision(teacher.detach()))
        s = F.normalize(student.flatten(2), dim=2)
        t = F.normalize(teacher.flatten(2), dim=2)

        def kernel_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.bmm(a, b.transpose(1, 2)).pow(2).mean()

        return kernel_mean(t, t) + kernel_mean(s, s) - 2 * kernel_mean(s, t)


class _VIDRegressor(nn.Sequential):
    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, dims: int) -> None:
        conv = nn.Conv2d if dims == 2 else nn.Conv1d
        super().__init__(
            conv(in_channels, mid_channels, 1, bias=False), nn.ReLU(),
            conv(mid_channels, mid_channels, 1, bias=False), nn.ReLU(),
            conv(mid_channels, out_channels, 1, bias=False),
        )


@LOSSES.register("vid")
class VIDLoss(FeatureSetLoss):
    """Variational information distillation (Ahn et al. 2019): maximise a variational lower
    bound on the mutual information between teacher and student features.

    A regressor mu(s) (three 1x1 convs) predicts the teacher map under a Gaussian whose
    per-channel variance sigma^2 = softplus(alpha_c) + eps is learned;
    L = mean_{b,c,h,w} [ (t - mu(s))^2 / (2 sigma_c^2) + log(sigma_c^2) / 2 ], per layer pair.
    Spatial sizes are pooled to the smaller; regressors and variances are registered parameters.
    """

    example = Example("layer[23]", "layer[23]")
    has_shape_dependent_parameters = True

    def __init__(self, init_variance: float = 5.0, eps: float = 1e-5) -> None:
        super().__init__()
        if init_variance <= eps:
            raise ConfigError(f"vid: init_variance must exceed eps ({eps}), got {init_variance}.")
        self.init_variance, self.eps = init_variance, eps
        self.regressors = nn.ModuleList()
        self.log_scales = nn.ParameterList()

    def bind(self, student_shapes, teacher_shapes) -> None:
        check_maps("vid", student_shapes, teacher_shapes)
        inverse_softplus = math.log(math.expm1(self.init_variance - self.eps))
        for s, t in zip(student_shapes, teacher_shapes):
            self.regressors.append(_VIDRegressor(s[0], t[0], t[0], len(s) - 1))
            self.log_scales.append(nn.Parameter(torch.full((t[0],), inverse_softplus)))

    def variances(self) -> list[torch.Tensor]:
        """The learned per-channel variances, one tensor per layer pair."""
        return [F.softplus(a) + self.eps for a in self.log_scales]

    def forward(self, students: list[torch.Tensor], teachers: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(self.regressors) != len(students):
            raise ConfigError("vid: regressors are built from probed shapes; pass example_input to the Distiller.")
        losses = []
        for regressor, variance, s, t in zip(self.regressors, self.variances(), students, teachers):
            s, t = pool_to_common_size(full_precision(s), full_precision(t.detach()))
            mean = regressor(s)
            var = variance.view(1, -1, *([1] * (t.dim() - 2)))
            losses.append((0.5 * ((full_precision(mean) - full_precision(t)).pow(2) / var + var.log())).mean())
        return losses


def _conv(dims: int):
    return nn.Conv2d if dims == 2 else nn.Conv1d


class Paraphraser(nn.Module):
    """FT's teacher-side autoencoder: three 3x3 convs down to `rate` x C channels (the factor),
    three transposed convs back up; trained to reconstruct the teacher's map."""

    def __init__(self, channels: int, rate: float, dims: int) -> None:
        super().__init__()
        conv = _conv(dims)
        deconv = nn.ConvTranspose2d if dims == 2 else nn.ConvTranspose1d
        factor = max(1, int(channels * rate))
        act = lambda: nn.LeakyReLU(0.1)  # noqa: E731
        self.encoder = nn.Sequential(conv(channels, channels, 3, padding=1), act(),
                                     conv(channels, factor, 3, padding=1), act(),
                                     conv(factor, factor, 3, padding=1), act())
        self.decoder = nn.Sequential(deconv(factor, factor, 3, padding=1), act(),
                                     deconv(factor, channels, 3, padding=1), act(),
                                     deconv(channels, channels, 3, padding=1), act())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class Translator(nn.Sequential):
    """FT's student-side encoder: three 3x3 conv + BN + LeakyReLU blocks to the factor's channels."""

    def __init__(self, in_channels: int, factor_channels: int, dims: int) -> None:
        conv, norm = _conv(dims), (nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d)
        layers: list[nn.Module] = []
        for a, b in [(in_channels, in_channels), (in_channels, factor_channels), (factor_channels, factor_channels)]:
            layers += [conv(a, b, 3, padding=1), norm(b), nn.LeakyReLU(0.1)]
        super().__init__(*layers)


@LOSSES.register("ft")
class FactorTransfer(FeaturePairLoss):
    """Factor transfer (Kim et al. 2018): match compressed "factors" of the two networks.

    A paraphraser (autoencoder, rate k = 0.5) is first trained to reconstruct the teacher's
    map (the `pretrain` stage, MSE); its encoder gives the teacher factor F_t. A translator on
    the student gives F_s. L = mean |F_s / ||F_s|| - F_t / ||F_t|| | (L1 of L2-normalized
    flattened factors, p = 1). `factor="attention"` normalizes the channel mean of squared
    factors instead, as the CRD benchmark's implementation does.
    """

    example = Example("layer3", "layer3")
    default_weight = 200.0
    has_shape_dependent_parameters = True
    pretrain = PretrainStage(
        trains=("loss",), epochs=30, uses_student=False,
        description="paraphraser training: the teacher-side autoencoder learns to reconstruct the teacher's map",
    )

    def __init__(self, rate: float = 0.5, p: int = 1, factor: Literal["flat", "attention"] = "flat") -> None:
        super().__init__()
        if not 0 < rate <= 1:
            raise ConfigError(f"ft: rate must be in (0, 1], got {rate}.")
        if p not in (1, 2):
            raise ConfigError(f"ft: p is 1 or 2, got {p}.")
        self.rate, self.p, self.factor = rate, p, factor
        self.paraphraser: Paraphraser | None = None
        self.translator: Translator | None = None

    def bind(self, student_shapes, teacher_shapes) -> None:
        check_maps("ft", student_shapes, teacher_shapes)
        if len(student_shapes) != 1:
            raise ConfigError(f"ft: transfers one layer pair (the paper's last conv map); got {len(student_shapes)}.")
        s, t = student_shapes[0], teacher_shapes[0]
        self.paraphraser = Paraphraser(t[0], self.rate, len(t) - 1)
        self.translator = Translator(s[0], max(1, int(t[0] * self.rate)), len(s) - 1)

    def _normalized(self, factor: torch.Tensor) -> torch.Tensor:
        factor = full_precision(factor)
        if self.factor == "attention":
            return F.normalize(factor.pow(2).mean(1).flatten(1), dim=1)
        return F.normalize(factor.flatten(1), dim=1)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if self.paraphraser is None or self.translator is None:
            raise ConfigError("ft: paraphraser and translator are built from probed shapes; pass example_input.")
        with torch.no_grad():  # the paraphraser is fixed after its own stage
            factor_t = self.paraphraser.encoder(full_precision(teacher.detach()))
        factor_s = self.translator(full_precision(student))
        factor_s, factor_t = pool_to_common_size(factor_s, factor_t)
        diff = self._normalized(factor_s) - self._normalized(factor_t)
        return diff.abs().mean() if self.p == 1 else diff.pow(2).mean()

    def pretrain_loss(self, student: torch.Tensor | None, teacher: torch.Tensor) -> torch.Tensor:
        if self.paraphraser is None:
            raise ConfigError("ft: the paraphraser is built from probed shapes; pass example_input.")
        teacher = full_precision(teacher.detach())
        return F.mse_loss(self.paraphraser(teacher), teacher)

    def trained_parameters(self) -> Iterator[nn.Parameter]:
        # the paraphraser is fixed after its own stage; distillation trains the translator
        return self.translator.parameters() if self.translator is not None else iter(())

    def pretrain_parameters(self) -> Iterator[nn.Parameter]:
        return self.paraphraser.parameters() if self.paraphraser is not None else iter(())


@LOSSES.register("ab")
class ActivationBoundaries(FeatureSetLoss):
    """Activation boundaries (Heo et al. 2019): make the student's neurons switch on and off
    where the teacher's do, by a hinge on pre-ReLU values.

    With s the adapted student and t the teacher pre-activation (capture the BN output before
    the ReLU) and margin m: per element rho(t) relu(m - s)^2 + (1 - rho(t)) relu(m + s)^2,
    rho(t) = [t > 0]; summed per sample, averaged over the batch, layer i of n weighted
    2^(i - n + 1) (deeper layers count more), times `scale` (3e-3 in the reference code).
    The transfer happens in the `pretrain` stage; the CRD benchmark then trains with CE (+KD)
    only, hence the default weight 0 in distillation.
    """

    example = Example("layer*.0.bn", "layer*.0.bn")
    default_weight = 0.0
    default_adapter = "auto"
    needs_same_shape = True
    pretrain = PretrainStage(
        trains=("student", "adapters"), epochs=30,
        description="activation-boundary initialisation: the student and connectors learn the teacher's boundaries",
    )

    def __init__(self, margin: float = 1.0, scale: float = 3e-3) -> None:
        super().__init__()
        if margin <= 0:
            raise ConfigError(f"ab: margin must be > 0, got {margin}.")
        self.margin, self.scale = margin, scale

    def forward(self, students: list[torch.Tensor], teachers: list[torch.Tensor]) -> list[torch.Tensor]:
        n = len(students)
        losses = []
        for i, (s, t) in enumerate(zip(students, teachers)):
            s, t = full_precision(s), full_precision(t.detach())
            on = (t > 0).to(s.dtype)
            hinge = on * F.relu(self.margin - s).pow(2) + (1 - on) * F.relu(self.margin + s).pow(2)
            losses.append(self.scale * 2.0 ** (i - n + 1) * hinge.sum() / len(s))
        return losses


def fsp_matrix(bottom: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """Flow of solution procedure between two maps: G_ij = mean over positions of a_i * b_j, (B, C_a, C_b)."""
    bottom, top = pool_to_common_size(full_precision(bottom), full_precision(top))
    a, b = bottom.flatten(2), top.flatten(2)
    return torch.bmm(a, b.transpose(1, 2)) / a.shape[-1]


@LOSSES.register("fsp")
class FSPLoss(FeatureSetLoss):
    """Flow of solution procedure (Yim et al. 2017): match Gram matrices between layers.

    For consecutive captured layers (l, l+1) on each side, G = mean_hw F_l F_{l+1}^T (C_l x
    C_{l+1}); L = sum over consecutive pairs of mean (G_s - G_t)^2. Student and teacher must
    have equal channel counts at every layer (use adapter "auto" otherwise). The transfer
    happens in the `pretrain` stage; the benchmark's distillation stage then uses CE (+KD),
    hence the default weight 0 in distillation.
    """

    example = Example("layer[12]", "layer[12]", adapter="auto")
    default_weight = 0.0
    pretrain = PretrainStage(
        trains=("student", "adapters"), epochs=30,
        description="FSP initialisation: the student learns the teacher's flow between layers",
    )

    def bind(self, student_shapes, teacher_shapes) -> None:
        check_maps("fsp", student_shapes, teacher_shapes)
        if len(student_shapes) < 2:
            raise ConfigError("fsp: needs at least two layers per side (a flow goes from one layer to the next).")
        for i, (s, t) in enumerate(zip(student_shapes, teacher_shapes)):
            if s[0] != t[0]:
                raise ConfigError(
                    f"fsp: layer {i} has {s[0]} student channels but {t[0]} teacher channels, and FSP compares "
                    "Gram matrices of equal size. Set `adapter: auto` on the term to project the student's "
                    "features to the teacher's channels, or pick layers with equal channel counts."
                )

    def forward(self, students: list[torch.Tensor], teachers: list[torch.Tensor]) -> torch.Tensor:
        total = students[0].new_zeros((), dtype=torch.float32)
        for i in range(len(students) - 1):
            g_s = fsp_matrix(students[i], students[i + 1])
            with torch.no_grad():
                g_t = fsp_matrix(teachers[i].detach(), teachers[i + 1].detach())
            total = total + (g_s - g_t).pow(2).mean()
        return total
