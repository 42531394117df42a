"""MLKD, CTKD and WKD-L, each against an independent, written-out implementation of its
paper's formula, with the invariances and minima they have, where their gradients go, and
the errors bad settings raise."""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linprog

from featkd import Distiller, Term
from featkd.errors import ConfigError
from featkd.losses.base import LOSSES
from featkd.losses.logit import KDLoss
from featkd.losses.logit_adaptive import CTKDLoss, MLKDLoss, WKDLoss, cka_distances, sinkhorn_cost
from featkd.models import build_model


def np_softmax(z: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    e = np.exp((z - z.max(axis=-1, keepdims=True)) / temperature)
    return e / e.sum(axis=-1, keepdims=True)


def t64(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64)


def logits(seed: int, batch: int = 6, classes: int = 5, scale: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch, classes)) * scale, rng.normal(size=(batch, classes)) * scale


# -- MLKD --------------------------------------------------------------------------------


def mlkd_reference(s, t, temperatures, keep):
    """The three levels written out entry by entry, with the confidence masks."""
    batch, classes = s.shape
    p1 = np_softmax(t)
    confidence, mass = p1.max(1), p1.sum(0)
    if keep == "all":
        m, k = np.ones(batch), np.ones(classes)
    elif keep == "less_confident":
        m, k = confidence <= np.percentile(confidence, 50), mass <= np.percentile(mass, 50)
    else:
        m, k = confidence >= np.percentile(confidence, 50), mass >= np.percentile(mass, 50)
    instance = batch_level = class_level = 0.0
    for tau in temperatures:
        ps, pt = np_softmax(s, tau), np_softmax(t, tau)
        for i in range(batch):
            instance += tau**2 * m[i] * sum(pt[i, c] * math.log(pt[i, c] / ps[i, c]) for c in range(classes)) / batch
            for j in range(batch):
                g_t = sum(pt[i, c] * pt[j, c] for c in range(classes))
                g_s = sum(ps[i, c] * ps[j, c] for c in range(classes))
                batch_level += m[i] * m[j] * (g_t - g_s) ** 2 / batch
        for c in range(classes):
            for d in range(classes):
                m_t = sum(pt[i, c] * pt[i, d] for i in range(batch))
                m_s = sum(ps[i, c] * ps[i, d] for i in range(batch))
                class_level += k[c] * k[d] * (m_t - m_s) ** 2 / classes
    return instance, batch_level, class_level


@pytest.mark.parametrize("keep", ["less_confident", "more_confident", "all"])
def test_mlkd_matches_the_multi_level_formula_with_confidence_masks(keep):
    s, t = logits(0, batch=7)
    temperatures = (2.0, 3.0, 4.5)
    parts = MLKDLoss(temperatures=temperatures, keep=keep)(t64(s), t64(t))
    instance, batch_level, class_level = mlkd_reference(s, t, temperatures, keep)
    assert parts["instance"].item() == pytest.approx(instance, rel=1e-10)
    assert parts["batch"].item() == pytest.approx(batch_level, rel=1e-10)
    assert parts["class"].item() == pytest.approx(class_level, rel=1e-10)


def test_mlkd_masked_samples_leave_the_instance_and_batch_levels_unchanged():
    s, t = logits(1, batch=8)
    loss = MLKDLoss()
    samples, _ = loss.masks(t64(t))
    assert 0 < samples.sum() < len(samples)  # the median splits the batch: the check can fail
    base = loss(t64(s), t64(t))
    out, kept = samples.logical_not().nonzero()[0].item(), samples.nonzero()[0].item()
    for row, changes in ((out, False), (kept, True)):
        moved = s.copy()
        moved[row] = np.random.default_rng(2).normal(size=s.shape[1]) * 3
        after = loss(t64(moved), t64(t))
        for level in ("instance", "batch"):
            assert (after[level].item() != pytest.approx(base[level].item(), rel=1e-9)) == changes, (row, level)


