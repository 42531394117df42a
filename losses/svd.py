"""Distillation through singular value decomposition of feature maps, with a backward pass
through the decomposition that stays finite when singular values are close or repeated."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from featkd.errors import ConfigError
from featkd.losses.base import LOSSES, Example, FeatureSetLoss, Shape, full_precision

__all__ = ["KDSVD", "align", "as_matrix", "rbf_relation", "relation_gap", "singular_pairs",
           "top_right_singular_vectors"]


def as_matrix(feature: torch.Tensor) -> torch.Tensor:
    """A feature as one matrix per sample, positions by channels: (B, C, H, W) -> (B, HW, C),
    (B, C, L) -> (B, L, C), an embedding (B, C) -> (B, 1, C)."""
    return feature[:, None, :] if feature.dim() == 2 else feature.flatten(2).transpose(1, 2)


def _smooth_inverse(d: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """d / (d^2 + floor^2): 1 / d where |d| >> floor, bounded by 1 / (2 floor), 0 at d = 0."""
    return d / (d * d + floor * floor + torch.finfo(d.dtype).tiny)


def singular_pairs(x: torch.Tensor, tol: float = 1e-7) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, V): the singular values of each (M, D) matrix of x (B, M, D), descending, and the
    right singular vectors of the nonzero ones, from the eigendecomposition of the smaller
    Gram matrix (X^T X, D x D, or X X^T, M x M, with V = X^T U / s): far cheaper than an SVD of
    the tall or wide matrix itself. Computed in x's dtype (float64 for KDSVD: the Gram squares
    the condition number). With D > M, the vectors of values below `tol` s_1 are zero columns:
    their directions are not defined by X (the backward treats them as outside its row space)."""
    rows, cols = x.shape[-2:]
    if cols <= rows:
        values, v = torch.linalg.eigh(x.transpose(-2, -1) @ x)
        return values.flip(-1).clamp_min(0).sqrt(), v.flip(-1)
    values, u = torch.linalg.eigh(x @ x.transpose(-2, -1))
    s, u = values.flip(-1).clamp_min(0).sqrt(), u.flip(-1)
    kept = s > tol * s[..., :1]
    v = (x.transpose(-2, -1) @ u) / torch.where(kept, s, torch.ones_like(s))[..., None, :]
    return s, v * kept[..., None, :]


