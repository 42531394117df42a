"""Logit standardization (kd, dkd and dist with `standardize`), spherical KD and normalized KD, each against a written-out
implementation of its paper's formula, with the invariances it has, its minimum, where its
gradients go and the errors it gives."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from featkd.errors import ConfigError
from featkd.losses.base import standardize_logits
from featkd.losses.logit import DISTLoss, DKDLoss, KDLoss
from featkd.losses.logit_normalized import NormalizedKD, SphericalKD


def t64(a) -> torch.Tensor:
    return torch.tensor(np.asarray(a), dtype=torch.float64)


def softmax(z, temperature=1.0):
    e = np.exp((np.asarray(z) - np.max(z)) / temperature)
    return e / e.sum()


def zscore(z, eps=1e-7, ddof=1):
    """One row's z-score, written out: sum of squares over K - ddof."""
    k = len(z)
    mean = sum(z) / k
    std = (sum((v - mean) ** 2 for v in z) / (k - ddof)) ** 0.5
    return np.array([(v - mean) / (std + eps) for v in z])


def kl(p, q):
    return sum(a * np.log(a / b) for a, b in zip(p, q))


def draw(seed, shape=(5, 6), scale=3.0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=shape) * scale, rng.normal(size=shape) * scale


# -- the standardization -----------------------------------------------------------------


def test_standardize_logits_is_the_row_z_score_with_either_variance():
    z, _ = draw(0)
    for unbiased, ddof in ((True, 1), (False, 0)):
        out = standardize_logits(t64(z), eps=1e-7, unbiased=unbiased).numpy()
        np.testing.assert_allclose(out, [zscore(row, ddof=ddof) for row in z], rtol=1e-12)
    out = standardize_logits(t64(z))
    np.testing.assert_allclose(out.mean(1).numpy(), 0.0, atol=1e-12)
    np.testing.assert_allclose(out.std(1).numpy(), 1.0, atol=1e-6)  # unbiased by default


def test_standardize_logits_ignores_each_rows_scale_and_shift_and_works_on_tokens():
    z, _ = draw(1)
    a = np.random.default_rng(2).uniform(0.1, 10, size=(5, 1))
    b = np.random.default_rng(3).normal(size=(5, 1)) * 50
    moved = standardize_logits(t64(a * z + b), eps=0).numpy()
    np.testing.assert_allclose(moved, standardize_logits(t64(z), eps=0).numpy(), rtol=1e-9, atol=1e-12)
    tokens = torch.randn(2, 3, 7, dtype=torch.float64)  # (B, T, V): over the vocabulary
    np.testing.assert_allclose(standardize_logits(tokens)[1, 2].numpy(), standardize_logits(tokens[1, 2:3])[0].numpy(),
                               rtol=1e-12)
    assert standardize_logits(torch.randn(2, 4, dtype=torch.float16)).dtype == torch.float32


def test_standardize_logits_refuses_single_logits_and_negative_eps():
    with pytest.raises(ConfigError, match="at least 2 logits"):
        standardize_logits(torch.randn(4, 1))
    with pytest.raises(ConfigError, match="eps must be >= 0"):
        standardize_logits(torch.randn(4, 3), eps=-1.0)


# -- kd, dkd, dist with standardize: true (Sun et al. 2024) -----------------------------------


def kd_ls_reference(s, t, temperature, eps=1e-7, ddof=1):
    total = 0.0
    for row_s, row_t in zip(s, t):
        p_t = softmax(zscore(row_t, eps, ddof), temperature)
        p_s = softmax(zscore(row_s, eps, ddof), temperature)
        total += kl(p_t, p_s)
    return total / len(s) * temperature**2


@pytest.mark.parametrize("temperature", [2.0, 3.0, 0.5])
def test_standardized_kd_matches_the_standardized_softened_kl(temperature):
    s, t = draw(4)
    value = KDLoss(temperature=temperature, standardize=True)(t64(s), t64(t))
    assert value.item() == pytest.approx(kd_ls_reference(s, t, temperature), rel=1e-10)
    assert KDLoss(temperature=temperature)(t64(s), t64(t)).item() != pytest.approx(value.item(), rel=1e-3)