def test_mlkd_invariances_and_minimum():
    s, t = logits(3, batch=6)
    loss = MLKDLoss()
    base = {k: v.item() for k, v in loss(t64(s), t64(t)).items()}
    rng = np.random.default_rng(4)
    shifted = loss(t64(s + rng.normal(size=(6, 1))), t64(t + rng.normal(size=(6, 1))))  # softmax ignores row shifts
    order, classes = rng.permutation(6), rng.permutation(5)
    permuted = loss(t64(s[order][:, classes]), t64(t[order][:, classes]))  # relabelled samples and classes
    for key, value in base.items():
        assert value > 0
        assert shifted[key].item() == pytest.approx(value, rel=1e-9)
        assert permuted[key].item() == pytest.approx(value, rel=1e-9)
    same = loss(t64(t), t64(t))
    assert all(v.item() == pytest.approx(0.0, abs=1e-12) for v in same.values())


def test_mlkd_ensemble_uses_the_mean_teacher_distribution():
    s, t = logits(5)
    single = MLKDLoss()(t64(s), t64(t))
    pair = MLKDLoss()(t64(s), (t64(t), t64(t + 1.0)))  # a shifted copy predicts the same distribution
    for key in single:
        assert pair[key].item() == pytest.approx(single[key].item(), rel=1e-10)


def test_mlkd_reaches_only_the_student():
    s = torch.randn(6, 5, requires_grad=True)
    t = torch.randn(6, 5, requires_grad=True)
    sum(MLKDLoss()(s, t).values()).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None


def test_mlkd_bad_settings_say_what_to_do():
    with pytest.raises(ConfigError, match="at least one temperature"):
        MLKDLoss(temperatures=())
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        MLKDLoss(temperatures=(2.0, 0.0))
    with pytest.raises(ConfigError, match="keep is"):
        MLKDLoss(keep="confident")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"\(batch, classes >= 2\)"):
        MLKDLoss()(torch.randn(2, 3, 5), torch.randn(2, 3, 5))
    with pytest.raises(ConfigError, match="same classes"):
        MLKDLoss()(torch.randn(4, 5), torch.randn(4, 6))


# -- CTKD --------------------------------------------------------------------------------


def kd_at(s, t, tau):
    """tau^2 KL(softmax(t / tau) || softmax(s / tau)), averaged over the rows; tau scalar or per row."""
    tau = np.broadcast_to(np.asarray(tau, dtype=float).reshape(-1), (len(s),))
    total = 0.0
    for i in range(len(s)):
        ps, pt = np_softmax(s[i], tau[i]), np_softmax(t[i], tau[i])
        total += tau[i] ** 2 * float((pt * np.log(pt / ps)).sum())
    return total / len(s)


def test_ctkd_is_kd_at_the_learned_temperature():
    s, t = logits(6)
    loss = CTKDLoss(init=-0.5, temperature_min=1.5, temperature_range=10.0, curriculum_epochs=0).double()
    tau = 1.5 + 10.0 / (1 + math.exp(0.5))
    assert loss.temperature().item() == pytest.approx(tau, rel=1e-12)
    assert loss(t64(s), t64(t)).item() == pytest.approx(kd_at(s, t, tau), rel=1e-10)
    assert loss(t64(s), t64(t)).item() == pytest.approx(KDLoss(temperature=tau)(t64(s), t64(t)).item(), rel=1e-10)
    assert CTKDLoss().temperature().item() == pytest.approx(1 + 20 / (1 + math.exp(-1)))  # the paper's start, ~15.6


@pytest.mark.parametrize("epoch", [1, 4, 25])
def test_ctkd_temperature_gradient_is_reversed_and_scaled_by_lambda(epoch):
    s, t = logits(7)
    loss = CTKDLoss(init=0.3).double()
    loss.set_epoch(epoch)
    lam = (1 - math.cos(math.pi * min(epoch, 10) / 10)) / 2
    loss(t64(s), t64(t)).backward()
    # d KD / d theta by central differences of the written-out formula
    h = 1e-6
    kd = lambda theta: kd_at(s, t, 1 + 20 / (1 + math.exp(-theta)))  # noqa: E731
    descent = (kd(0.3 + h) - kd(0.3 - h)) / (2 * h)
    assert abs(descent) > 1e-4
    assert loss.theta.grad.item() == pytest.approx(-lam * descent, rel=1e-6)
    # an optimizer step on theta moves it up the KD term, not down
    assert loss.theta.grad.item() * descent < 0


