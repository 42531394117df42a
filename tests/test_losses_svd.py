"""KDSVD against a written-out version of the paper's pipeline (truncated SVD, alignment,
radial-basis relations between layers), its invariances and minimum, and the SVD's backward
pass: exact where the decomposition is well defined, finite where a plain one is not."""

import math

import numpy as np
import pytest
import torch

from featkd.errors import ConfigError
from featkd.losses.svd import KDSVD, as_matrix, top_right_singular_vectors


def t64(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64)


def kdsvd_reference(students, teachers, k, candidates, sigma):
    """Sample by sample, layer by layer, entry by entry."""
    batch = len(students[0])
    total = 0.0
    for b in range(batch):
        below = None
        for s, t in zip(students, teachers):
            x_s = s[b].reshape(s.shape[1], -1).T  # positions x channels
            x_t = t[b].reshape(t.shape[1], -1).T
            _, sv_t, vh_t = np.linalg.svd(x_t, full_matrices=False)
            _, _, vh_s = np.linalg.svd(x_s, full_matrices=False)
            v_t = []
            for j in range(k):  # the teacher's vectors, each turned to sum >= 0
                v = vh_t[j]
                v_t.append(v if v.sum() >= 0 else -v)
            weights = sv_t[:k] / np.linalg.norm(sv_t[:k])
            cands = vh_s[: min(k + candidates, len(vh_s))]
            v_s = []
            for j in range(k):  # the student candidate most parallel to teacher vector j
                cos = [c @ v_t[j] for c in cands]
                best = int(np.argmax(np.abs(cos)))
                v_s.append(cands[best] * np.sign(cos[best]))
            pair = ([w * v for w, v in zip(weights, v_s)], [w * v for w, v in zip(weights, v_t)])
            if below is not None:
                for j in range(k):
                    for m in range(len(below[0][j])):
                        for n in range(len(pair[0][j])):
                            g_s = math.exp(-((below[0][j][m] - pair[0][j][n]) ** 2) / sigma)
                            g_t = math.exp(-((below[1][j][m] - pair[1][j][n]) ** 2) / sigma)
                            total += (g_s - g_t) ** 2
            below = pair
    return total / batch


def maps(rng, batch=3, shapes=((4, 3, 3), (5, 2, 2), (3, 2, 3))):
    return [rng.normal(size=(batch, *sh)) for sh in shapes]


@pytest.mark.parametrize("k,candidates", [(1, 3), (2, 1), (2, 0)])
def test_kdsvd_matches_the_written_out_pipeline(k, candidates):
    rng = np.random.default_rng(0)
    s, t = maps(rng), maps(rng)
    loss = KDSVD(k=k, candidates=candidates, sigma=8.0)
    loss.bind([x.shape[1:] for x in s], [x.shape[1:] for x in t])
    value = loss([t64(x) for x in s], [t64(x) for x in t])
    assert value.item() == pytest.approx(kdsvd_reference(s, t, k, candidates, 8.0), rel=1e-9)
    assert value.item() > 0


def test_kdsvd_spatial_sizes_may_differ_channels_may_not():
    rng = np.random.default_rng(1)
    s = maps(rng, shapes=((4, 2, 2), (5, 3, 1)))
    t = maps(rng, shapes=((4, 3, 3), (5, 2, 2)))
    value = KDSVD(sigma=2.0)([t64(x) for x in s], [t64(x) for x in t])
    assert value.item() == pytest.approx(kdsvd_reference(s, t, 1, 3, 2.0), rel=1e-9)


def test_kdsvd_invariances_and_minimum():
    rng = np.random.default_rng(2)
    s, t = [t64(x) for x in maps(rng)], [t64(x) for x in maps(rng)]
    loss = KDSVD(k=2)
    base = loss(s, t).item()
    assert loss(t, t).item() == pytest.approx(0.0, abs=1e-20)  # the teacher itself
    assert loss([3.0 * x for x in s], t).item() == pytest.approx(base, rel=1e-9)  # scale of either side
    assert loss(s, [0.2 * x for x in t]).item() == pytest.approx(base, rel=1e-9)
    assert loss([-s[0], s[1], -s[2]], t).item() == pytest.approx(base, rel=1e-9)  # the student's sign
    assert loss(s, [t[0], -t[1], t[2]]).item() == pytest.approx(base, rel=1e-9)  # the teacher's sign
    perm = torch.randperm(9)
    shuffled = s[0].flatten(2)[:, :, perm].view_as(s[0])  # positions are rows: their order is irrelevant
    assert loss([shuffled, s[1], s[2]], t).item() == pytest.approx(base, rel=1e-9)
    channels = torch.randperm(4)  # channel order is what the vectors encode
    assert loss([s[0][:, channels], s[1], s[2]], t).item() != pytest.approx(base, rel=1e-6)