def test_standardized_kd_sees_relations_not_magnitudes():
    s, t = draw(5)
    loss = KDLoss(temperature=2.0, standardize=True)
    base = loss(t64(s), t64(t)).item()
    rng = np.random.default_rng(6)
    a, b = rng.uniform(0.2, 5, size=(5, 1)), rng.normal(size=(5, 1)) * 10
    assert loss(t64(a * s + b), t64(t)).item() == pytest.approx(base, rel=1e-6)
    assert loss(t64(s), t64(a * t + b)).item() == pytest.approx(base, rel=1e-6)
    # a student with the teacher's relations at a tenth of its range: plain KD is far from 0, this is 0
    assert loss(t64(0.1 * t - 3), t64(t)).item() == pytest.approx(0.0, abs=1e-9)
    assert KDLoss(temperature=2.0)(t64(0.1 * t - 3), t64(t)).item() > 0.1
    assert base > 0.1


def test_standardized_kd_ensemble_averages_the_standardized_teachers():
    s, t1 = draw(7)
    _, t2 = draw(8)
    value = KDLoss(temperature=2.0, standardize=True)(t64(s), (t64(t1), t64(t2))).item()
    expected = 0.0
    for i in range(len(s)):
        p_t = (softmax(zscore(t1[i]), 2.0) + softmax(zscore(t2[i]), 2.0)) / 2
        expected += kl(p_t, softmax(zscore(s[i]), 2.0))
    assert value == pytest.approx(expected / len(s) * 4.0, rel=1e-10)


def test_standardized_dkd_and_dist_are_the_plain_losses_on_z_scored_logits():
    s, t = draw(9)
    y = torch.tensor([0, 3, 5, 1, 2])
    zs, zt = (t64([zscore(row) for row in x]) for x in (s, t))
    for plain, standardized in ((DKDLoss(warmup=0, temperature=2.0, alpha=9.0, beta=72.0),
                                 DKDLoss(warmup=0, temperature=2.0, alpha=9.0, beta=72.0, standardize=True)),
                                (DISTLoss(), DISTLoss(standardize=True))):
        by_hand, built_in = plain(zs, zt, y), standardized(t64(s), t64(t), y)
        for part in by_hand:
            assert built_in[part].item() == pytest.approx(by_hand[part].item(), rel=1e-9)


@pytest.mark.parametrize("loss", [KDLoss(standardize=True), DKDLoss(warmup=0, standardize=True),
                                  DISTLoss(standardize=True)])
def test_standardized_losses_reach_the_student_never_the_teacher(loss):
    s = torch.randn(4, 6, requires_grad=True)
    t = torch.randn(4, 6, requires_grad=True)
    value = loss(s, t, torch.tensor([0, 1, 2, 3]))
    sum(value.values() if isinstance(value, dict) else [value]).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None


# -- skd ---------------------------------------------------------------------------------


def skd_reference(s, t, y, temperature, alpha, multiplier=None, eps=1e-7):
    """Written out: centre each row, divide by its std (1/K, eps under the root), scale by
    the teacher's mean std (or the multiplier)."""
    k = s.shape[1]

    def centred(row):
        return np.asarray(row) - sum(row) / k

    def std(row, eps=0.0):
        return (sum(v * v for v in centred(row)) / k + eps) ** 0.5

    radius = sum(std(row) for row in t) / len(t) if multiplier is None else multiplier
    kd = ce = 0.0
    for row_s, row_t, label in zip(s, t, y):
        on_s = centred(row_s) / std(row_s, eps) * radius
        on_t = centred(row_t) / std(row_t, eps) * radius
        kd += kl(softmax(on_t, temperature), softmax(on_s, temperature))
        ce += -np.log(softmax(on_s)[label])
    n = len(s)
    return alpha * temperature**2 * kd / n, (1 - alpha) * ce / n


@pytest.mark.parametrize("temperature, alpha, multiplier", [(4.0, 0.9, None), (1.0, 0.5, 2.0), (2.0, 1.0, None)])
def test_skd_matches_kd_and_ce_on_the_teachers_sphere(temperature, alpha, multiplier):
    s, t = draw(9)
    y = np.array([0, 5, 2, 2, 1])
    parts = SphericalKD(temperature=temperature, alpha=alpha, multiplier=multiplier)(t64(s), t64(t), torch.tensor(y))
    kd, ce = skd_reference(s, t, y, temperature, alpha, multiplier)
    assert parts["kd"].item() == pytest.approx(kd, rel=1e-10)
    if alpha < 1:
        assert parts["ce"].item() == pytest.approx(ce, rel=1e-10)
    else:
        assert "ce" not in parts


