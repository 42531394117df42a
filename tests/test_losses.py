"""Each loss against an independent, straightforward implementation of its paper's formula."""

import itertools
import math

import numpy as np
import pytest
import torch

from featkd.errors import ConfigError
from featkd.losses import LOSSES, AttentionTransfer, CrossEntropy, FitNetHint, KDLoss, RKDLoss, rkd_angle


def softmax(values, temperature=1.0):
    exps = [math.exp(v / temperature) for v in values]
    return [e / sum(exps) for e in exps]


# -- KD ----------------------------------------------------------------------------------


def test_kd_matches_a_hand_computation():
    s = [[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]]
    t = [[3.0, 2.0, 1.0], [0.0, 0.0, 2.0]]
    temperature = 2.0
    expected = 0.0
    for s_row, t_row in zip(s, t):
        p_t, p_s = softmax(t_row, temperature), softmax(s_row, temperature)
        expected += sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s))
    expected = expected / len(s) * temperature**2
    value = KDLoss(temperature)(torch.tensor(s), torch.tensor(t))
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_kd_is_zero_for_identical_logits_and_positive_otherwise():
    logits = torch.randn(6, 10)
    assert KDLoss(4.0)(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-7)
    assert KDLoss(4.0)(logits, logits + torch.randn(6, 10)).item() > 0


def test_kd_gradient_scale_keeps_t_squared():
    # for large T, T^2 * KL ~ mean squared logit difference / (2 C): the gradient does not vanish
    torch.manual_seed(0)
    s, t = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    s, t = s - s.mean(1, keepdim=True), t - t.mean(1, keepdim=True)
    approx = ((s - t) ** 2).sum(1).mean() / (2 * 5)
    assert KDLoss(100.0)(s, t).item() == pytest.approx(approx.item(), rel=1e-2)
    assert KDLoss(1000.0)(s, t).item() == pytest.approx(approx.item(), rel=1e-3)


def test_kd_ensemble_averages_softened_probabilities():
    torch.manual_seed(0)
    s, t1, t2 = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    temperature = 3.0
    p = (torch.softmax(t1 / temperature, 1) + torch.softmax(t2 / temperature, 1)) / 2
    log_q = torch.log_softmax(s / temperature, 1)
    expected = (p * (p.log() - log_q)).sum(1).mean() * temperature**2
    torch.testing.assert_close(KDLoss(temperature)(s, (t1, t2)), expected)
    # an ensemble of one teacher twice is that teacher
    torch.testing.assert_close(KDLoss(temperature)(s, (t1, t1)), KDLoss(temperature)(s, t1))


def test_kd_gradient_reaches_the_student_never_the_teacher():
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 4, requires_grad=True)
    KDLoss()(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_kd_rejects_a_non_positive_temperature():
    with pytest.raises(ConfigError, match="temperature"):
        KDLoss(0.0)


def test_cross_entropy_matches_the_definition():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    expected = -math.log(softmax([2.0, 0.0, -1.0])[0])
    assert CrossEntropy()(logits, None, torch.tensor([0])).item() == pytest.approx(expected, rel=1e-6)


# -- FitNets -----------------------------------------------------------------------------


def test_fitnet_is_the_mean_squared_error():
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    expected = sum((a - b) ** 2 for a, b in zip(s.flatten().tolist(), t.flatten().tolist())) / s.numel()
    assert FitNetHint()(s, t).item() == pytest.approx(expected, rel=1e-5)
    assert FitNetHint()(t, t).item() == 0.0


# -- attention transfer ------------------------------------------------------------------


def attention_reference(feature: np.ndarray, p: float = 2.0) -> np.ndarray:
    """Per sample: q = mean_c |f_c|^p over positions, divided by its L2 norm."""
    out = []
    for sample in feature:
        q = (np.abs(sample) ** p).mean(axis=0).reshape(-1)
        out.append(q / np.linalg.norm(q))
    return np.stack(out)


def test_attention_transfer_matches_the_formula():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(3, 5, 4, 4)), rng.normal(size=(3, 7, 4, 4))
    expected = ((attention_reference(s) - attention_reference(t)) ** 2).mean()
    value = AttentionTransfer()(torch.tensor(s, dtype=torch.float32), torch.tensor(t, dtype=torch.float32))
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_attention_transfer_pools_the_larger_map_to_the_smaller():
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=(2, 3, 8, 8)), rng.normal(size=(2, 4, 4, 4))
    s_pooled = s.reshape(2, 3, 4, 2, 4, 2).mean(axis=(3, 5))
    expected = ((attention_reference(s_pooled) - attention_reference(t)) ** 2).mean()
    value = AttentionTransfer()(torch.tensor(s, dtype=torch.float32), torch.tensor(t, dtype=torch.float32))
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_attention_transfer_invariances():
    torch.manual_seed(0)
    s, t = torch.randn(4, 6, 5, 5), torch.randn(4, 3, 5, 5)
    at = AttentionTransfer()
    base = at(s, t)
    torch.testing.assert_close(at(s[:, torch.randperm(6)], t), base)  # channel order
    torch.testing.assert_close(at(3.0 * s, t), base)  # scale of the map
    assert at(t, t).item() == pytest.approx(0.0, abs=1e-9)


