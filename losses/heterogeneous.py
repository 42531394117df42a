"""Distillation between heterogeneous architectures (CNN, ViT, MLP): OFA-KD (Hao et al.,
NeurIPS 2023), which compares the models only where every architecture agrees, in the space
of class logits, through branches on the student's intermediate features."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from featkd.adapters import infer_layout
from featkd.errors import ConfigError
from featkd.losses.base import (
    IGNORE_INDEX,
    LOSSES,
    Example,
    FeatureSetLoss,
    LossValue,
    Shape,
    TermInputs,
    check_temperature,
    full_precision,
)

__all__ = ["OFALoss", "ofa_loss"]


def ofa_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, eps: float,
             temperature: float = 1.0) -> torch.Tensor:
    """OFA's modulated KD, averaged over the batch: with p = softmax(z / T) and m the one-hot label,

        L = -sum_c ((p^t_c + m_c)^eps - m_c) log p^s_c,

    the teacher's probability of the label class raised to (1 + p^t_y)^eps - 1 (at least
    eps p^t_y for eps >= 1: more target information where the teacher is confident), the
    others to (p^t_c)^eps. eps = 1 is the cross-entropy with the teacher's soft labels. A
    row labelled -100 (no label) has m = 0.
    """
    log_p_s = F.log_softmax(full_precision(student_logits) / temperature, dim=1)
    p_t = F.softmax(full_precision(teacher_logits.detach()) / temperature, dim=1)
    labelled = (targets != IGNORE_INDEX)[:, None]
    mask = F.one_hot(targets.clamp_min(0), p_t.shape[1]).to(p_t.dtype) * labelled
    weights = (p_t + mask).pow(eps) - mask
    return -(weights * log_p_s).sum(1).mean()


class SepConv(nn.Sequential):
    """Separable convolution that halves the resolution (the branches' downsampling block):
    3x3 depthwise stride 2, 1x1, BN, ReLU, 3x3 depthwise, 1x1 to `out_channels`, BN, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, dims: int = 2) -> None:
        conv = nn.Conv2d if dims == 2 else nn.Conv1d
        norm = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
        super().__init__(
            conv(in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False),
            conv(in_channels, in_channels, 1, bias=False), norm(in_channels), nn.ReLU(),
            conv(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False),
            conv(in_channels, out_channels, 1, bias=False), norm(out_channels), nn.ReLU(),
        )


class MapBranch(nn.Sequential):
    """A conv map (C, H, W) or (C, L) to logits: `blocks` SepConvs doubling the channels (the
    last to `width`; a 1x1 conv to `width` when there are none), global pooling, a linear
    classifier."""

    def __init__(self, channels: int, blocks: int, width: int, classes: int, dims: int) -> None:
        layers: list[nn.Module] = []
        for i in range(blocks):
            layers.append(SepConv(channels, width if i == blocks - 1 else channels * 2, dims))
            channels *= 2
        if not blocks:
            layers.append((nn.Conv2d if dims == 2 else nn.Conv1d)(channels, width, 1))
        pool = nn.AdaptiveAvgPool2d(1) if dims == 2 else nn.AdaptiveAvgPool1d(1)
        super().__init__(*layers, pool, nn.Flatten(), nn.Linear(width, classes))


class PatchMerging(nn.Module):
    """Swin's patch merging on a square grid of tokens: each 2x2 neighbourhood concatenated
    (4D), layer-normed and projected to `out_dim`; (B, g^2, D) -> (B, (g/2)^2, out_dim)."""

    def __init__(self, grid: int, dim: int, out_dim: int, activation: bool) -> None:
        super().__init__()
        self.grid = grid
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)
        self.act = nn.GELU() if activation else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, d = x.shape
        x = x.reshape(b, self.grid, self.grid, d)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.act(self.reduction(self.norm(x.reshape(b, -1, 4 * d))))


