"""OFD and PAD-L2 against written-out versions of their papers' formulas, with their minima,
invariances, where their gradients go and how they refuse bad input."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from featkd.errors import ConfigError
from featkd.losses.feature_regression import PADL2, OverhaulDistillation, gaussian_negative_mean


def t64(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64)


def phi_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def margin_reference(mean: float, std: float) -> float:
    """The paper's margin, channel by channel: E[x | x < 0] of N(mean, std^2), -3 std in the far tail."""
    std = abs(std)
    if phi_cdf(-mean / std) > 1e-3:
        return -std * math.exp(-((mean / std) ** 2) / 2) / math.sqrt(2 * math.pi) / phi_cdf(-mean / std) + mean
    return -3 * std


def ofd_reference(students, teachers, margins):
    """sum_i 2^(i - n + 1) sum over elements of the partial L2 / B, element by element."""
    n, total = len(students), []
    for i, (s, t, m) in enumerate(zip(students, teachers, margins)):
        value = 0.0
        for index in np.ndindex(*s.shape):
            sv, tv, mv = s[index], t[index], m[index[1]]
            if tv > 0:
                value += (sv - tv) ** 2
            elif tv > mv:  # between the margin and 0: only a student above the teacher is penalised
                value += (sv - tv) ** 2 if sv > tv else 0.0
            else:  # at or below the margin: the target is the margin
                value += (sv - mv) ** 2 if sv > mv else 0.0
        total.append(2.0 ** (i - n + 1) * value / len(s))
    return total


def batchnorm(channels: int, rng: np.random.Generator) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels).double()
    with torch.no_grad():
        bn.weight.copy_(t64(rng.normal(size=channels)))
        bn.bias.copy_(t64(rng.normal(size=channels)))
    return bn


# -- OFD: the margin -------------------------------------------------------------------


def test_margin_is_the_papers_closed_form_channel_by_channel():
    means = [0.3, -1.2, 0.0, 2.5, 3.2, 4.0, -0.7]
    stds = [1.0, 0.5, 2.0, -0.8, 1.0, 1.0, 0.1]  # a negative gamma counts by its size; 3.2 and 4.0 reach the tail
    got = gaussian_negative_mean(t64(np.array(means)), t64(np.array(stds)))
    expected = [margin_reference(m, s) for m, s in zip(means, stds)]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    assert got[4].item() == pytest.approx(-3.0) and got[5].item() == pytest.approx(-3.0)


def test_margin_is_the_expectation_of_the_negative_part():
    # an independent check of the closed form: integrate x over the negative half-line
    for mean, std in [(0.5, 1.0), (-1.0, 0.7), (1.5, 2.0)]:
        x = np.linspace(mean - 12 * std, 0.0, 400001)
        density = np.exp(-((x - mean) ** 2) / (2 * std**2))
        expected = np.trapezoid(x * density, x) / np.trapezoid(density, x)
        assert gaussian_negative_mean(t64(np.array(mean)), t64(np.array(std))).item() == pytest.approx(expected,
                                                                                                    rel=1e-6)


def test_margin_of_a_constant_channel_is_finite():
    got = gaussian_negative_mean(t64(np.array([-0.4, 0.7, 0.0])), t64(np.zeros(3)))
    assert got.tolist() == [-0.4, 0.0, 0.0]  # always negative: its value; never negative: 0


# -- OFD: the loss -----------------------------------------------------------------------


def test_ofd_is_the_partial_l2_with_layer_weights_and_batchnorm_margins():
    rng = np.random.default_rng(0)
    shapes = [(3, 2, 4, 4), (3, 5, 2, 2)]
    students = [rng.normal(size=sh) for sh in shapes]
    teachers = [rng.normal(size=sh) * 1.5 for sh in shapes]
    bns = [batchnorm(sh[1], rng) for sh in shapes]
    ofd = OverhaulDistillation()
    ofd.bind([sh[1:] for sh in shapes], [sh[1:] for sh in shapes])
    ofd.margins_from_batchnorm(bns)
    margins = [[margin_reference(b.item(), w.item()) for w, b in zip(bn.weight, bn.bias)] for bn in bns]
    values = ofd([t64(s) for s in students], [t64(t) for t in teachers])
    expected = ofd_reference(students, teachers, margins)
    assert [v.item() for v in values] == pytest.approx(expected, rel=1e-12)
    assert expected[0] > 0 and expected[1] > 0