def test_ctkd_curriculum_follows_the_cosine_schedule_and_needs_the_epoch():
    loss = CTKDLoss()
    assert [loss.curriculum(e) for e in (0, 5, 10, 11, 240)] == pytest.approx([0.0, 0.5, 1.0, 1.0, 1.0])
    assert loss.curriculum(1) == pytest.approx((1 - math.cos(math.pi / 10)) / 2)
    shifted = CTKDLoss(lambda_min=0.2, lambda_max=0.6, curriculum_epochs=4)
    assert [shifted.curriculum(e) for e in (0, 2, 4, 9)] == pytest.approx([0.2, 0.4, 0.6, 0.6])
    assert CTKDLoss(curriculum_epochs=0, lambda_max=0.7).curriculum(None) == 0.7
    with pytest.raises(ConfigError, match="set_epoch"):
        loss(torch.randn(4, 5), torch.randn(4, 5))


def test_ctkd_adversarial_steps_raise_the_distillation_loss():
    torch.manual_seed(0)
    s, t = torch.randn(16, 10), torch.randn(16, 10) * 3
    loss = CTKDLoss(curriculum_epochs=0, init=-1.0)
    values = []
    for _ in range(5):  # plain gradient steps on what the run's optimizer trains
        value = loss(s, t)
        value.backward()
        with torch.no_grad():
            for p in loss.trained_parameters():
                p -= 1.0 * p.grad
                p.grad = None
        values.append(value.item())
    assert values[-1] > values[0] and all(b >= a for a, b in zip(values, values[1:]))


def test_ctkd_student_gradient_is_plain_kd_and_the_teacher_gets_none():
    torch.manual_seed(1)
    s = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    loss = CTKDLoss(curriculum_epochs=0).double()
    loss(s, t).backward()
    reference = s.detach().clone().requires_grad_()
    KDLoss(temperature=loss.temperature().item())(reference, t.detach()).backward()
    assert torch.allclose(s.grad, reference.grad, rtol=1e-10, atol=1e-14)
    assert t.grad is None and loss.theta.grad is not None


def test_ctkd_instance_temperatures_are_per_sample_and_trained_reversed():
    s, t = logits(8, batch=5)
    loss = CTKDLoss(mode="instance", num_classes=5, curriculum_epochs=0).double()
    assert torch.allclose(loss.temperature(t64(s), t64(t)), CTKDLoss().temperature().double())  # same start
    torch.manual_seed(2)
    with torch.no_grad():
        loss.mlp[2].weight.normal_(0, 0.5)
    tau = loss.temperature(t64(s), t64(t)).flatten().numpy()
    assert tau.std() > 0.1 and (tau > 1).all() and (tau < 21).all()
    student = t64(s).requires_grad_()
    value = loss(student, t64(t))
    assert value.item() == pytest.approx(kd_at(s, t, tau), rel=1e-10)
    value.backward()
    # the student learns KD at the predicted temperatures; the MLP's reversed gradient stays in the MLP
    fixed, reference = torch.tensor(tau)[:, None], t64(s).requires_grad_()
    p_t = torch.softmax(t64(t) / fixed, 1)
    kl = (p_t * (p_t.log() - torch.log_softmax(reference / fixed, 1))).sum(1)
    (fixed[:, 0] ** 2 * kl).mean().backward()
    assert torch.allclose(student.grad, reference.grad, rtol=1e-9, atol=1e-14)
    bias = loss.mlp[2].bias

    def at(delta):
        with torch.no_grad():
            bias.add_(delta)
            out = loss(t64(s), t64(t)).item()
            bias.sub_(delta)
        return out

    descent = (at(1e-6) - at(-1e-6)) / 2e-6
    assert bias.grad.item() == pytest.approx(-descent, rel=1e-5)  # lambda = 1: reversed, not scaled
    assert all(p.grad is not None for p in loss.trained_parameters())