def test_skd_with_a_multiplier_is_the_layer_normalized_kd_of_the_official_code():
    s, t = draw(10)
    y = torch.tensor([1, 0, 3, 4, 5])
    parts = SphericalKD(temperature=4.0, alpha=0.9, multiplier=2.0)(t64(s), t64(t), y)
    ln_s = F.layer_norm(t64(s), (6,), eps=1e-7) * 2.0
    ln_t = F.layer_norm(t64(t), (6,), eps=1e-7) * 2.0
    kd = F.kl_div(F.log_softmax(ln_s / 4, 1), F.softmax(ln_t / 4, 1), reduction="batchmean") * 16
    assert parts["kd"].item() == pytest.approx(0.9 * kd.item(), rel=1e-12)
    assert parts["ce"].item() == pytest.approx(0.1 * F.cross_entropy(ln_s, y).item(), rel=1e-12)


def test_skd_ignores_the_students_confidence_and_the_teachers_offsets():
    s, t = draw(11)
    y = torch.tensor([0, 1, 2, 3, 4])
    loss = SphericalKD()
    base = loss(t64(s), t64(t), y)
    rng = np.random.default_rng(12)
    a, b = rng.uniform(0.2, 5, size=(5, 1)), rng.normal(size=(5, 1)) * 10
    for key, value in loss(t64(a * s + b), t64(t), y).items():
        assert value.item() == pytest.approx(base[key].item(), rel=1e-6)
    for key, value in loss(t64(s), t64(t + b), y).items():
        assert value.item() == pytest.approx(base[key].item(), rel=1e-9)
    # the teacher's overall scale sets the radius: it changes the loss, unless the radius is fixed
    assert loss(t64(s), t64(3 * t), y)["kd"].item() != pytest.approx(base["kd"].item(), rel=1e-3)
    fixed = SphericalKD(multiplier=2.0)
    assert fixed(t64(s), t64(3 * t), y)["kd"].item() == pytest.approx(fixed(t64(s), t64(t), y)["kd"].item(), rel=1e-6)
    # the student on the teacher's directions, at any confidence: no distillation loss left
    assert loss(t64(0.1 * t + 2), t64(t), y)["kd"].item() == pytest.approx(0.0, abs=1e-8)


def test_skd_leaves_unlabelled_samples_out_of_the_cross_entropy():
    s, t = draw(13)
    y = torch.tensor([0, -100, 2, -100, 4])
    parts = SphericalKD()(t64(s), t64(t), y)
    labelled = torch.tensor([0, 2, 4])
    sub = SphericalKD(multiplier=float(t64(t).std(1, correction=0).mean()))(t64(s)[labelled], t64(t)[labelled],
                                                                            y[labelled])
    assert parts["ce"].item() == pytest.approx(sub["ce"].item(), rel=1e-9)
    none = SphericalKD()(t64(s), t64(t), torch.full((5,), -100))
    assert none["ce"].item() == 0.0 and none["kd"].item() > 0


def test_skd_reaches_the_student_never_the_teacher():
    s = torch.randn(4, 6, requires_grad=True)
    t = torch.randn(4, 6, requires_grad=True)
    sum(SphericalKD()(s, t, torch.tensor([0, 1, 2, 3])).values()).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None


def test_skd_refuses_bad_settings_and_labels():
    with pytest.raises(ConfigError, match="alpha"):
        SphericalKD(alpha=1.5)
    with pytest.raises(ConfigError, match="multiplier"):
        SphericalKD(multiplier=0.0)
    with pytest.raises(ConfigError, match="temperature"):
        SphericalKD(temperature=-1.0)
    with pytest.raises(ConfigError, match="not a class index"):
        SphericalKD()(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ConfigError, match="one integer class label"):
        SphericalKD()(torch.randn(2, 3), torch.randn(2, 3), torch.rand(2, 3))


# -- nkd ---------------------------------------------------------------------------------


def nkd_reference(s, t, y, temperature, gamma):
    target = non_target = 0.0
    for row_s, row_t, label in zip(s, t, y):
        target += -softmax(row_t)[label] * np.log(softmax(row_s)[label])
        rest_s = [v for j, v in enumerate(row_s) if j != label]
        rest_t = [v for j, v in enumerate(row_t) if j != label]
        q_s, q_t = softmax(rest_s, temperature), softmax(rest_t, temperature)
        non_target += -sum(a * np.log(b) for a, b in zip(q_t, q_s))
    n = len(s)
    return target / n, gamma * temperature**2 * non_target / n