def test_ofd_margins_estimated_from_the_data_match_the_gaussian_of_the_batch():
    rng = np.random.default_rng(1)
    t = rng.normal(size=(6, 3, 2, 2)) * np.array([0.5, 1.0, 2.0])[None, :, None, None] + np.array(
        [0.2, -0.5, 1.0])[None, :, None, None]
    s = rng.normal(size=(6, 3, 2, 2))
    ofd = OverhaulDistillation()
    ofd.bind([(3, 2, 2)], [(3, 2, 2)])
    value = ofd([t64(s)], [t64(t)])[0]
    per_channel = t.transpose(1, 0, 2, 3).reshape(3, -1)
    margins = [margin_reference(c.mean(), c.std()) for c in per_channel]  # population std, as batch norm
    assert value.item() == pytest.approx(ofd_reference([s], [t], [margins])[0], rel=1e-12)


def test_ofd_accumulates_statistics_in_training_and_only_reads_them_in_eval():
    rng = np.random.default_rng(2)
    t1, t2, t3 = rng.normal(size=(3, 4, 2, 3, 3)) + np.array([0.3, -0.2])[None, None, :, None, None]
    ofd = OverhaulDistillation()
    ofd.bind([(2, 3, 3)], [(2, 3, 3)])
    ofd.eval()
    before = ofd.margins([t64(t3)])[0]  # no training step yet: this batch's statistics, nothing stored
    assert ofd.moments_0.abs().sum() == 0
    ofd.train()
    ofd.margins([t64(t1)])
    both = ofd.margins([t64(t2)])[0]
    union = np.concatenate([t1, t2]).transpose(1, 0, 2, 3).reshape(2, -1)
    np.testing.assert_allclose(both.numpy(), [margin_reference(c.mean(), c.std()) for c in union], rtol=1e-10)
    ofd.eval()
    assert torch.equal(ofd.margins([t64(t3)])[0], both)  # eval: the running statistics, unchanged
    assert not torch.allclose(before, both)
    restored = OverhaulDistillation()
    restored.bind([(2, 3, 3)], [(2, 3, 3)])
    restored.load_state_dict(ofd.state_dict())  # checkpoints keep the statistics
    assert torch.equal(restored.eval().margins()[0], both)


def test_ofd_data_margins_equal_the_batchnorm_ones_for_a_batch_normalised_teacher():
    # a batch norm normalising with the batch's statistics (the paper's code runs the teacher in
    # train mode) outputs per channel mean beta and std |gamma|: the two margins agree
    rng = np.random.default_rng(3)
    bn = batchnorm(4, rng).train()
    t = bn(t64(rng.normal(size=(64, 4, 5, 5)) * 3 + 1)).detach()
    from_data, from_bn = OverhaulDistillation(), OverhaulDistillation()
    for ofd in (from_data, from_bn):
        ofd.bind([(4, 5, 5)], [(4, 5, 5)])
    from_bn.margins_from_batchnorm([bn])
    np.testing.assert_allclose(from_data.margins([t])[0].numpy(), from_bn.margins()[0].numpy(), rtol=1e-4)


def test_ofd_minimum_and_what_it_ignores():
    rng = np.random.default_rng(4)
    t = t64(rng.normal(size=(4, 3, 3, 3)) * 2)
    ofd = OverhaulDistillation()
    ofd.bind([(3, 3, 3)], [(3, 3, 3)])
    ofd.margins_from_batchnorm([batchnorm(3, rng)])
    m = ofd.margins()[0].view(1, -1, 1, 1)
    target = torch.maximum(t, m)
    assert ofd([t.clone()], [t])[0].item() == 0.0  # the teacher itself
    assert ofd([target], [t])[0].item() == 0.0  # the margin-clamped teacher
    below = torch.where(target <= 0, target - 3.0, target)  # further below a non-positive target: free
    assert ofd([below], [t])[0].item() == 0.0
    lower_teacher = torch.where(t <= m, t - 10.0, t)  # how far below the margin the teacher is: irrelevant
    s = t64(rng.normal(size=(4, 3, 3, 3)))
    assert ofd([s], [lower_teacher])[0].item() == pytest.approx(ofd([s], [t])[0].item(), rel=1e-12)
    above = torch.where(target <= 0, target + 0.5, target)  # above a non-positive target: penalised
    assert ofd([above], [t])[0].item() == pytest.approx(0.25 * (target <= 0).sum().item() / 4)


def test_ofd_gradients_reach_the_student_only_where_penalised_and_never_the_teacher():
    rng = np.random.default_rng(5)
    ofd = OverhaulDistillation()
    ofd.bind([(2, 4, 4)], [(2, 4, 4)])
    ofd.margins_from_batchnorm([batchnorm(2, rng)])
    s = t64(rng.normal(size=(3, 2, 4, 4))).requires_grad_()
    t = t64(rng.normal(size=(3, 2, 4, 4))).requires_grad_()
    ofd([s], [t])[0].backward()
    target = torch.maximum(t.detach(), ofd.margins()[0].view(1, -1, 1, 1))
    free = (s.detach() <= target) & (target <= 0)
    assert free.any() and (~free).any()
    assert (s.grad[free] == 0).all() and (s.grad[~free] != 0).all()
    assert t.grad is None
    assert not list(ofd.parameters())  # no learned parts: the connector is the term's adapter