def test_as_matrix_puts_positions_in_rows_and_channels_in_columns():
    x = torch.arange(2 * 3 * 2 * 2.0).view(2, 3, 2, 2)
    m = as_matrix(x)
    assert m.shape == (2, 4, 3) and m[1, 2, 0] == x[1, 0, 1, 0] and m[0, 3, 2] == x[0, 2, 1, 1]
    assert as_matrix(torch.ones(5, 7)).shape == (5, 1, 7)


# -- the backward pass through the SVD ------------------------------------------------------


def projector_loss(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (v.transpose(-2, -1) @ w).pow(2).sum()  # depends on v up to sign only


def finite_difference(f, x, h=1e-6):
    grad = torch.zeros_like(x)
    with torch.no_grad():
        for index in np.ndindex(*x.shape):
            e = torch.zeros_like(x)
            e[index] = h
            grad[index] = (f(x + e) - f(x - e)) / (2 * h)
    return grad


@pytest.mark.parametrize("shape", [(2, 6, 4), (2, 3, 5), (1, 1, 4)])
def test_svd_backward_is_the_exact_gradient_for_distinct_values(shape):
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(shape[-1], 2, dtype=torch.float64)
    for k in range(1, min(shape[1:]) + 1):
        def f(x):
            return projector_loss(top_right_singular_vectors(x, k, 1e-12), w)

        grad = torch.autograd.grad(f(x), x)[0]
        np.testing.assert_allclose(grad.numpy(), finite_difference(f, x.detach()).numpy(), rtol=1e-5, atol=1e-7)


def degenerate(name: str) -> torch.Tensor:
    x = torch.zeros(6, 4, dtype=torch.float64)
    if name == "repeated tail":  # values 3, 1, 1, 1
        q, _ = torch.linalg.qr(torch.tensor(np.random.default_rng(3).normal(size=(6, 6))))
        x = q[:, :4] * torch.tensor([3.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    elif name == "dead channels":  # a ReLU map with two channels never on: values a, b, 0, 0
        x[:, :2] = torch.tensor(np.maximum(np.random.default_rng(4).normal(size=(6, 2)), 0) + 0.1)
    return x


@pytest.mark.parametrize("name", ["repeated tail", "dead channels"])
def test_svd_backward_is_finite_and_right_where_a_full_svd_backward_is_not(name):
    x = degenerate(name).requires_grad_()
    w = torch.tensor([[0.3], [-1.0], [0.5], [2.0]], dtype=torch.float64)

    def ours(x):
        return projector_loss(top_right_singular_vectors(x, 1, 1e-4), w)

    def plain(x):
        return projector_loss(torch.linalg.svd(x, full_matrices=False)[2][:1].T, w)

    assert not torch.autograd.grad(plain(x), x)[0].isfinite().all()  # 0 / 0 between tied unused values
    grad = torch.autograd.grad(ours(x), x)[0]
    assert grad.isfinite().all() and grad.abs().sum() > 0
    # the leading value is simple, so its vector's gradient is well defined: finite differences
    np.testing.assert_allclose(grad.numpy(), finite_difference(ours, x.detach()).numpy(), rtol=1e-5, atol=1e-7)


def test_svd_backward_stays_bounded_at_a_near_tie_of_a_kept_value():
    q, _ = torch.linalg.qr(torch.tensor(np.random.default_rng(5).normal(size=(5, 5))))
    x = (q[:, :3] * torch.tensor([2.0 + 1e-10, 2.0, 0.5], dtype=torch.float64)).requires_grad_()
    w = torch.tensor([[1.0], [1.0], [0.0]], dtype=torch.float64)
    grad = torch.autograd.grad(projector_loss(top_right_singular_vectors(x, 1, 1e-4), w), x)[0]
    plain = torch.autograd.grad(projector_loss(torch.linalg.svd(x, full_matrices=False)[2][:1].T, w), x)[0]
    assert grad.isfinite().all() and grad.norm() < 1e5  # about 1 / (eps s_1^2); the plain one is ~1e10
    assert not plain.isfinite().all() or plain.norm() > 1e8


def test_kdsvd_gradients_reach_the_student_never_the_teacher_even_on_relu_maps():
    rng = np.random.default_rng(6)
    s = [t64(np.maximum(x, 0)).requires_grad_() for x in maps(rng)]
    with torch.no_grad():
        s[0][:, 1] = 0.0  # a dead channel: repeated zero singular values
    t = [t64(np.maximum(x, 0)).requires_grad_() for x in maps(rng)]
    KDSVD()(s, t).backward()
    assert all(x.grad is not None and x.grad.isfinite().all() and x.grad.abs().sum() > 0 for x in s)
    assert all(x.grad is None for x in t)


@pytest.mark.parametrize("chunk", [1 << 21, 7])  # all rows at once, and a few rows per chunk
def test_relation_gap_is_the_squared_gap_of_the_rbf_relations_with_their_gradients(chunk, monkeypatch):
    from featkd.losses import svd

    monkeypatch.setattr(svd, "RELATION_CHUNK", chunk)
    torch.manual_seed(0)
    a, b = torch.randn(3, 5, 2, dtype=torch.float64, requires_grad=True), torch.randn(3, 4, 2, dtype=torch.float64,
                                                                                       requires_grad=True)
    c, d = torch.randn(3, 5, 2, dtype=torch.float64), torch.randn(3, 4, 2, dtype=torch.float64)
    fused = svd.relation_gap(a, b, c, d, 2.0)
    plain = (svd.rbf_relation(a, b, 2.0) - svd.rbf_relation(c, d, 2.0)).pow(2).sum()
    assert fused.item() == pytest.approx(plain.item(), rel=1e-12)
    grads = torch.autograd.grad(3.0 * fused, (a, b))
    expected = torch.autograd.grad(3.0 * plain, (a, b))
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-10, atol=1e-12)


def test_singular_pairs_are_the_svds_for_tall_and_wide_matrices():
    from featkd.losses.svd import singular_pairs

    torch.manual_seed(0)
    for shape in [(2, 9, 4), (2, 4, 9)]:
        x = torch.randn(*shape, dtype=torch.float64)
        s, v = singular_pairs(x)
        _, s_ref, vh = torch.linalg.svd(x, full_matrices=False)
        r = min(shape[1:])
        np.testing.assert_allclose(s[:, :r].numpy(), s_ref.numpy(), rtol=1e-10)
        np.testing.assert_allclose((v[:, :, :r] * vh.transpose(1, 2)).sum(1).abs().numpy(), 1.0, rtol=1e-9)


def test_top_right_singular_vectors_keeps_the_dtype_and_matches_the_svd():
    x = torch.randn(3, 5, 4)
    v = top_right_singular_vectors(x, 2)
    assert v.dtype == torch.float32 and v.shape == (3, 4, 2)
    reference = torch.linalg.svd(x.double(), full_matrices=False)[2][:, :2].transpose(1, 2)
    np.testing.assert_allclose((v.double() * reference).sum(1).abs().numpy(), 1.0, rtol=1e-5)


# -- set-up errors ------------------------------------------------------------------------------


def test_kdsvd_refuses_bad_settings_and_shapes():
    with pytest.raises(ConfigError, match="k is the number"):
        KDSVD(k=0)
    with pytest.raises(ConfigError, match="candidates"):
        KDSVD(candidates=-1)
    with pytest.raises(ConfigError, match="sigma"):
        KDSVD(sigma=0.0)
    with pytest.raises(ConfigError, match="eps"):
        KDSVD(eps=0.0)
    with pytest.raises(ConfigError, match="at least two feature pairs"):
        KDSVD().bind([(4, 2, 2)], [(4, 2, 2)])
    with pytest.raises(ConfigError, match="adapter: auto"):
        KDSVD().bind([(4, 2, 2), (8, 1, 1)], [(16, 2, 2), (8, 1, 1)])
    with pytest.raises(ConfigError, match="lower k"):
        KDSVD(k=2).bind([(4, 2, 2), (8, 1, 1)], [(4, 2, 2), (8, 1, 1)])
    with pytest.raises(ConfigError, match="capture conv maps"):
        KDSVD().bind([(4, 2, 2, 2), (8, 1, 1)], [(4, 2, 2, 2), (8, 1, 1)])
    with pytest.raises(ConfigError, match="at least two feature pairs"):
        KDSVD()([torch.randn(2, 4, 2, 2)], [torch.randn(2, 4, 2, 2)])