def test_ctkd_epochs_reach_it_through_the_distiller():
    torch.manual_seed(0)
    teacher = build_model("cnn", 10, (1, 8, 8), {"widths": (8, 16, 32)})
    student = build_model("cnn", 10, (1, 8, 8), {"widths": (4, 8, 16)})
    distiller = Distiller(teacher, student, [Term("ctkd")])
    distiller.set_epoch(5)
    assert distiller.losses["ctkd"].curriculum(distiller.losses["ctkd"].epoch) == pytest.approx(0.5)
    theta = distiller.losses["ctkd"].theta
    assert any(p is theta for p in distiller.trainable_parameters())  # the run's optimizer trains it


def test_ctkd_bad_settings_say_what_to_do():
    with pytest.raises(ConfigError, match="num_classes"):
        CTKDLoss(mode="instance")
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        CTKDLoss(temperature_min=0.0)
    with pytest.raises(ConfigError, match="temperature_range must be > 0"):
        CTKDLoss(temperature_range=0.0)
    with pytest.raises(ConfigError, match="lambda_min <= lambda_max"):
        CTKDLoss(lambda_min=0.5, lambda_max=0.2)
    with pytest.raises(ConfigError, match="curriculum_epochs"):
        CTKDLoss(curriculum_epochs=-1)
    with pytest.raises(ConfigError, match="mode is"):
        CTKDLoss(mode="batch")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="built for num_classes=5"):
        CTKDLoss(mode="instance", num_classes=5, curriculum_epochs=0)(torch.randn(3, 6), torch.randn(3, 6))


# -- WKD-L -------------------------------------------------------------------------------


def sinkhorn_reference(p, q, cost, reg, iterations):
    """The paper's Sinkhorn iterations for one pair of distributions, from uniform u."""
    kernel = np.exp(-cost / reg)
    u = np.ones(len(p)) / len(p)
    for _ in range(iterations):
        v = q / (kernel.T @ u + 1e-8)
        u = p / (kernel @ v + 1e-8)
    plan = u[:, None] * kernel * v[None, :]
    return float((plan * cost).sum())


def wkd_reference(s, t, y, distances, temperature, gamma, kappa, reg, iterations):
    """Target part and Wasserstein part, sample by sample, the target class deleted."""
    target = wasserstein = 0.0
    cost = np.maximum(1 - np.exp(-kappa * distances) if kappa else distances, 0) + 1e-8
    for i, gt in enumerate(y):
        target -= np_softmax(t[i])[gt] * math.log(np_softmax(s[i])[gt])
        keep = [c for c in range(s.shape[1]) if c != gt]
        q_s, q_t = np_softmax(s[i, keep], temperature), np_softmax(t[i, keep], temperature)
        wasserstein += sinkhorn_reference(q_s, q_t, cost[np.ix_(keep, keep)], reg, iterations)
    return target / len(y), gamma * wasserstein / len(y)


def saved_distances(tmp_path, classes: int = 5, seed: int = 9):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(classes, 4))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    distances = 1 - features @ features.T
    np.fill_diagonal(distances, 0)
    path = tmp_path / "distances.npy"
    np.save(path, distances)
    return distances, str(path)


@pytest.mark.parametrize("temperature,gamma,kappa", [(2.0, 30.0, 1.0), (4.0, 7.0, 2.0), (1.0, 1.0, 0.0)])
def test_wkd_matches_target_kd_plus_sinkhorn_wasserstein(tmp_path, temperature, gamma, kappa):
    distances, path = saved_distances(tmp_path)
    s, t = logits(10, batch=6)
    y = np.array([0, 4, 2, 2, 1, 3])
    loss = WKDLoss(temperature=temperature, wasserstein_weight=gamma, sharpen=kappa, cost=path,
                   sinkhorn_lambda=0.1, sinkhorn_iterations=7).double()
    parts = loss(t64(s), t64(t), torch.tensor(y))
    target, wasserstein = wkd_reference(s, t, y, distances, temperature, gamma, kappa, 0.1, 7)
    assert parts["target"].item() == pytest.approx(target, rel=1e-10)
    assert parts["wasserstein"].item() == pytest.approx(wasserstein, rel=1e-9)