def test_ofd_bind_modules_reads_margins_from_teacher_batchnorms_only():
    rng = np.random.default_rng(6)
    bn = batchnorm(3, rng)
    ofd = OverhaulDistillation()
    ofd.bind([(3, 2, 2)], [(3, 2, 2)])
    ofd.bind_modules([None], [nn.ReLU()])
    assert not ofd.from_batchnorm
    ofd.bind_modules([None], [bn])
    assert ofd.from_batchnorm
    expected = [margin_reference(b.item(), w.item()) for w, b in zip(bn.weight, bn.bias)]
    np.testing.assert_allclose(ofd.margins()[0].numpy(), expected, rtol=1e-12)


def test_through_the_distiller_ofd_takes_its_margins_from_the_teachers_batch_norms():
    from featkd import Distiller, Term
    from featkd.models import build_model

    teacher = build_model("cnn", 10, (1, 8, 8), {"widths": (16, 32, 64)}).eval()
    student = build_model("cnn", 10, (1, 8, 8), {"widths": (8, 16, 32)})
    pre_relu = "layer*.0.bn"
    for feature, from_batchnorm in ((pre_relu, True), ("layer*", False)):  # a stage's output is no batch norm
        distiller = Distiller(teacher, student, [Term("ofd", student=feature, teacher=feature, adapter="conv")],
                              example_input=torch.randn(4, 1, 8, 8))
        assert bool(distiller.losses["ofd"].from_batchnorm) is from_batchnorm
        distiller.close()
    bns = [teacher.layer1[0].bn, teacher.layer2[0].bn, teacher.layer3[0].bn]
    expected = [[margin_reference(b.item(), w.item()) for w, b in zip(bn.weight, bn.bias)] for bn in bns]
    distiller = Distiller(teacher, student, [Term("ofd", student=pre_relu, teacher=pre_relu, adapter="conv")],
                          example_input=torch.randn(4, 1, 8, 8))
    for got, want in zip(distiller.losses["ofd"].margins(), expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)


def test_ofd_refuses_what_it_cannot_use():
    ofd = OverhaulDistillation()
    with pytest.raises(ConfigError, match=r"conv maps.*before their ReLU"):
        ofd.bind([(16,)], [(32,)])
    with pytest.raises(ConfigError, match="example_input"):
        ofd([torch.randn(2, 3, 2, 2)], [torch.randn(2, 3, 2, 2)])
    ofd.bind([(3, 2, 2), (4, 1, 1)], [(3, 2, 2), (4, 1, 1)])
    with pytest.raises(ConfigError, match="2 feature pairs"):
        ofd.margins_from_batchnorm([nn.BatchNorm2d(3)])
    with pytest.raises(ConfigError, match="not an affine batch norm"):
        ofd.margins_from_batchnorm([nn.BatchNorm2d(3), nn.ReLU()])
    with pytest.raises(ConfigError, match="has 5 channels"):
        ofd.margins_from_batchnorm([nn.BatchNorm2d(3), nn.BatchNorm2d(5)])
    with pytest.raises(ConfigError, match="no teacher features seen"):
        ofd.margins()


# -- PAD-L2 ----------------------------------------------------------------------------------