@pytest.mark.parametrize("temperature, gamma", [(1.0, 1.5), (3.0, 3.5)])
def test_nkd_matches_the_target_and_normalized_non_target_formula(temperature, gamma):
    s, t = draw(14)
    y = np.array([3, 0, 5, 5, 1])
    parts = NormalizedKD(temperature=temperature, gamma=gamma)(t64(s), t64(t), torch.tensor(y))
    target, non_target = nkd_reference(s, t, y, temperature, gamma)
    assert parts["target"].item() == pytest.approx(target, rel=1e-10)
    assert parts["non_target"].item() == pytest.approx(non_target, rel=1e-10)


def test_nkd_non_target_part_ignores_the_target_logit_and_is_least_at_the_teachers_distribution():
    s, t = draw(15)
    y = torch.tensor([0, 1, 2, 3, 4])
    loss = NormalizedKD(temperature=2.0, gamma=1.0)
    base = loss(t64(s), t64(t), y)
    moved = t64(s).clone()
    moved[torch.arange(5), y] += 7.0  # only the target logits change
    after = loss(moved, t64(t), y)
    assert after["non_target"].item() == pytest.approx(base["non_target"].item(), rel=1e-12)
    assert after["target"].item() != pytest.approx(base["target"].item(), rel=1e-3)
    # the student's non-target logits equal the teacher's up to a shift; its target logit is its own
    matched = t64(t) + 1.0
    matched[torch.arange(5), y] = t64(s)[torch.arange(5), y]
    least = loss(matched, t64(t), y)["non_target"].item()
    q_t = [softmax([v for j, v in enumerate(row) if j != label], 2.0) for row, label in zip(t, y.tolist())]
    entropy = np.mean([-(q * np.log(q)).sum() for q in q_t])
    assert least == pytest.approx(4.0 * entropy, rel=1e-10)
    for seed in range(3):
        noise = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        assert loss(matched + 0.3 * noise, t64(t), y)["non_target"].item() > least


def test_nkd_leaves_unlabelled_samples_out():
    s, t = draw(16)
    y = torch.tensor([2, -100, 0, 1, -100])
    keep = torch.tensor([0, 2, 3])
    parts = NormalizedKD()(t64(s), t64(t), y)
    sub = NormalizedKD()(t64(s)[keep], t64(t)[keep], y[keep])
    for key in parts:
        assert parts[key].item() == pytest.approx(sub[key].item(), rel=1e-12)
    none = NormalizedKD()(t64(s), t64(t), torch.full((5,), -100))
    assert all(v.item() == 0.0 for v in none.values())


def test_nkd_ensemble_uses_the_mean_teacher_probabilities():
    s, t1 = draw(17)
    _, t2 = draw(18)
    y = torch.tensor([0, 1, 2, 3, 4])
    parts = NormalizedKD(temperature=2.0)(t64(s), (t64(t1), t64(t2)), y)
    p_t = (F.softmax(t64(t1), 1) + F.softmax(t64(t2), 1)) / 2
    target = -(p_t[torch.arange(5), y] * F.log_softmax(t64(s), 1)[torch.arange(5), y]).mean()
    assert parts["target"].item() == pytest.approx(target.item(), rel=1e-10)


def test_nkd_reaches_the_student_never_the_teacher():
    s = torch.randn(4, 6, requires_grad=True)
    t = torch.randn(4, 6, requires_grad=True)
    sum(NormalizedKD()(s, t, torch.tensor([0, 1, 2, 5])).values()).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None


def test_nkd_refuses_bad_settings_and_labels():
    with pytest.raises(ConfigError, match="gamma"):
        NormalizedKD(gamma=-1.0)
    with pytest.raises(ConfigError, match="temperature"):
        NormalizedKD(temperature=0.0)
    with pytest.raises(ConfigError, match="needs the labels"):
        NormalizedKD()(torch.randn(2, 3), torch.randn(2, 3), None)
    with pytest.raises(ConfigError, match="not a class index"):
        NormalizedKD()(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, -2]))
    with pytest.raises(ConfigError, match="differ"):
        NormalizedKD()(torch.randn(2, 3), torch.randn(3, 3), torch.tensor([0, 1]))
