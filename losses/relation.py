"""Losses on relations between samples of a batch."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from featkd.errors import ConfigError
from featkd.losses.base import LOSSES, Example, FeaturePairLoss, full_precision

ANGLE_BLOCK_ELEMENTS = 1 << 20  # elements of one (anchors, B, B) block in the chunked angle (4 MB in fp32)


def centered_gram(x: torch.Tensor) -> torch.Tensor:
    """Gram matrix of the rows of x after subtracting their mean.

    Distances and angles are translation-invariant, and centering keeps the Gram-matrix
    differences below from cancelling catastrophically when embeddings share a large offset.
    """
    x = full_precision(x.flatten(1))
    x = x - x.mean(0, keepdim=True)
    return x @ x.t()


def pairwise_distances(gram: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """||x_i - x_j|| from the Gram matrix; exactly zero on the diagonal."""
    sq = gram.diagonal()
    d2 = sq[:, None] + sq[None, :] - 2 * gram
    eye = torch.eye(len(gram), dtype=torch.bool, device=gram.device)
    return torch.where(eye, torch.zeros_like(d2), d2.clamp_min(eps).sqrt())


def rkd_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 between mean-normalized pairwise distance matrices (B x B, diagonal included)."""
    with torch.no_grad():
        d_t = pairwise_distances(centered_gram(teacher))
        d_t = d_t / _off_diagonal_mean(d_t)
    d_s = pairwise_distances(centered_gram(student))
    d_s = d_s / _off_diagonal_mean(d_s)
    return F.smooth_l1_loss(d_s, d_t)


def _off_diagonal_mean(d: torch.Tensor) -> torch.Tensor:
    n = len(d)
    return (d.sum() / (n * (n - 1))).clamp_min(1e-12)