def test_attention_transfer_gradients_and_bad_shapes():
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.randn(2, 3, 4, 4, requires_grad=True)
    AttentionTransfer()(s, t).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None
    with pytest.raises(ConfigError, match="conv maps"):
        AttentionTransfer().bind([(16,)], [(32,)])


# -- RKD ---------------------------------------------------------------------------------


def huber(a: float, b: float) -> float:
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


def rkd_reference(s: np.ndarray, t: np.ndarray) -> tuple[float, float]:
    """RKD distance and angle losses by explicit loops over pairs and triplets."""
    n = len(s)

    def distances(x):
        d = np.array([[np.linalg.norm(x[i] - x[j]) for j in range(n)] for i in range(n)])
        return d / (d.sum() / (n * (n - 1)))

    ds, dt = distances(s), distances(t)
    distance = sum(huber(ds[i, j], dt[i, j]) for i in range(n) for j in range(n)) / n**2

    def cosine(x, i, j, k):
        if i == j or k == j:
            return 0.0
        a, b = x[i] - x[j], x[k] - x[j]
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    angle = sum(huber(cosine(s, i, j, k), cosine(t, i, j, k)) for i, j, k in itertools.product(range(n), repeat=3))
    return distance, angle / n**3


def test_rkd_matches_the_formula_on_small_embeddings():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(6, 4)), rng.normal(size=(6, 9)) * 2
    distance, angle = rkd_reference(s, t)
    parts = RKDLoss(distance_weight=25, angle_weight=50)(torch.tensor(s, dtype=torch.float32),
                                                         torch.tensor(t, dtype=torch.float32))
    assert parts["distance"].item() == pytest.approx(25 * distance, rel=1e-5)
    assert parts["angle"].item() == pytest.approx(50 * angle, rel=1e-5)


def test_rkd_angle_in_chunks_equals_the_naive_form():
    torch.manual_seed(0)
    s, t = torch.randn(40, 16) + 5.0, torch.randn(40, 32)

    def naive(x):
        e = torch.nn.functional.normalize(x.unsqueeze(0) - x.unsqueeze(1), dim=2)
        return torch.bmm(e, e.transpose(1, 2))

    expected = torch.nn.functional.smooth_l1_loss(naive(s), naive(t))
    for chunk in (None, 1, 7, 40):
        torch.testing.assert_close(rkd_angle(s, t, chunk), expected, atol=1e-6, rtol=1e-5)
    s1 = s.clone().requires_grad_()
    s2 = s.clone().requires_grad_()
    rkd_angle(s1, t, 7).backward()  # chunks recomputed in backward
    torch.nn.functional.smooth_l1_loss(naive(s2), naive(t)).backward()
    torch.testing.assert_close(s1.grad, s2.grad, atol=1e-7, rtol=1e-4)


def test_rkd_is_invariant_to_scale_and_shift_and_zero_for_a_scaled_copy():
    torch.manual_seed(0)
    s, t = torch.randn(8, 5), torch.randn(8, 12)
    rkd = RKDLoss()
    base = rkd(s, t)
    moved = rkd(3.7 * s + 2.0, t)
    for key in base:
        torch.testing.assert_close(moved[key], base[key], rtol=1e-4, atol=1e-6)
    same = rkd(0.5 * t + 1.0, t)
    assert all(v.item() == pytest.approx(0.0, abs=1e-5) for v in same.values())


def test_rkd_gradients_reach_the_student_only_and_a_batch_of_one_is_zero():
    s = torch.randn(6, 4, requires_grad=True)
    t = torch.randn(6, 4, requires_grad=True)
    sum(RKDLoss()(s, t).values()).backward()
    assert s.grad.abs().sum() > 0 and torch.isfinite(s.grad).all()
    assert t.grad is None
    single = RKDLoss()(torch.randn(1, 4, requires_grad=True), torch.randn(1, 4))
    assert sum(single.values()).item() == 0.0


def test_every_loss_is_registered_with_a_description():
    for name in ["ce", "kd", "fitnet", "at", "rkd"]:
        assert name in LOSSES
        assert LOSSES.describe(name)


def test_rkd_angle_is_exact_at_benchmark_like_sizes():
    torch.manual_seed(1)
    s, t = torch.randn(128, 256), torch.randn(128, 512)

    def naive(x):
        e = torch.nn.functional.normalize(x.unsqueeze(0) - x.unsqueeze(1), dim=2)
        return torch.bmm(e, e.transpose(1, 2))

    expected = torch.nn.functional.smooth_l1_loss(naive(s), naive(t))
    assert abs(rkd_angle(s, t).item() - expected.item()) < 1e-5