def exact_transport(p, q, cost):
    n = len(p)
    equalities = [np.kron(np.eye(n)[i], np.ones(n)) for i in range(n)] + [np.kron(np.ones(n), np.eye(n)[j])
                                                                          for j in range(n)]
    result = linprog(cost.flatten(), A_eq=np.array(equalities), b_eq=np.concatenate([p, q]), bounds=(0, None))
    return result.fun


def test_sinkhorn_tends_to_the_exact_wasserstein_distance_as_lambda_shrinks():
    rng = np.random.default_rng(11)
    p, q = np_softmax(rng.normal(size=(3, 5))), np_softmax(rng.normal(size=(3, 5)) * 2)
    points = rng.normal(size=(5, 2))
    cost = np.linalg.norm(points[:, None] - points[None], axis=-1)
    cost /= cost.max()
    uniform = 1 - np.eye(5)
    for matrix in (cost, uniform):
        exact = [exact_transport(p[i], q[i], matrix) for i in range(3)]
        approx = sinkhorn_cost(t64(p), t64(q), t64(matrix), reg=0.01, iterations=3000, eps=0.0)
        assert approx.numpy() == pytest.approx(exact, abs=1e-3)
        blurred = sinkhorn_cost(t64(p), t64(q), t64(matrix), reg=0.05, iterations=10)  # the paper's setting
        assert np.abs(blurred.numpy() - exact).max() > 1e-3
    # with a 0/1 cost the exact distance is the total variation
    assert exact_transport(p[0], q[0], uniform) == pytest.approx(0.5 * np.abs(p[0] - q[0]).sum(), abs=1e-9)


def test_wkd_wasserstein_part_is_least_for_the_teachers_distribution_and_invariant(tmp_path):
    distances, path = saved_distances(tmp_path)
    s, t = logits(12, batch=6)
    y = torch.tensor([1, 0, 3, 4, 2, 2])
    sharp = WKDLoss(cost=path, sinkhorn_lambda=0.01, sinkhorn_iterations=1000).double()
    same = sharp(t64(t), t64(t), y)["wasserstein"].item()  # 0 up to the entropic blur, small at small lambda
    assert 0 <= same < 1e-4 * sharp(t64(s), t64(t), y)["wasserstein"].item()
    loss = WKDLoss(cost=path).double()
    base = {k: v.item() for k, v in loss(t64(s), t64(t), y).items()}
    rng = np.random.default_rng(13)
    shifted = loss(t64(s + rng.normal(size=(6, 1))), t64(t + rng.normal(size=(6, 1))), y)
    order = rng.permutation(5)  # relabel the classes, and the distances with them
    relabelled = WKDLoss(cost=torch.tensor(distances[np.ix_(order, order)])).double()
    inverse = torch.tensor(np.argsort(order))
    permuted = relabelled(t64(s[:, order]), t64(t[:, order]), inverse[y])
    for key, value in base.items():
        assert shifted[key].item() == pytest.approx(value, rel=1e-9)
        assert permuted[key].item() == pytest.approx(value, rel=1e-9)


def test_wkd_class_prototypes_come_from_the_teachers_logits():
    s, t = logits(14, batch=6)
    y = np.array([0, 0, 1, 3, 3, 3])
    loss = WKDLoss(sharpen=0.0).double()
    loss(t64(s), t64(t), torch.tensor(y))
    centered = t - t.mean(1, keepdims=True)
    cost = loss.cost_matrix(5).numpy()
    for a in range(5):
        for b in range(5):
            if a == b:
                expected = 0.0
            elif {a, b} & {2, 4}:  # a class not seen yet is unrelated to every other
                expected = 1.0
            else:
                pa, pb = centered[y == a].mean(0), centered[y == b].mean(0)
                expected = 1 - pa @ pb / (np.linalg.norm(pa) * np.linalg.norm(pb))
            assert cost[a, b] == pytest.approx(expected + 1e-8, abs=1e-6), (a, b)
    before = loss.class_sums.clone()
    loss.eval()
    loss(t64(s), t64(t + 1.0), torch.tensor(y))
    assert torch.equal(loss.class_sums, before)  # evaluation batches do not count
    resumed = WKDLoss()
    resumed.load_state_dict(loss.state_dict())  # sized at the first step: resizes on load
    assert torch.equal(resumed.class_counts, loss.class_counts.float())