def _angle_block(gram: torch.Tensor, anchors: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """cos of the angle at each anchor j between x_i - x_j and x_k - x_j: (anchors, B, B).

    <x_i - x_j, x_k - x_j> = G_ik - G_ji - G_jk + G_jj, and |x_i - x_j|^2 = G_ii - 2 G_ji + G_jj,
    so only the Gram matrix is needed. Terms with i = j or k = j are 0, as for a normalized
    zero vector in the direct form.
    """
    sq = gram.diagonal()
    g_anchor = gram[anchors]  # (c, B): G_ji
    sq_anchor = sq[anchors][:, None]  # (c, 1): G_jj
    d2 = (sq[None, :] - 2 * g_anchor + sq_anchor).clamp_min(eps)
    inv = d2.rsqrt()
    same = anchors[:, None] == torch.arange(len(gram), device=gram.device)[None, :]
    inv = inv.masked_fill(same, 0.0)
    dots = gram[None] - g_anchor[:, :, None] - g_anchor[:, None, :] + sq_anchor[:, :, None]
    return dots * inv[:, :, None] * inv[:, None, :]


def _angle_block_loss(g_s: torch.Tensor, g_t: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        cos_t = _angle_block(g_t, anchors)
    return F.smooth_l1_loss(_angle_block(g_s, anchors), cos_t, reduction="sum")


def rkd_angle(student: torch.Tensor, teacher: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """Smooth-L1 between triplet angle cosines, averaged over all B^3 (j, i, k) triples.

    Computed from B x B Gram matrices in chunks of anchors, never materialising the
    B x B x D difference tensor; chunks are recomputed in backward, so memory stays at one
    (chunk, B, B) block instead of B^3.
    """
    g_s, g_t = centered_gram(student), centered_gram(teacher.detach())
    n = len(g_s)
    chunk = chunk_size or max(1, ANGLE_BLOCK_ELEMENTS // (n * n))
    total = g_s.new_zeros(())
    starts = range(0, n, chunk)
    recompute = torch.is_grad_enabled() and g_s.requires_grad and len(starts) > 1
    for start in starts:
        anchors = torch.arange(start, min(start + chunk, n), device=g_s.device)
        if recompute:
            total = total + checkpoint(_angle_block_loss, g_s, g_t, anchors, use_reentrant=False)
        else:
            total = total + _angle_block_loss(g_s, g_t, anchors)
    return total / n**3


@LOSSES.register("rkd")
class RKDLoss(FeaturePairLoss):
    """Relational KD (Park et al. 2019): match distances and angles between embeddings.

    L = w_d * smoothL1(psi_D(s), psi_D(t)) + w_a * smoothL1(psi_A(s), psi_A(t)), with
    psi_D = ||e_i - e_j|| / mean distance and psi_A = cos of the angle at e_j of (e_i, e_k).
    Embeddings of any dimension (no adapter needed); invariant to scaling either side.
    """

    relational = True
    example = Example("fc:in", "fc:in")
    default_weight = 1.0

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0, chunk_size: int | None = None) -> None:
        super().__init__()
        if distance_weight < 0 or angle_weight < 0:
            raise ConfigError("rkd: distance_weight and angle_weight must be >= 0.")
        self.distance_weight = distance_weight
        self.angle_weight = angle_weight
        self.chunk_size = chunk_size

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> dict[str, torch.Tensor]:
        parts: dict[str, torch.Tensor] = {}
        if len(student) < 2:  # no pairs in a batch of one
            return {"distance": student.sum() * 0.0}
        if self.distance_weight:
            parts["distance"] = self.distance_weight * rkd_distance(student, teacher)
        if self.angle_weight:
            parts["angle"] = self.angle_weight * rkd_angle(student, teacher, self.chunk_size)
        return parts

    def extra_repr(self) -> str:
        return f"distance_weight={self.distance_weight}, angle_weight={self.angle_weight}"


@LOSSES.register("sp")
class SimilarityPreserving(FeaturePairLoss):
    """Similarity-preserving KD (Tung & Mori 2019): match the batch's pairwise similarities.

    With F the (B, D) flattened features, G = row-normalize(F F^T);
    L = ||G_s - G_t||_F^2 / B^2, per layer pair. Any feature shapes (no adapter needed).
    """

    relational = True
    example = Example("layer3", "layer3")
    default_weight = 3000.0

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        def similarity(x: torch.Tensor) -> torch.Tensor:
            x = full_precision(x.flatten(1))
            return F.normalize(x @ x.t(), dim=1)

        with torch.no_grad():
            g_t = similarity(teacher.detach())
        g_s = similarity(student)
        return (g_s - g_t).pow(2).sum() / len(g_s) ** 2


@LOSSES.register("cc")
class CorrelationCongruence(FeaturePairLoss):
    """Correlation congruence (Peng et al. 2019): match the correlation between embeddings.

    Embeddings are L2-normalized and compared with a Gaussian RBF kernel in its order-P Taylor
    form, k(x, y) = sum_{p=0..P} exp(-2 gamma) (2 gamma)^p / p! (x . y)^p;
    L = ||K_s - K_t||_F^2 / B^2.
    """

    relational = True
    example = Example("fc:in", "fc:in")
    default_weight = 0.02

    def __init__(self, gamma: float = 0.4, order: int = 2) -> None:
        super().__init__()
        if gamma <= 0 or order < 0:
            raise ConfigError(f"cc: gamma must be > 0 and order >= 0, got {gamma} and {order}.")
        self.gamma, self.order = gamma, order

    def correlation(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(full_precision(x.flatten(1)), dim=1)
        dots = x @ x.t()
        coefficients = [math.exp(-2 * self.gamma) * (2 * self.gamma) ** p / math.factorial(p) for p in range(self.order + 1)]
        out = torch.full_like(dots, coefficients[0])
        power = torch.ones_like(dots)
        for c in coefficients[1:]:
            power = power * dots
            out = out + c * power
        return out

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            k_t = self.correlation(teacher.detach())
        k_s = self.correlation(student)
        return (k_s - k_t).pow(2).sum() / len(k_s) ** 2


@LOSSES.register("pkt")
class ProbabilisticKT(FeaturePairLoss):
    """Probabilistic knowledge transfer (Passalis & Tefas 2018): match the distributions the
    embeddings induce over the batch.

    Cosine similarities mapped to [0, 1], (cos + 1) / 2, are normalized per row into
    conditional probabilities p_{j|i}; L = mean_{i,j} p^t_{j|i} log((p^t_{j|i} + eps) /
    (p^s_{j|i} + eps)), a KL divergence averaged over the B x B entries.
    """

    relational = True
    example = Example("fc:in", "fc:in")
    default_weight = 30000.0

    def __init__(self, eps: float = 1e-7) -> None:
        super().__init__()
        self.eps = eps

    @staticmethod
    def conditional(x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(full_precision(x.flatten(1)), dim=1)
        similarity = (x @ x.t() + 1.0) / 2.0
        return similarity / similarity.sum(1, keepdim=True)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            p_t = self.conditional(teacher.detach())
        p_s = self.conditional(student)
        return (p_t * torch.log((p_t + self.eps) / (p_s + self.eps))).mean()
