"""Losses on what the channels of conv maps encode: each channel's spatial distribution (CWD),
the correlation between channels (ICKD), and a compact teacher factor with the affinity
between positions it induces (KTAAD).

All take conv maps, (C, H, W) or (C, L) per sample. `cwd` compares channel with channel over
the same positions (its default adapter, `auto`, projects the student with a 1x1 conv + BN);
`chsim` learns its own embedding of the student to the teacher's channels; `affinity`
relates positions to each other and takes any channel counts; `ktaad` brings its own
adapters and teacher autoencoder."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from featkd.capture import eval_mode
from featkd.errors import ConfigError
from featkd.losses.base import (
    LOSSES,
    Example,
    FeaturePairLoss,
    FeatureSetLoss,
    PretrainStage,
    Shape,
    check_temperature,
    full_precision,
)
from featkd.losses.feature import check_maps, pool_to_common_size


def _require_map_tensors(name: str, student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.dim() not in (3, 4) or student.dim() != teacher.dim():
        raise ConfigError(
            f"{name}: needs batches of conv maps (B, C, H, W) or (B, C, L) on both sides, got student "
            f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}. Capture conv layers."
        )


def _require_equal_channels(name: str, student_channels: int, teacher_channels: int) -> None:
    if student_channels != teacher_channels:
        raise ConfigError(
            f"{name}: compares channel with channel, but the student has {student_channels} channels and the "
            f"teacher {teacher_channels}. Keep the method's embedding (embed_kernel: 1, the default) to learn a "
            "projection to the teacher's channels, or pick layers with equal channel counts."
        )


def _conv(dims: int, transposed: bool = False) -> type[nn.Module]:
    if transposed:
        return nn.ConvTranspose2d if dims == 2 else nn.ConvTranspose1d
    return nn.Conv2d if dims == 2 else nn.Conv1d


def _norm(dims: int) -> type[nn.Module]:
    return nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d


# -- CWD ---------------------------------------------------------------------------------


def channel_log_distributions(x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(x_c / T) over the positions of each channel: (B, C, positions)."""
    return F.log_softmax(full_precision(x).flatten(2) / temperature, dim=2)


@LOSSES.register("cwd")
class ChannelWiseDistillation(FeaturePairLoss):
    """Channel-wise distillation (Shu et al., ICCV 2021): each channel's map, softened by a
    temperature, is a distribution over positions; the student's channel matches the teacher's.

    phi(y_c)_i = exp(y_{c,i} / T) / sum_j exp(y_{c,j} / T) over the H x W positions i;
    L = T^2 / (B C) sum_{b,c} sum_i phi(t_{b,c})_i log(phi(t_{b,c})_i / phi(s_{b,c})_i),
    the KL summed over positions and averaged over channels and samples, as the authors' code
    does. Defaults: T = 4 and weight 3, the authors' command for the logits map of PSPNet on
    Cityscapes. Student and teacher maps need equal shapes: the default adapter (`auto`) is a
    1x1 conv + BN to the teacher's channels, as the authors project student feature maps.
    """

    example = Example("layer2", "layer2")
    default_weight = 3.0
    default_adapter = "auto"
    needs_same_shape = True

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        check_temperature("cwd", temperature)
        self.temperature = temperature

    def bind(self, student_shapes: Sequence[Shape], teacher_shapes: Sequence[Shape]) -> None:
        check_maps("cwd", student_shapes, teacher_shapes)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        _require_map_tensors("cwd", student, teacher)
        if student.shape != teacher.shape:
            raise ConfigError(
                f"cwd: matches channel with channel over the same positions, but the student map is "
                f"{tuple(student.shape[1:])} and the teacher's {tuple(teacher.shape[1:])}. Set `adapter: auto` "
                "on the term (1x1 conv + BN to the teacher's channels, resized to its grid)."
            )
        log_p_s = channel_log_distributions(student, self.temperature)
        with torch.no_grad():
            log_p_t = channel_log_distributions(teacher.detach(), self.temperature)
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum()
        batch, channels = student.shape[:2]
        return kl * (self.temperature**2) / (batch * channels)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


# -- ICKD --------------------------------------------------------------------------------


def inter_channel_correlation(x: torch.Tensor) -> torch.Tensor:
    """G = F F^T over positions, each row L2-normalized: (B, C, C)."""
    f = full_precision(x).flatten(2)
    return F.normalize(torch.bmm(f, f.transpose(1, 2)), dim=2)