def batchnorm_train(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """Batch norm in training mode over every axis but the channel axis 1."""
    axes = tuple(i for i in range(x.ndim) if i != 1)
    mean, var = x.mean(axis=axes, keepdims=True), x.var(axis=axes, keepdims=True)
    shape = [1, -1] + [1] * (x.ndim - 2)
    return (x - mean) / np.sqrt(var + eps) * weight.reshape(shape) + bias.reshape(shape)


def pad_reference(s, t, log_var, eps):
    """mean over samples and elements of (t - s)^2 / (exp(v) + eps) + v, with v broadcast."""
    v = np.broadcast_to(log_var, s.shape)
    total = 0.0
    for index in np.ndindex(*s.shape):
        total += (t[index] - s[index]) ** 2 / (math.exp(v[index]) + eps) + v[index]
    return total / s.size


def randomise(module: nn.Module, rng: np.random.Generator) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(t64(rng.normal(size=tuple(p.shape)) * 0.5))


@pytest.mark.parametrize("per", ["element", "sample"])
def test_pad_l2_on_embeddings_is_the_weighted_l2_with_its_log_variance(per):
    rng = np.random.default_rng(7)
    s, t = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    pad = PADL2(per=per, eps=1e-6)
    pad.bind([(4,)], [(4,)])
    pad.double()
    randomise(pad, rng)
    head = pad.heads[0]
    w, b = head.project.weight.detach().numpy(), head.project.bias.detach().numpy()
    log_var = batchnorm_train(s @ w.T + b, head.norm.weight.detach().numpy(), head.norm.bias.detach().numpy())
    assert log_var.shape == ((5, 4) if per == "element" else (5, 1))
    value = pad([t64(s)], [t64(t)])[0]
    assert value.item() == pytest.approx(pad_reference(s, t, log_var, 1e-6), rel=1e-10)


@pytest.mark.parametrize("per", ["element", "sample"])
def test_pad_l2_on_conv_maps_predicts_per_position_or_per_sample(per):
    rng = np.random.default_rng(8)
    s, t = rng.normal(size=(4, 3, 2, 2)), rng.normal(size=(4, 3, 2, 2))
    pad = PADL2(per=per)
    pad.bind([(3, 2, 2)], [(3, 2, 2)])
    pad.double()
    randomise(pad, rng)
    head = pad.heads[0]
    w, b = head.project.weight.detach().numpy(), head.project.bias.detach().numpy()
    gamma, beta = head.norm.weight.detach().numpy(), head.norm.bias.detach().numpy()
    if per == "element":  # a 1x1 conv: the same linear map of channels at every position
        log_var = batchnorm_train(np.einsum("oc,bchw->bohw", w.reshape(3, 3), s) + b[None, :, None, None], gamma, beta)
    else:  # one value per sample from the spatially pooled feature
        log_var = batchnorm_train(s.mean(axis=(2, 3)) @ w.T + b, gamma, beta).reshape(4, 1, 1, 1)
    value = pad([t64(s)], [t64(t)])[0]
    assert value.item() == pytest.approx(pad_reference(s, t, log_var, 1e-6), rel=1e-10)


def test_pad_l2_with_unit_variance_is_the_mean_squared_error():
    rng = np.random.default_rng(9)
    s, t = t64(rng.normal(size=(6, 5))), t64(rng.normal(size=(6, 5)))
    pad = PADL2(eps=1e-3)
    pad.bind([(5,)], [(5,)])
    pad.double()
    with torch.no_grad():
        pad.heads[0].norm.weight.zero_()
        pad.heads[0].norm.bias.zero_()  # log sigma^2 = 0
    assert pad([s], [t])[0].item() == pytest.approx(((s - t) ** 2).mean().item() / 1.001, rel=1e-12)
    assert pad([t], [t])[0].item() == 0.0


def test_pad_l2_variance_optimum_is_the_squared_error():
    # with a constant log-variance b (the batch norm's bias), d/db of e^2 / e^b + b vanishes at e^b = mean e^2
    rng = np.random.default_rng(10)
    s, t = t64(rng.normal(size=(8, 6))), t64(rng.normal(size=(8, 6)))
    pad = PADL2(per="sample", eps=1e-12)
    pad.bind([(6,)], [(6,)])
    pad.double()
    bias = pad.heads[0].norm.bias
    with torch.no_grad():
        pad.heads[0].norm.weight.zero_()

    def value_at(b: float) -> torch.Tensor:
        with torch.no_grad():
            bias.fill_(b)
        return pad([s], [t])[0]

    best = math.log(((s - t) ** 2).mean().item())
    value_at(best).backward()
    assert abs(bias.grad.item()) < 1e-9
    assert value_at(best).item() < min(value_at(best - 0.5).item(), value_at(best + 0.5).item())


def test_pad_l2_gradients_reach_the_student_and_its_head_never_the_teacher():
    torch.manual_seed(0)
    pad = PADL2()
    pad.bind([(4,), (3, 2, 2)], [(4,), (3, 2, 2)])
    s = [torch.randn(5, 4, requires_grad=True), torch.randn(5, 3, 2, 2, requires_grad=True)]
    t = [torch.randn(5, 4, requires_grad=True), torch.randn(5, 3, 2, 2, requires_grad=True)]
    values = pad(s, t)
    assert len(values) == 2  # one value per pair, logged under each pair's name
    sum(values).backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in s)
    assert all(x.grad is None for x in t)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pad.parameters())


def test_pad_l2_refuses_bad_settings_and_shapes():
    with pytest.raises(ConfigError, match="per is 'element'"):
        PADL2(per="channel")
    with pytest.raises(ConfigError, match="eps must be > 0"):
        PADL2(eps=0.0)
    with pytest.raises(ConfigError, match="adapter auto"):
        PADL2().bind([(4,)], [(8,)])
    with pytest.raises(ConfigError, match="adapter auto"):
        PADL2().bind([(2, 3, 4, 4)], [(2, 3, 4, 4)])
    with pytest.raises(ConfigError, match="example_input"):
        PADL2()([torch.randn(2, 4)], [torch.randn(2, 4)])