class _TopRightSingularVectors(torch.autograd.Function):
    """The right singular vectors of the k largest singular values of each (M, D) matrix,
    with the analytic backward restricted to them.

    With X = U S V^T (thin, r = min(M, D) values), a kept right vector moves by
    dv_i = sum_{j != i} v_j [s_i u_i^T dX v_j + s_j u_j^T dX v_i] / (s_i^2 - s_j^2)
           + (I - V V^T) dX^T u_i / s_i.
    Only gaps between a kept value and the others enter, so a degenerate tail (repeated or
    zero singular values, common after a ReLU) costs nothing, where a full SVD backward
    divides 0 by 0 there. Each 1 / gap is taken as gap / (gap^2 + (eps s_1^2)^2), and 1 / s_i^2
    likewise, so a near tie with a kept value gives a bounded gradient instead of an
    exploding one (a vector whose value is tied has no defined direction to follow). Since
    u_j s_j = X v_j, the gradient needs X, s and V only: no left vectors are formed.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, k: int, eps: float) -> torch.Tensor:  # type: ignore[override]
        s, v = singular_pairs(x)
        ctx.save_for_backward(x, s, v)
        ctx.k, ctx.eps = k, eps
        return v[..., :k]

    @staticmethod
    def backward(ctx, grad_v: torch.Tensor):  # type: ignore[override]
        x, s, v = ctx.saved_tensors
        k, eps = ctx.k, ctx.eps
        s_k, v_k = s[..., :k], v[..., :k]
        scale = s[..., :1, None] ** 2  # (B, 1, 1): the largest squared singular value
        gap = s_k[..., None, :] ** 2 - s[..., :, None] ** 2  # (B, r, k): s_i^2 - s_j^2 at [j, i]
        phi = (v.transpose(-2, -1) @ grad_v) * _smooth_inverse(gap, eps * scale)  # zero at j = i
        xv = x @ v  # U S, so that no left vectors are formed
        xv_k = xv[..., :k]
        # the part of dv outside the span of V (D > M, or values too small to define a vector):
        # (I - V V^T) dX^T u_i / s_i, with u_i / s_i = X v_i / s_i^2 (bounded as 1 / s_i^2)
        outside = grad_v - v @ (v.transpose(-2, -1) @ grad_v)
        inv_s2 = _smooth_inverse(s_k ** 2, eps * scale[..., 0])
        # U_k S_k phi^T V^T + U S phi V_k^T + outside, each (M, D) without a (D, D) product
        grad_x = (xv_k @ phi.transpose(-2, -1)) @ v.transpose(-2, -1)
        grad_x = grad_x + (xv @ phi) @ v_k.transpose(-2, -1) + (xv_k * inv_s2[..., None, :]) @ outside.transpose(-2, -1)
        return grad_x, None, None


def top_right_singular_vectors(x: torch.Tensor, k: int, eps: float = 1e-4) -> torch.Tensor:
    """(B, D, k): the right singular vectors of the k largest singular values of each (M, D)
    matrix of x (B, M, D), computed in float64; gradients as in `_TopRightSingularVectors`."""
    dtype = x.dtype
    return _TopRightSingularVectors.apply(x.double(), k, eps).to(dtype)


def _canonical_sign(v: torch.Tensor) -> torch.Tensor:
    """Each column turned so that its entries sum to >= 0 (its largest entry positive when
    they sum to 0): a fixed sign whatever the SVD routine returned."""
    total = v.sum(-2, keepdim=True)
    largest = v.gather(-2, v.abs().argmax(-2, keepdim=True))
    sign = torch.where(total != 0, total.sign(), largest.sign())
    return v * torch.where(sign == 0, torch.ones_like(sign), sign)


def align(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """For each teacher vector (column of (B, D, k)), the student candidate (column of
    (B, D, k')) of largest |cosine| with it, turned to a positive cosine: (B, D, k)."""
    cosine = student.transpose(-2, -1) @ teacher  # (B, k', k)
    index = cosine.abs().argmax(-2, keepdim=True)  # (B, 1, k)
    sign = cosine.gather(-2, index).sign()
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return student.gather(-1, index.expand(-1, student.shape[-2], -1)) * sign


def rbf_relation(lower: torch.Tensor, upper: torch.Tensor, sigma: float) -> torch.Tensor:
    """exp(-(a_m - b_n)^2 / sigma) between every entry a_m of a vector of one layer and b_n of
    the same vector of the next: (B, D_l, D_l+1, k) from (B, D_l, k) and (B, D_l+1, k)."""
    return torch.exp(-(lower[:, :, None, :] - upper[:, None, :, :]).pow(2) / sigma)


#: entries of the relation computed at once by `relation_gap` (its memory, whatever the layers)
RELATION_CHUNK = 1 << 21


class _RelationGap(torch.autograd.Function):
    """sum over samples, m, n, j of (G_s[m, n, j] - G_t[m, n, j])^2 for the `rbf_relation`s
    G_s of (a, b) and G_t of (c, d), in chunks of rows m, with the gradients for a and b
    computed in the same pass: no (B, D_l, D_l+1, k) tensor is kept for the backward.

    Per vector j, -(a_m - b_n)^2 / sigma is one batched product of 3-column matrices,
    [2a, 1, -a^2] [b, -b^2, 1]^T on entries scaled by 1 / sqrt(sigma), so that each relation
    costs a product and an exp. With w = (G_s - G_t) G_s, dL/da_m = -4/sigma (a_m sum_n w_mn -
    sum_n w_mn b_n) and dL/db_n = 4/sigma (sum_m w_mn a_m - b_n sum_m w_mn): products again."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor,  # type: ignore[override]
                sigma: float) -> torch.Tensor:
        grad_a, grad_b = torch.zeros_like(a), torch.zeros_like(b)
        total = a.new_zeros((), dtype=torch.float64)
        rows = max(1, RELATION_CHUNK // max(1, a.shape[0] * b.shape[1]))
        scale = sigma ** -0.5
        for j in range(a.shape[-1]):
            a_j, b_j = a[..., j], b[..., j]
            left_s, right_s = _negative_square_gap_factors(a_j * scale, b_j * scale)
            left_t, right_t = _negative_square_gap_factors(c[..., j] * scale, d[..., j] * scale)
            for start in range(0, a.shape[1], rows):
                part = slice(start, start + rows)
                g = torch.bmm(left_s[:, part], right_s).exp_()
                diff = torch.sub(g, torch.bmm(left_t[:, part], right_t).exp_())
                total = total + torch.dot(diff.flatten(), diff.flatten()).double()
                w = diff.mul_(g)
                grad_a[:, part, j] = (-4.0 / sigma) * (a_j[:, part] * w.sum(2) - torch.bmm(w, b_j[..., None])[..., 0])
                grad_b[..., j] += (4.0 / sigma) * (torch.bmm(w.transpose(1, 2), a_j[:, part, None])[..., 0]
                                                   - b_j * w.sum(1))
        ctx.save_for_backward(grad_a, grad_b)
        return total.to(a.dtype)

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):  # type: ignore[override]
        grad_a, grad_b = ctx.saved_tensors
        return grad_a * grad_total, grad_b * grad_total, None, None, None


def _negative_square_gap_factors(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R) with L R = -(a_m - b_n)^2 for (B, m) and (B, n) entries: L (B, m, 3), R (B, 3, n)."""
    ones_a, ones_b = torch.ones_like(a), torch.ones_like(b)
    return torch.stack([2 * a, ones_a, -a * a], -1), torch.stack([b, -b * b, ones_b], 1)


def relation_gap(lower_s: torch.Tensor, upper_s: torch.Tensor, lower_t: torch.Tensor, upper_t: torch.Tensor,
                 sigma: float) -> torch.Tensor:
    """sum ((rbf_relation(lower_s, upper_s) - rbf_relation(lower_t, upper_t))^2), the teacher's
    side without gradient, without forming the relations as autograd tensors."""
    return _RelationGap.apply(lower_s, upper_s, lower_t.detach(), upper_t.detach(), sigma)


@LOSSES.register("kdsvd")
class KDSVD(FeatureSetLoss):
    """Self-supervised knowledge distillation using singular value decomposition (Lee, Kim &
    Song, ECCV 2018): relations between the dominant singular vectors of consecutive layers.

    Each map is a matrix per sample, positions by channels (HW x C), and its truncated SVD
    keeps the right singular vectors (channel space) of the k largest singular values: k for
    the teacher, k + `candidates` for the student, from which each teacher vector takes the
    one of largest |cosine|, turned to a positive cosine (the SVD's sign and order
    ambiguity). Both sides' vectors are scaled by the teacher's k singular values normalised
    to unit length. For consecutive layers l, l + 1 the relation is the radial basis function
    G[m, n, j] = exp(-(v_l[m, j] - v_l+1[n, j])^2 / sigma) between the entries of the j-th
    vectors, and L = sum_l sum_{m, n, j} (G_s - G_t)^2 / B (summed over samples and averaged,
    as mdistiller does; the paper's code sums). Channel counts must match layer by layer (set
    adapter `auto` otherwise); spatial sizes need not. k = 1, 3 candidates, sigma = 8 and
    weight 1 follow the reference implementations.

    The teacher's vectors get a fixed sign (entries summing to >= 0) rather than the SVD
    routine's arbitrary one, which the references keep although the relation between two
    layers depends on their relative sign. Gradients go through the decomposition in
    float64, with only the kept vectors' terms and every 1 / (s_i^2 - s_j^2) bounded (`eps`,
    relative to the largest s^2; `top_right_singular_vectors`), so close or repeated
    singular values give finite gradients. The paper's code replaces non-finite values by
    zeros and clips the distillation gradient by the norm of the task loss's gradient, per
    variable; that clipping is not reproduced here.
    """

    example = Example("layer*", "layer*", adapter="auto")
    default_weight = 1.0

    def __init__(self, k: int = 1, candidates: int = 3, sigma: float = 8.0, eps: float = 1e-4) -> None:
        super().__init__()
        if not isinstance(k, int) or k < 1:
            raise ConfigError(f"kdsvd: k is the number of singular vectors kept per layer, an integer >= 1; "
                              f"got {k!r}.")
        if not isinstance(candidates, int) or candidates < 0:
            raise ConfigError(f"kdsvd: candidates is how many more student vectors than k to match from, an integer "
                              f">= 0; got {candidates!r}.")
        if not sigma > 0 or not math.isfinite(sigma):
            raise ConfigError(f"kdsvd: sigma, the width of the radial basis function, must be > 0; got {sigma}.")
        if not 0 < eps < 1:
            raise ConfigError(f"kdsvd: eps, the smallest gap between squared singular values relative to the "
                              f"largest, must be in (0, 1); got {eps}.")
        self.k, self.candidates, self.sigma, self.eps = k, candidates, sigma, eps

    def bind(self, student_shapes: Sequence[Shape], teacher_shapes: Sequence[Shape]) -> None:
        if len(teacher_shapes) < 2:
            raise ConfigError("kdsvd: relates consecutive layers, so it needs at least two feature pairs "
                              "(e.g. student: 'layer*', teacher: 'layer*').")
        for i, (s, t) in enumerate(zip(student_shapes, teacher_shapes)):
            if not 1 <= len(t) <= 3 or not 1 <= len(s) <= 3:
                raise ConfigError(f"kdsvd: pair {i} has student {tuple(s)} and teacher {tuple(t)}; capture conv maps "
                                  "(C, H, W) or (C, L), or embeddings (C,).")
            if s[0] != t[0]:
                raise ConfigError(
                    f"kdsvd: pair {i} has {s[0]} student channels but {t[0]} teacher channels, and the singular "
                    "vectors compared live in channel space. Set `adapter: auto` on the term to project the "
                    "student's features to the teacher's channels, or pick layers with equal channel counts."
                )
            rank = min(math.prod(s[1:]), s[0]), min(math.prod(t[1:]), t[0])
            if min(rank) < self.k:
                raise ConfigError(f"kdsvd: pair {i} (student {tuple(s)}, teacher {tuple(t)}) has matrices of rank at "
                                  f"most {min(rank)} (positions x channels), fewer than k={self.k} singular vectors; "
                                  "lower k or capture larger maps.")

    def vectors(self, student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(student, teacher) right singular vectors of one layer pair, aligned and scaled: (B, C, k) each."""
        with torch.no_grad():
            s_t, v_t = singular_pairs(as_matrix(teacher.detach()).double())
            v_t = _canonical_sign(v_t[..., : self.k])
            weight = torch.nn.functional.normalize(s_t[..., : self.k], dim=-1)[..., None, :]
        x = as_matrix(student).double()
        v_s = top_right_singular_vectors(x, min(self.k + self.candidates, *x.shape[-2:]), self.eps)
        v_s = align(v_s, v_t)
        return v_s * weight, v_t * weight

    def forward(self, students: list[torch.Tensor], teachers: list[torch.Tensor]) -> torch.Tensor:
        if len(students) < 2:
            raise ConfigError("kdsvd: needs at least two feature pairs (it relates consecutive layers).")
        dtype = full_precision(students[0]).dtype
        total = students[0].new_zeros((), dtype=dtype)
        below = None
        for s, t in zip(students, teachers):
            # the decomposition in float64, the relations (entries in [0, 1]) in the student's precision
            pair = tuple(v.to(dtype) for v in self.vectors(full_precision(s), full_precision(t)))
            if below is not None:
                total = total + relation_gap(below[0], pair[0], below[1], pair[1], self.sigma) / len(s)
            below = pair
        return total

    def extra_repr(self) -> str:
        return f"k={self.k}, candidates={self.candidates}, sigma={self.sigma}, eps={self.eps}"