class Attention(nn.Module):
    """Multi-head self-attention as in a ViT block (qkv without bias, an output projection)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """A pre-norm transformer block as a ViT's (timm's `Block` with its defaults): attention
    and a 4x GELU MLP, each after a LayerNorm and added back."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TokenBranch(nn.Module):
    """Tokens (L, D) to logits: the `prefix` leading tokens (a class token) aside, the g x g
    grid of the others patch-merged `merges` times (the first merge projects to `width`),
    `blocks` transformer blocks over all tokens, then the class token (or, without one, the
    mean token) through a linear classifier. Tokens of another width than `width` that no
    merge projects go through a linear projection to it."""

    def __init__(self, tokens: int, dim: int, prefix: int, merges: int, blocks: int, width: int, heads: int,
                 classes: int) -> None:
        super().__init__()
        self.prefix = prefix
        grid = math.isqrt(tokens - prefix)
        merging = [PatchMerging(grid // 2**i, dim if i == 0 else width, width, activation=i == 0 or i < merges - 1)
                   for i in range(merges)]
        self.merge = nn.Sequential(*merging)
        # tokens no merge reaches (all of them without merges, else the class tokens) are projected
        self.project = nn.Linear(dim, width) if dim != width else nn.Identity()
        self.blocks = nn.Sequential(*[Block(width, heads) for _ in range(blocks)])
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.merge):
            x = torch.cat([self.project(x[:, :self.prefix]), self.merge(x[:, self.prefix:])], dim=1)
        else:
            x = self.project(x)
        x = self.blocks(x)
        return self.head(x[:, 0] if self.prefix else x.mean(1))


class VectorBranch(nn.Sequential):
    """An embedding (D,) to logits: the conv branch of a 1x1 map (a linear map to `width`,
    then the classifier)."""

    def __init__(self, dim: int, width: int, classes: int) -> None:
        super().__init__(nn.Linear(dim, width), nn.Linear(width, classes))