def test_wkd_weight_decays_on_the_cosine_schedule():
    loss = WKDLoss(wasserstein_weight=600.0, decay_after=150, decay_until=240)
    assert loss.weight_at(1) == loss.weight_at(150) == 600.0
    assert loss.weight_at(195) == pytest.approx(300.0)
    assert loss.weight_at(240) == pytest.approx(0.0) and loss.weight_at(300) == pytest.approx(0.0)
    assert WKDLoss(decay_until=100).weight_at(50) == pytest.approx(15.0)
    with pytest.raises(ConfigError, match="set_epoch"):
        loss(torch.randn(3, 5), torch.randn(3, 5), torch.tensor([0, 1, 2]))


def test_wkd_leaves_unlabelled_samples_out_and_reaches_only_the_student():
    torch.manual_seed(3)
    s = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1, -100, 3, 0, -100, 2])
    loss = WKDLoss(cost="uniform").double()
    parts = loss(s, t, y)
    labelled = loss(s[y >= 0], t[y >= 0], y[y >= 0])
    for key in parts:
        assert parts[key].item() == pytest.approx(labelled[key].item(), rel=1e-12)
    sum(parts.values()).backward()
    assert s.grad[y >= 0].abs().sum() > 0 and s.grad[y < 0].abs().sum() == 0 and t.grad is None
    none = loss(s, t, torch.full((6,), -100))
    assert all(v.item() == 0.0 for v in none.values())


def test_wkd_bad_settings_and_inputs_say_what_to_do(tmp_path):
    for kwargs, message in [({"temperature": 0.0}, "temperature must be > 0"),
                            ({"wasserstein_weight": -1.0}, "wasserstein_weight"),
                            ({"sinkhorn_lambda": 0.0}, "sinkhorn_lambda"),
                            ({"sinkhorn_iterations": 0}, "sinkhorn_iterations"),
                            ({"sharpen": -1.0}, "sharpen"),
                            ({"decay_after": 10, "decay_until": 5}, "decay_until > decay_after"),
                            ({"cost": str(tmp_path / "missing.pt")}, "no such file")]:
        with pytest.raises(ConfigError, match=message):
            WKDLoss(**kwargs)
    torch.save(torch.zeros(3, 4), tmp_path / "wide.pt")
    with pytest.raises(ConfigError, match="square"):
        WKDLoss(cost=str(tmp_path / "wide.pt"))
    with pytest.raises(ConfigError, match="NaN"):
        WKDLoss(cost=torch.full((3, 3), float("nan")))
    s, t, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ConfigError, match="logits have 5 classes"):
        WKDLoss(cost=torch.zeros(3, 3))(s, t, y)
    with pytest.raises(ConfigError, match=r"\[0, 5\)"):
        WKDLoss()(s, t, torch.tensor([0, 1, 2, 7]))
    with pytest.raises(ConfigError, match="one integer class label"):
        WKDLoss()(s, t, torch.zeros(4, 5))
    with pytest.raises(ConfigError, match=r"\(batch, classes >= 2\)"):
        WKDLoss()(torch.randn(2, 3, 5), torch.randn(2, 3, 5), y[:2])


def test_cka_distances_follow_the_linear_cka_formula():
    rng = np.random.default_rng(15)
    features = rng.normal(size=(4, 6, 3))
    features[1] = features[0] * 3.0 + 1.0  # a scaled, shifted copy: CKA 1, distance 0
    out = cka_distances(t64(features)).numpy()
    for i in range(4):
        for j in range(4):
            x = features[i] - features[i].mean(0)
            y = features[j] - features[j].mean(0)
            cka = np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))
            assert out[i, j] == pytest.approx(0.0 if i == j else 1 - cka, abs=1e-12)
    assert out[0, 1] == pytest.approx(0.0, abs=1e-12) and out[0, 2] > 0.01
    with pytest.raises(ConfigError, match="classes >= 2"):
        cka_distances(torch.zeros(5, 3))


def test_the_losses_are_registered():
    assert {"mlkd", "ctkd", "wkd"} <= set(LOSSES.names())
