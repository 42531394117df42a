"""Correspondence adapters: trainable student-side modules that map a student feature to the
shape of the teacher feature it is compared with.

Shapes are per sample (no batch dimension) and come from a dry-run probe, never typed by
hand. A feature has one of four layouts:

    vector     (C,)        pooled embeddings, logits
    sequence   (C, L)      1-D conv maps
    map        (C, H, W)   2-D conv maps
    tokens     (N, C)      transformer tokens, possibly with leading class/distillation tokens

`auto` picks the adapter from the two shapes and layouts. Every adapter is registered in
`ADAPTERS` as a builder `(student_shape, teacher_shape, student_layout, teacher_layout,
**options) -> nn.Module`, so a plug-in can add its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from featkd.errors import AdapterError
from featkd.registry import Registry

Layout = Literal["vector", "sequence", "map", "tokens"]
Shape = tuple[int, ...]

ADAPTERS: Registry = Registry("adapter")


def infer_layout(shape: Sequence[int], model: nn.Module | None = None) -> Layout:
    """Layout of a per-sample shape. Rank 2 is (C, L) for models with Conv1d, else tokens."""
    rank = len(shape)
    if rank == 1:
        return "vector"
    if rank == 3:
        return "map"
    if rank == 2:
        if model is not None and any(isinstance(m, nn.Conv1d) for m in model.modules()):
            return "sequence"
        return "tokens"
    raise AdapterError(
        f"features of per-sample shape {tuple(shape)} are not supported by adapters; "
        "capture a vector, a 1-D or 2-D map, or tokens."
    )


class Resize(nn.Module):
    """Resize the spatial part of a map or sequence: average-pool down, interpolate up."""

    def __init__(self, size: Sequence[int]) -> None:
        super().__init__()
        self.size = tuple(int(s) for s in size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = tuple(x.shape[2:])
        if spatial == self.size:
            return x
        if all(s >= t for s, t in zip(spatial, self.size)):
            pool = F.adaptive_avg_pool2d if len(self.size) == 2 else F.adaptive_avg_pool1d
            return pool(x, self.size)
        mode = "bilinear" if len(self.size) == 2 else "linear"
        return F.interpolate(x, size=self.size, mode=mode, align_corners=False)

    def extra_repr(self) -> str:
        return f"size={self.size}"


class ConvAdapter(nn.Module):
    """1x1 convolution + batch norm (the FitNets regressor), then resize to the teacher's grid."""

    def __init__(self, in_channels: int, out_channels: int, size: Sequence[int]) -> None:
        super().__init__()
        conv, norm = (nn.Conv2d, nn.BatchNorm2d) if len(size) == 2 else (nn.Conv1d, nn.BatchNorm1d)
        self.conv = conv(in_channels, out_channels, kernel_size=1, bias=False)
        self.norm = norm(out_channels)
        self.resize = Resize(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resize(self.norm(self.conv(x)))


class LinearAdapter(nn.Module):
    """A linear map on the last dimension (vectors, or every token)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class PoolLinear(nn.Module):
    """Global-average-pool a map or sequence to a vector, then a linear map."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(2).mean(-1))


def token_grid(num_tokens: int, extra: int | None = None) -> tuple[int, int, int]:
    """(extra_tokens, h, w) for a token count: a square patch grid after 0-2 leading tokens."""
    for k in ([extra] if extra is not None else [0, 1, 2]):
        side = math.isqrt(num_tokens - k)
        if side * side == num_tokens - k and side > 0:
            return k, side, side
    raise AdapterError(
        f"{num_tokens} tokens are not a square grid after 0, 1 or 2 class tokens; "
        "write an adapter that knows this model's token layout."
    )


class TokensToMap(nn.Module):
    """Tokens (N, C) -> map (C', H, W): drop leading class tokens, fold the patch grid, then
    a 1x1 conv + BN to the teacher's channels and a resize to its grid."""

    def __init__(self, tokens: Shape, target: Shape) -> None:
        super().__init__()
        self.extra, self.h, self.w = token_grid(tokens[0])
        self.project = ConvAdapter(tokens[1], target[0], target[1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = x[:, self.extra :]
        return self.project(rearrange(patches, "b (h w) c -> b c h w", h=self.h, w=self.w))


class MapToTokens(nn.Module):
    """Map (C, H, W) -> tokens (N, C'): resize to the teacher's patch grid, unfold, project;
    the teacher's leading class tokens are matched by the mean patch token."""

    def __init__(self, source: Shape, tokens: Shape) -> None:
        super().__init__()
        self.extra, h, w = token_grid(tokens[0])
        self.resize = Resize((h, w))
        self.linear = nn.Linear(source[0], tokens[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.linear(rearrange(self.resize(x), "b c h w -> b (h w) c"))
        if self.extra:
            pooled = patches.mean(1, keepdim=True).expand(-1, self.extra, -1)
            patches = torch.cat([pooled, patches], dim=1)
        return patches


class TokensToTokens(nn.Module):
    """Tokens -> tokens: a linear map of channels, and the patch grid resampled if it differs."""

    def __init__(self, source: Shape, target: Shape) -> None:
        super().__init__()
        self.source_grid = token_grid(source[0])
        self.target_grid = token_grid(target[0])
        self.linear = nn.Linear(source[1], target[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        (k_s, h_s, w_s), (k_t, h_t, w_t) = self.source_grid, self.target_grid
        if (h_s, w_s) == (h_t, w_t) and k_s == k_t:
            return x
        grid = rearrange(x[:, k_s:], "b (h w) c -> b c h w", h=h_s, w=w_s)
        patches = rearrange(Resize((h_t, w_t))(grid), "b c h w -> b (h w) c")
        if k_t:
            head = x[:, :k_s].mean(1, keepdim=True) if k_s else patches.mean(1, keepdim=True)
            patches = torch.cat([head.expand(-1, k_t, -1), patches], dim=1)
        return patches


# -- registered builders -----------------------------------------------------------------


@ADAPTERS.register("identity")
def identity(student: Shape, teacher: Shape, student_layout: Layout, teacher_layout: Layout) -> nn.Module:
    """No change; the two features must already have the same shape."""
    if tuple(student) != tuple(teacher):
        raise AdapterError(
            f"adapter 'identity' needs equal shapes, got student {tuple(student)} and teacher "
            f"{tuple(teacher)}; use adapter 'auto'."
        )
    return nn.Identity()


@ADAPTERS.register("conv")
def conv(student: Shape, teacher: Shape, student_layout: Layout, teacher_layout: Layout) -> nn.Module:
    """1x1 conv + BN to the teacher's channels, then resize to its spatial size (maps, 1-D maps)."""
    _need(student_layout == teacher_layout in ("map", "sequence"), "conv", student, teacher)
    return ConvAdapter(student[0], teacher[0], teacher[1:])


@ADAPTERS.register("linear")
def linear(student: Shape, teacher: Shape, student_layout: Layout, teacher_layout: Layout) -> nn.Module:
    """Linear map of the last dimension (vectors, or tokens of equal count)."""
    _need(
        student_layout == teacher_layout in ("vector", "tokens") and student[:-1] == teacher[:-1],
        "linear", student, teacher,
    )
    return LinearAdapter(student[-1], teacher[-1])


@ADAPTERS.register("resize")
def resize(student: Shape, teacher: Shape, student_layout: Layout, teacher_layout: Layout) -> nn.Module:
    """Pool or interpolate to the teacher's spatial size; channels must already match."""
    _need(
        student_layout == teacher_layout in ("map", "sequence") and student[0] == teacher[0],
        "resize", student, teacher,
    )
    return Resize(teacher[1:])


@ADAPTERS.register("pool_linear")
def pool_linear(student: Shape, teacher: Shape, student_layout: Layout, teacher_layout: Layout) -> nn.Module:
    """Global average pool of a map, then linear to the teacher's vector."""
    _need(student_layout in ("map", "sequence") and teacher_layout == "vector", "pool_linear", student, teacher)
    return PoolLinear(student[0], teacher[0])


@ADAPTERS.register("tokens_to_map")
def tokens_to_map(student: Shape, teacher: Shape, student_layout: Layout, teacher_layout: Layout) -> nn.Module:
    """Transformer tokens to a conv map (class tokens dropped), via einops."""
    _need(student_layout == "tokens" and teacher_layout == "map", "tokens_to_map", student, teacher)
    return TokensToMap(tuple(student), tuple(teacher))


@ADAPTERS.register("map_to_tokens")
def map_to_tokens(student: Shape, teacher: Shape, student_layout: Layout, teacher_layout: Layout) -> nn.Module:
    """A conv map to transformer tokens (class tokens matched by the mean patch), via einops."""
    _need(student_layout == "map" and teacher_layout == "tokens", "map_to_tokens", student, teacher)
    return MapToTokens(tuple(student), tuple(teacher))


@ADAPTERS.register("tokens")
def tokens(student: Shape, teacher: Shape, student_layout: Layout, teacher_layout: Layout) -> nn.Module:
    """Tokens to tokens: linear channels, patch grid resampled when the counts differ."""
    _need(student_layout == teacher_layout == "tokens", "tokens", student, teacher)
    return TokensToTokens(tuple(student), tuple(teacher))


@ADAPTERS.register("auto")
def auto(student: Shape, teacher: Shape, student_layout: Layout, teacher_layout: Layout) -> nn.Module:
    """Pick from the probed shapes: identity if equal, else conv / linear / resize / tokens."""
    student, teacher = tuple(student), tuple(teacher)
    if student == teacher and student_layout == teacher_layout:
        return nn.Identity()
    pair = (student_layout, teacher_layout)
    if pair in {("map", "map"), ("sequence", "sequence")}:
        if student[0] == teacher[0]:
            return Resize(teacher[1:])
        return ConvAdapter(student[0], teacher[0], teacher[1:])
    if pair == ("vector", "vector"):
        return LinearAdapter(student[0], teacher[0])
    if pair == ("tokens", "tokens"):
        if student[0] == teacher[0]:
            return LinearAdapter(student[1], teacher[1])
        return TokensToTokens(student, teacher)
    if pair == ("tokens", "map"):
        return TokensToMap(student, teacher)
    if pair == ("map", "tokens"):
        return MapToTokens(student, teacher)
    if teacher_layout == "vector" and student_layout in ("map", "sequence"):
        return PoolLinear(student[0], teacher[0])
    raise AdapterError(
        f"no adapter maps a student {student_layout} {student} to a teacher {teacher_layout} "
        f"{teacher}. Compare features of compatible kinds (e.g. two conv maps, or two "
        "embeddings), or register an adapter of your own in featkd.adapters.ADAPTERS."
    )


def _need(ok: bool, name: str, student: Shape, teacher: Shape) -> None:
    if not ok:
        raise AdapterError(
            f"adapter {name!r} cannot map student shape {tuple(student)} to teacher shape "
            f"{tuple(teacher)}; use adapter 'auto' or one listed by `featkd list adapters`."
        )


def build_adapter(
    name: str,
    student: Sequence[int],
    teacher: Sequence[int],
    student_layout: Layout | None = None,
    teacher_layout: Layout | None = None,
) -> nn.Module:
    """Build adapter `name` for per-sample shapes `student` -> `teacher`."""
    student, teacher = tuple(student), tuple(teacher)
    return ADAPTERS.get(name)(
        student, teacher,
        student_layout or infer_layout(student),
        teacher_layout or infer_layout(teacher),
    )