def channel_similarity_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1/(B C) sum_b ||G(s_b) - G(t_b)||_F^2 for maps of equal channel counts; through the
    positions (`_distance_through_positions`) when maps have fewer positions than channels."""
    channels, positions = student.shape[1], max(math.prod(student.shape[2:]), math.prod(teacher.shape[2:]))
    if positions < channels:
        return _distance_through_positions(student, teacher)
    with torch.no_grad():
        g_t = inter_channel_correlation(teacher.detach())
    g_s = inter_channel_correlation(student)
    return (g_s - g_t).pow(2).sum() / (len(g_s) * g_s.shape[1])


def _row_norms(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(||G_i||^2, max(||G_i||, 1e-12)) of the rows of G = F F^T, from F's (N, N) Gram:
    ||G_i||^2 = f_i^T (F^T F) f_i."""
    squared = ((f @ (f.transpose(1, 2) @ f)) * f).sum(-1).clamp_min(0)
    return squared, squared.clamp_min(1e-24).sqrt()


def _distance_through_positions(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The distance of `channel_similarity_distance` without forming the (C, C) matrices:
    with A, B the (C, N) maps and D_A, D_B the row norms of A A^T, B B^T,
    ||D_A^-1 A A^T - D_B^-1 B B^T||_F^2 = sum_i ||G_A,i||^2 / D_A,i^2 + (the same for B)
    - 2 <A^T D_A^-1 D_B^-1 B, A^T B>_F, whose matrices are (N_A, N_B): O(C N^2) work and
    memory instead of O(C^2 N). In float64, as the sum is a difference of large terms."""
    a = student.flatten(2).double()
    b = teacher.detach().flatten(2).double()
    squared_a, norm_a = _row_norms(a)
    with torch.no_grad():
        squared_b, norm_b = _row_norms(b)
        own_b = (squared_b / norm_b ** 2).sum(-1)
    own_a = (squared_a / norm_a ** 2).sum(-1)
    a_b = a.transpose(1, 2) @ b
    weighted = a.transpose(1, 2) @ (b / (norm_a * norm_b)[..., None])
    cross = (weighted * a_b).sum((1, 2))
    distance = (own_a + own_b - 2 * cross).sum() / (a.shape[0] * a.shape[1])
    return distance.to(full_precision(student).dtype)


class ChannelEmbedding(nn.Sequential):
    """ICKD's student-side embedding: a conv (1x1 in the authors' CIFAR-100 code, 3x3 in their
    ImageNet code) without bias to the teacher's channels, then batch norm."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dims: int) -> None:
        super().__init__(_conv(dims)(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
                         _norm(dims)(out_channels))


@LOSSES.register("chsim")
class ChannelSimilarity(FeatureSetLoss):
    """Inter-channel correlation, ICKD (Liu et al., ICCV 2021): the student's channels relate to
    each other as the teacher's do.

    Each student map first goes through the method's embedding e (a conv + BN to the teacher's
    channel count, learned with the student). With F the (C, HW) map of a sample,
    G = F F^T (C x C) with each row L2-normalized; per layer pair
    L = 1/(B C) sum_b ||G(e(s_b)) - G(t_b)||_F^2, as in the authors' CIFAR-100 code
    (torchdistill's ChSimLoss divides by B^2 instead of B). Spatial sizes may differ (G is
    C x C). Defaults: a 1x1 embedding and weight 2.5, the authors' CIFAR-100 setting (their
    ImageNet weight, 500 over B^2 at B = 256, is 1.95 here); `embed_kernel: 3` is their
    ImageNet embedding, `embed_kernel: null` none (channel counts must then be equal).
    """

    example = Example("layer3", "layer3")
    default_weight = 2.5
    has_shape_dependent_parameters = True

    def __init__(self, embed_kernel: int | None = 1) -> None:
        super().__init__()
        if embed_kernel is not None and (embed_kernel < 1 or embed_kernel % 2 == 0):
            raise ConfigError(f"chsim: embed_kernel must be an odd kernel size (1, 3, ...) or null (no "
                              f"embedding), got {embed_kernel}.")
        self.embed_kernel = embed_kernel
        self.embeds = nn.ModuleList()

    def bind(self, student_shapes: Sequence[Shape], teacher_shapes: Sequence[Shape]) -> None:
        check_maps("chsim", student_shapes, teacher_shapes)
        for s, t in zip(student_shapes, teacher_shapes):
            if self.embed_kernel is None:
                _require_equal_channels("chsim", s[0], t[0])
            else:
                self.embeds.append(ChannelEmbedding(s[0], t[0], self.embed_kernel, len(s) - 1))

    def forward(self, students: list[torch.Tensor], teachers: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.embed_kernel is not None and len(self.embeds) != len(students):
            raise ConfigError("chsim: the embeddings are built from probed shapes; pass example_input to the "
                              "Distiller (or call bind).")
        losses = []
        for i, (s, t) in enumerate(zip(students, teachers)):
            _require_map_tensors("chsim", s, t)
            s = full_precision(s)
            if self.embed_kernel is not None:
                s = self.embeds[i](s)
            _require_equal_channels("chsim", s.shape[1], t.shape[1])
            losses.append(channel_similarity_distance(s, t))
        return losses

    def extra_repr(self) -> str:
        return f"embed_kernel={self.embed_kernel}"


# -- KTAAD -------------------------------------------------------------------------------


def affinity_matrix(x: torch.Tensor) -> torch.Tensor:
    """A_ij = cos(f_i, f_j) / m between the feature vectors of positions i and j (m positions,
    the vectors across channels): (B, m, m)."""
    f = F.normalize(full_precision(x).flatten(2), dim=1)
    return torch.bmm(f.transpose(1, 2), f) / f.shape[2]


def affinity_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """(1/B) sum_b ||A(s_b) - A(t_b)||_F, spatial sizes pooled to the smaller of the two."""
    student, teacher = pool_to_common_size(full_precision(student), full_precision(teacher.detach()))
    with torch.no_grad():
        a_t = affinity_matrix(teacher)
    return (affinity_matrix(student) - a_t).flatten(1).norm(dim=1).mean()


@LOSSES.register("affinity")
class AffinityDistillation(FeaturePairLoss):
    """Affinity distillation (He et al., CVPR 2019, KTAAD's second part): the student relates
    positions to each other as the teacher does, capturing long-range dependencies.

    A_ij = (1/m) f_i . f_j / (||f_i|| ||f_j||) between the feature vectors of positions i and j
    of a map with m positions; L = (1/B) sum_b ||A_s - A_t||_F. Channel counts may differ
    (each side's vectors are compared only with their own); spatial sizes are pooled to the
    smaller. Weight 1, the paper's gamma. `ktaad` applies it to the teacher's autoencoder
    factor and a student adapter; here it reads the two captured maps as they are.
    (torchdistill's AffinityLoss compares instead each channel's own outer product over
    positions, sum_c ||u_c u_c^T - v_c v_c^T||_F / m, which reduces to a per-channel cosine.)
    """

    example = Example("layer2", "layer2")
    default_weight = 1.0

    def bind(self, student_shapes: Sequence[Shape], teacher_shapes: Sequence[Shape]) -> None:
        check_maps("affinity", student_shapes, teacher_shapes)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        _require_map_tensors("affinity", student, teacher)
        return affinity_distance(student, teacher)


class KnowledgeTranslator(nn.Module):
    """KTAAD's teacher-side autoencoder: three 3x3 conv + BN + LeakyReLU layers down to the
    factor's channels (the encoder, the knowledge translator), three transposed ones back up."""

    def __init__(self, channels: int, factor_channels: int, dims: int) -> None:
        super().__init__()
        conv, deconv, norm = _conv(dims), _conv(dims, transposed=True), _norm(dims)

        def layer(kind: type[nn.Module], a: int, b: int) -> list[nn.Module]:
            return [kind(a, b, 3, padding=1), norm(b), nn.LeakyReLU(0.1)]

        c, k = channels, factor_channels
        self.encoder = nn.Sequential(*layer(conv, c, c), *layer(conv, c, k), *layer(conv, k, k))
        self.decoder = nn.Sequential(*layer(deconv, k, k), *layer(deconv, k, c), *layer(deconv, c, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


@LOSSES.register("ktaad")
class KnowledgeAdaptation(FeaturePairLoss):
    """Knowledge translation and adaptation + affinity distillation, KTAAD (He et al., CVPR 2019).

    An autoencoder E/D on the teacher's last map is first trained alone (the `pretrain` stage,
    one epoch in the paper) on ||D(E(t)) - t||^2 (mean) + alpha (1/B) sum_b ||E(t_b)||_1,
    alpha = 1e-7; its encoder then translates the teacher's map into a compact factor E(t)
    with `rate` x C_t channels (0.5), fixed from then on (BN on its running statistics). The
    student gets two adapters, C_f (3x3 conv + BN + ReLU) and C_a (3x3 conv), to the factor's
    channels, and
      adapt    = beta * mean | C_f(s) / ||C_f(s)||_q - E(t) / ||E(t)||_q |  (p = 1; p = 2: the
                 batch mean of the L2 norm of that difference), norms over each sample's map,
      affinity = gamma * (1/B) sum_b ||A(C_a(s)) - A(E(t))||_F, A as in `affinity`,
    with the paper's beta = 50 and gamma = 1 (`adapt_weight`, `affinity_weight`; 0 leaves a
    part and its adapter out). One layer pair, the last conv maps; spatial sizes are pooled to
    the smaller.
    """

    example = Example("layer3", "layer3")
    default_weight = 1.0
    has_shape_dependent_parameters = True
    pretrain = PretrainStage(
        trains=("loss",), epochs=1, uses_student=False,
        description="autoencoder training: the knowledge translator learns to compress and rebuild the teacher's map",
    )

    def __init__(self, rate: float = 0.5, p: int = 1, q: float = 2.0, adapt_weight: float = 50.0,
                 affinity_weight: float = 1.0, sparsity: float = 1e-7) -> None:
        super().__init__()
        if not 0 < rate <= 1:
            raise ConfigError(f"ktaad: rate (the factor's share of the teacher's channels) must be in (0, 1], "
                              f"got {rate}.")
        if p not in (1, 2):
            raise ConfigError(f"ktaad: p (the norm of the factor difference) is 1 or 2, got {p}.")
        if not q > 0:
            raise ConfigError(f"ktaad: q (the norm that normalizes each factor) must be > 0, got {q}.")
        if adapt_weight < 0 or affinity_weight < 0 or adapt_weight == affinity_weight == 0:
            raise ConfigError(
                f"ktaad: adapt_weight and affinity_weight must be >= 0 and not both 0, got {adapt_weight} and "
                f"{affinity_weight}."
            )
        if sparsity < 0:
            raise ConfigError(f"ktaad: sparsity (the autoencoder's L1 weight alpha) must be >= 0, got {sparsity}.")
        self.rate, self.p, self.q, self.sparsity = rate, p, q, sparsity
        self.adapt_weight, self.affinity_weight = adapt_weight, affinity_weight
        self.translator: KnowledgeTranslator | None = None
        self.feature_adapter: nn.Module | None = None
        self.affinity_adapter: nn.Module | None = None

    def bind(self, student_shapes: Sequence[Shape], teacher_shapes: Sequence[Shape]) -> None:
        check_maps("ktaad", student_shapes, teacher_shapes)
        if len(student_shapes) != 1:
            raise ConfigError(
                f"ktaad: transfers one layer pair (the last conv maps), got {len(student_shapes)}; name one "
                "student and one teacher layer."
            )
        s, t = student_shapes[0], teacher_shapes[0]
        dims, factor = len(t) - 1, max(1, int(t[0] * self.rate))
        conv, norm = _conv(dims), _norm(dims)
        self.translator = KnowledgeTranslator(t[0], factor, dims)
        if self.adapt_weight:
            self.feature_adapter = nn.Sequential(conv(s[0], factor, 3, padding=1, bias=False), norm(factor), nn.ReLU())
        if self.affinity_weight:
            self.affinity_adapter = conv(s[0], factor, 3, padding=1)

    def _built(self) -> KnowledgeTranslator:
        if self.translator is None:
            raise ConfigError("ktaad: the autoencoder and adapters are built from probed shapes; pass example_input "
                              "to the Distiller (or call bind).")
        return self.translator

    def factor(self, teacher: torch.Tensor) -> torch.Tensor:
        """The teacher's compact factor E(t), with the encoder fixed (no gradient, BN running stats)."""
        translator = self._built()
        with torch.no_grad(), eval_mode(translator.encoder):
            return translator.encoder(full_precision(teacher.detach()))

    def adapt_distance(self, adapted: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        """The adapt part before its weight: p-distance of the q-normalized flattened maps."""
        adapted, factor = pool_to_common_size(full_precision(adapted), factor)
        diff = F.normalize(adapted.flatten(1), p=self.q, dim=1) - F.normalize(factor.flatten(1), p=self.q, dim=1)
        return diff.abs().mean() if self.p == 1 else diff.norm(dim=1).mean()

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> dict[str, torch.Tensor]:
        _require_map_tensors("ktaad", student, teacher)
        factor = self.factor(teacher)
        student = full_precision(student)
        parts: dict[str, torch.Tensor] = {}
        if self.feature_adapter is not None:
            parts["adapt"] = self.adapt_weight * self.adapt_distance(self.feature_adapter(student), factor)
        if self.affinity_adapter is not None:
            parts["affinity"] = self.affinity_weight * affinity_distance(self.affinity_adapter(student), factor)
        return parts

    def pretrain_loss(self, student: torch.Tensor | None, teacher: torch.Tensor) -> torch.Tensor:
        translator = self._built()
        teacher = full_precision(teacher.detach())
        code = translator.encoder(teacher)
        sparsity = code.abs().flatten(1).sum(1).mean()
        return F.mse_loss(translator.decoder(code), teacher) + self.sparsity * sparsity

    def trained_parameters(self) -> Iterator[nn.Parameter]:
        # the autoencoder is fixed after its own stage; distillation trains the two adapters
        for adapter in (self.feature_adapter, self.affinity_adapter):
            if adapter is not None:
                yield from adapter.parameters()

    def pretrain_parameters(self) -> Iterator[nn.Parameter]:
        return self.translator.parameters() if self.translator is not None else iter(())

    def extra_repr(self) -> str:
        return (f"rate={self.rate}, p={self.p}, q={self.q}, adapt_weight={self.adapt_weight}, "
                f"affinity_weight={self.affinity_weight}, sparsity={self.sparsity}")