def _init_weights(module: nn.Module) -> None:
    """The branches' initialisation in the paper's code: Kaiming (fan out) convs, unit BN,
    truncated-normal (std 0.02) linear layers with zero bias."""
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _halvings(size: Sequence[int], target: Sequence[int]) -> int:
    """Stride-2 convolutions (each giving ceil(n / 2)) that bring `size` down to `target`."""
    count, size = 0, list(size)
    while any(s > t for s, t in zip(size, target)):
        size = [(s + 1) // 2 for s in size]
        count += 1
    return count


@LOSSES.register("ofa")
class OFALoss(FeatureSetLoss):
    """One-for-all KD, OFA-KD (Hao et al., NeurIPS 2023, "One-for-All: Bridge the Gap Between
    Heterogeneous Architectures in Knowledge Distillation"): branches on the student's
    intermediate features predict the classes and learn the teacher's logits with a KD whose
    label class is enhanced.

    Features of different architectures do not align, but their class logits do: each
    student feature f_i gets a branch b_i of its own that predicts the classes, and with
    OFA's loss (`ofa_loss`: -sum_c ((p^t_c + m_c)^eps - m_c) log p^s_c, m the one-hot label,
    p = softmax(z / T))

        L = sum_i L_OFA(b_i(f_i), z_t; eps_i) + logit_weight L_OFA(z_s, z_t; eps_last),

    z_s, z_t the two models' logits. eps >= 1 strengthens the label class where the teacher
    is confident; the paper uses eps = 1 on CIFAR-100 and 1.5 for CNN students on ImageNet,
    T = 1, all weights 1 next to cross-entropy (label smoothing 0.1) at 1. `eps` is one value,
    or one per branch then one for the logits.

    Branches, built from the student's feature shapes, as the paper's: a conv map (C, H, W)
    or (C, L) is brought to the resolution of the deepest map of the term by stride-2
    separable convolutions doubling its channels (the last to `embed_dim`; a 1x1 conv when
    it is there already), pooled and classified; tokens (L, D) of a ViT or MLP-mixer, after
    a class token (`class_tokens`, inferred: 1 when L - 1 is a square), are patch-merged
    down to a `final_grid` x `final_grid` grid (7, ImageNet's) if their grid is larger, then
    go through max(n - i, 1) transformer blocks (branch i of n) and the class token (else
    the mean token) is classified; an embedding (D,) is mapped to `embed_dim` and classified.
    `embed_dim` defaults to the student's widest feature (the paper uses the larger of the
    student's and the teacher's embedding widths for conv branches: set it to reproduce
    them). Rank-2 features are tokens unless the module they come from has a Conv1d.

    The loss reads z_t, z_s and the labels from the Distiller's step, not from captured
    features: the teacher side of each pair is not read (name the teacher's stages that the
    student's match, the paper's stage split). The feature shapes are known before training,
    the branches classify into as many classes as the student's logits have, probed at set-up
    (`num_classes` fixes it instead; either is checked against both models' logits at every
    step).
    """

    needs_targets = True
    has_shape_dependent_parameters = True
    reads_class_count = True
    example = Example("layer*", "layer*")

    def __init__(self, num_classes: int | None = None, eps: float | tuple[float, ...] = 1.0, temperature: float = 1.0,
                 logit_weight: float = 1.0, embed_dim: int | None = None, class_tokens: int | None = None,
                 final_grid: int = 7, heads: int = 4) -> None:
        super().__init__()
        if num_classes is not None and num_classes < 2:
            raise ConfigError(f"ofa: num_classes is the width of the logits (>= 2, or null: probed), got "
                              f"{num_classes}.")
        values = (eps,) if isinstance(eps, (int, float)) else tuple(eps)
        if not values or not all(math.isfinite(e) and e > 0 for e in values):
            raise ConfigError(f"ofa: eps must be > 0 (the paper's 1 or 1.5), one value or one per branch and one "
                              f"for the logits; got {eps!r}.")
        check_temperature("ofa", temperature)
        if not logit_weight >= 0:
            raise ConfigError(f"ofa: logit_weight must be >= 0 (0 leaves the student's own logits out), got "
                              f"{logit_weight}.")
        if embed_dim is not None and embed_dim < 1:
            raise ConfigError(f"ofa: embed_dim must be >= 1 (or null: the student's widest feature), got {embed_dim}.")
        if class_tokens is not None and class_tokens < 0:
            raise ConfigError(f"ofa: class_tokens must be >= 0 (or null: inferred), got {class_tokens}.")
        if final_grid < 1 or heads < 1:
            raise ConfigError(f"ofa: final_grid and heads must be >= 1, got {final_grid} and {heads}.")
        self.num_classes, self.eps, self.temperature, self.logit_weight = num_classes, values, temperature, logit_weight
        self.embed_dim, self.class_tokens, self.final_grid, self.heads = embed_dim, class_tokens, final_grid, heads
        self.branches = nn.ModuleList()
        self._shapes: list[Shape] = []
        self._layouts: list[str] = []

    def bind_classes(self, classes: int) -> None:
        if self.num_classes is None:
            self.num_classes = classes
        elif self.num_classes != classes:
            raise ConfigError(f"ofa: num_classes={self.num_classes}, but the student's logits have {classes}; set "
                              "num_classes to the logits' width, or leave it out to have it probed.")

    def bind(self, student_shapes: Sequence[Shape], teacher_shapes: Sequence[Shape]) -> None:
        if self.num_classes is None:
            raise ConfigError("ofa: the number of classes is probed from the student's logits through a Distiller "
                              "with example_input; outside one, give num_classes (or call bind_classes first).")
        shapes = [tuple(s) for s in student_shapes]
        for shape in shapes:
            if len(shape) not in (1, 2, 3):
                raise ConfigError(
                    f"ofa: branches take conv maps (C, H, W) or (C, L), tokens (L, D) or embeddings (D,); got a "
                    f"student feature of {shape}. Capture stage outputs (`featkd inspect MODEL` lists shapes)."
                )
        if len(self.eps) not in (1, len(shapes) + 1):
            raise ConfigError(f"ofa: eps has {len(self.eps)} values for {len(shapes)} branches; give one value, or "
                              f"{len(shapes) + 1}: one per branch, then one for the logits.")
        self._shapes = shapes
        self._build([{1: "vector", 2: "tokens", 3: "map"}[len(s)] for s in shapes])

    def bind_modules(self, student_modules: Sequence[nn.Module | None],
                     teacher_modules: Sequence[nn.Module | None]) -> None:
        # (C, L) maps of Conv1d models are rank 2 like tokens: the module tells them apart
        layouts = [infer_layout(s, m) if len(s) == 2 and m is not None else layout
                   for s, m, layout in zip(self._shapes, student_modules, self._layouts)]
        if layouts != self._layouts:
            self._build(layouts)

    def _build(self, layouts: list[str]) -> None:
        shapes, n = self._shapes, len(self._shapes)
        width = self.embed_dim or max(s[1] if layout == "tokens" else s[0] for s, layout in zip(shapes, layouts))
        deepest = {}  # the smallest size per dimension among the maps of each rank
        for s, layout in zip(shapes, layouts):
            if layout in ("map", "sequence"):
                size = deepest.get(len(s), s[1:])
                deepest[len(s)] = tuple(min(a, b) for a, b in zip(size, s[1:]))
        branches = []
        for i, (s, layout) in enumerate(zip(shapes, layouts)):
            if layout in ("map", "sequence"):
                branch: nn.Module = MapBranch(s[0], _halvings(s[1:], deepest[len(s)]), width, self.num_classes,
                                              len(s) - 1)
            elif layout == "tokens":
                branch = self._token_branch(i, s, width, blocks=max(n - (i + 1), 1))
            else:
                branch = VectorBranch(s[0], width, self.num_classes)
            _init_weights(branch)
            branches.append(branch)
        self.branches = nn.ModuleList(branches)
        self._layouts = layouts

    def _token_branch(self, i: int, shape: Shape, width: int, blocks: int) -> TokenBranch:
        tokens, dim = shape
        prefix = self.class_tokens
        if prefix is None:  # a class token before a square grid of patches
            prefix = 0 if math.isqrt(tokens) ** 2 == tokens else int(math.isqrt(tokens - 1) ** 2 == tokens - 1)
        if prefix >= tokens:
            raise ConfigError(f"ofa: branch {i} reads {tokens} tokens, of which class_tokens={prefix} would be class "
                              "tokens; set class_tokens to the number of leading non-patch tokens.")
        grid = math.isqrt(tokens - prefix)
        merges = max(int(math.log2(grid / self.final_grid)), 0) if grid * grid == tokens - prefix else 0
        for m in range(merges):
            if (grid // 2**m) % 2:
                raise ConfigError(
                    f"ofa: branch {i} merges its {grid}x{grid} grid of tokens 2x2 at a time down to about "
                    f"{self.final_grid}x{self.final_grid}, but the grid becomes {grid // 2**m}x{grid // 2**m}, "
                    "which is odd. Set final_grid to a size the grid halves to evenly."
                )
        if width % self.heads:
            raise ConfigError(f"ofa: branch {i} has transformer blocks of width embed_dim={width} with "
                              f"{self.heads} heads; choose embed_dim divisible by heads.")
        return TokenBranch(tokens, dim, prefix, merges, blocks, width, self.heads, self.num_classes)

    def evaluate(self, inputs: TermInputs, objective: Callable[..., LossValue] | None = None) -> LossValue:
        # besides its student features, OFA reads both models' logits and the labels
        return (objective or self)(inputs.students, inputs.teachers, inputs.student_logits, inputs.teacher_logits,
                                   inputs.targets, **inputs.keywords(self))

    def forward(self, students: list[torch.Tensor], teachers: list[torch.Tensor], student_logits: torch.Tensor,
                teacher_logits: object, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        if len(self.branches) != len(students):
            raise ConfigError("ofa: its branches are built from probed shapes; pass example_input to the Distiller.")
        if not isinstance(teacher_logits, torch.Tensor):
            raise ConfigError("ofa: learns one teacher's logits (give the Distiller one teacher).")
        for side, logits in (("teacher", teacher_logits), ("student", student_logits)):
            if logits.dim() != 2 or logits.shape[1] != self.num_classes:
                raise ConfigError(f"ofa: num_classes={self.num_classes}, but the {side}'s logits are "
                                  f"{tuple(logits.shape)}; set num_classes to the number of classes (the logits' "
                                  "width, the same for both models).")
        eps = self.eps * (len(students) + 1) if len(self.eps) == 1 else self.eps
        parts = {f"branch{i + 1}": ofa_loss(branch(full_precision(s)), teacher_logits, targets, e, self.temperature)
                 for i, (branch, s, e) in enumerate(zip(self.branches, students, eps))}
        if self.logit_weight:
            parts["logits"] = self.logit_weight * ofa_loss(student_logits, teacher_logits, targets, eps[-1],
                                                           self.temperature)
        return parts

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, eps={self.eps}, temperature={self.temperature}, "
                f"logit_weight={self.logit_weight}, embed_dim={self.embed_dim}, class_tokens={self.class_tokens}, "
                f"final_grid={self.final_grid}, heads={self.heads}")
