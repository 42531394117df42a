"""CWD, ICKD's channel similarity, affinity distillation and KTAAD, each against a written-out
implementation of its paper's formula, with the invariances and minima it has, where its
gradients go, and the errors its misuse raises."""

import math

import numpy as np
import pytest
import torch

from featkd.errors import ConfigError
from featkd.losses.base import LOSSES
from featkd.losses.channel import (
    AffinityDistillation,
    ChannelSimilarity,
    ChannelWiseDistillation,
    KnowledgeAdaptation,
)


def t64(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64)


def test_the_four_losses_are_registered():
    assert {LOSSES.get(n) for n in ("cwd", "chsim", "affinity", "ktaad")} == {
        ChannelWiseDistillation, ChannelSimilarity, AffinityDistillation, KnowledgeAdaptation}


# -- CWD ---------------------------------------------------------------------------------


def cwd_reference(s: np.ndarray, t: np.ndarray, temperature: float) -> float:
    batch, channels = s.shape[:2]
    total = 0.0
    for b in range(batch):
        for c in range(channels):
            ys, yt = s[b, c].ravel() / temperature, t[b, c].ravel() / temperature
            ps = np.exp(ys) / np.exp(ys).sum()
            pt = np.exp(yt) / np.exp(yt).sum()
            total += sum(pt[i] * math.log(pt[i] / ps[i]) for i in range(len(pt)))
    return temperature**2 * total / (batch * channels)


@pytest.mark.parametrize("shape", [(3, 4, 3, 5), (2, 3, 7)], ids=["map", "sequence"])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_cwd_is_the_channel_wise_kl_over_positions(shape, temperature):
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(2, *shape)) * 2
    value = ChannelWiseDistillation(temperature)(t64(s), t64(t)).item()
    assert value == pytest.approx(cwd_reference(s, t, temperature), rel=1e-10)


def test_cwd_invariances_and_minimum():
    torch.manual_seed(0)
    s, t = torch.randn(2, 2, 3, 4, 4, dtype=torch.float64)
    cwd = ChannelWiseDistillation()
    base = cwd(s, t).item()
    assert base > 0
    # a constant added to a channel's map leaves its softmax over positions unchanged
    shift = torch.randn(2, 3, 1, 1, dtype=torch.float64)
    assert cwd(s + shift, t - 2 * shift).item() == pytest.approx(base, rel=1e-10)
    # positions permuted alike on both sides, or channels permuted alike, change nothing
    perm = torch.randperm(16)
    flat = lambda x: x.flatten(2)[:, :, perm].reshape(x.shape)  # noqa: E731
    assert cwd(flat(s), flat(t)).item() == pytest.approx(base, rel=1e-10)
    channels = torch.tensor([2, 0, 1])
    assert cwd(s[:, channels], t[:, channels]).item() == pytest.approx(base, rel=1e-10)
    # minimum 0 at the teacher's maps (up to those shifts); moving one position's value changes it
    assert cwd(t + shift, t).item() == pytest.approx(0.0, abs=1e-12)
    moved = t.clone()
    moved[0, 0, 0, 0] += 1.0
    assert cwd(moved, t).item() > 1e-6


def test_cwd_reaches_the_student_never_the_teacher():
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.randn(2, 3, 4, 4, requires_grad=True)
    ChannelWiseDistillation()(s, t).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None


def test_cwd_refuses_bad_temperatures_and_shapes():
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ConfigError, match="cwd: temperature must be > 0"):
            ChannelWiseDistillation(bad)
    with pytest.raises(ConfigError, match="adapter: auto"):
        ChannelWiseDistillation()(torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4))
    with pytest.raises(ConfigError, match=r"conv maps \(C, H, W\)"):
        ChannelWiseDistillation().bind([(16,)], [(16,)])
    with pytest.raises(ConfigError, match="batches of conv maps"):
        ChannelWiseDistillation()(torch.randn(2, 16), torch.randn(2, 16))


# -- ICKD (chsim) ------------------------------------------------------------------------


def chsim_reference(s: np.ndarray, t: np.ndarray) -> float:
    def correlation(f):
        f = f.reshape(f.shape[0], -1)
        g = np.array([[sum(f[i, p] * f[j, p] for p in range(f.shape[1])) for j in range(len(f))]
                      for i in range(len(f))])
        return g / np.sqrt((g**2).sum(axis=1, keepdims=True))

    batch, channels = s.shape[:2]
    return sum(((correlation(s[b]) - correlation(t[b])) ** 2).sum() for b in range(batch)) / (batch * channels)


def test_chsim_is_the_normalized_inter_channel_correlation_gap():
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=(3, 4, 3, 3)), rng.normal(size=(3, 4, 5, 2))  # spatial sizes may differ
    value = ChannelSimilarity(embed_kernel=None)([t64(s)], [t64(t)])[0].item()
    assert value == pytest.approx(chsim_reference(s, t), rel=1e-10)


def test_chsim_with_fewer_positions_than_channels_is_the_same_distance_and_gradient():
    """Deep maps (512 channels at 4x4) go through the positions' Gram matrices instead of the
    (C, C) ones: the value and the student's gradient must not change, dead channels included."""
    from featkd.losses.channel import inter_channel_correlation

    rng = np.random.default_rng(2)
    s_np, t_np = rng.normal(size=(3, 12, 2, 2)), rng.normal(size=(3, 12, 3, 2))  # 4 and 6 positions
    chsim = ChannelSimilarity(embed_kernel=None)
    assert chsim([t64(s_np)], [t64(t_np)])[0].item() == pytest.approx(chsim_reference(s_np, t_np), rel=1e-10)
    s_np[:, 5] = 0.0  # a dead channel: its row of G is 0, as F.normalize leaves it
    t_np[1, 7] = 0.0
    s = t64(s_np).requires_grad_()
    value = chsim([s], [t64(t_np)])[0]
    (grad,) = torch.autograd.grad(value, s)
    direct = t64(s_np).requires_grad_()
    g_s, g_t = inter_channel_correlation(direct), inter_channel_correlation(t64(t_np))
    expected = (g_s - g_t).pow(2).sum() / (3 * 12)
    expected.backward()
    assert value.item() == pytest.approx(expected.item(), rel=1e-10)
    np.testing.assert_allclose(grad.numpy(), direct.grad.numpy(), rtol=1e-8, atol=1e-12)
    assert chsim([t64(t_np)], [t64(t_np)])[0].item() == pytest.approx(0, abs=1e-12)


def test_chsim_applies_its_embedding_to_the_student_first():
    torch.manual_seed(0)
    chsim = ChannelSimilarity()
    chsim.bind([(3, 4, 4)], [(5, 2, 2)])
    chsim = chsim.double().eval()  # eval: BN on its running statistics, so the embedding is a fixed map
    s, t = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 5, 2, 2, dtype=torch.float64)
    with torch.no_grad():
        embedded = chsim.embeds[0](s).numpy()
    assert embedded.shape == (2, 5, 4, 4)
    assert chsim([s], [t])[0].item() == pytest.approx(chsim_reference(embedded, t.numpy()), rel=1e-10)
    assert chsim.embeds[0][0].kernel_size == (1, 1) and chsim.embeds[0][0].bias is None


def test_chsim_invariances_and_minimum():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 5, 4, 4, dtype=torch.float64)
    chsim = ChannelSimilarity(embed_kernel=None)
    base = chsim([s], [t])[0].item()
    assert base > 0
    scale = torch.rand(3, 1, 1, 1, dtype=torch.float64) + 0.5  # a positive scale per sample
    assert chsim([s * scale], [t])[0].item() == pytest.approx(base, rel=1e-10)
    perm = torch.randperm(16)  # the student's positions permuted: its Gram matrix is the same
    assert chsim([s.flatten(2)[:, :, perm].reshape(s.shape)], [t])[0].item() == pytest.approx(base, rel=1e-10)
    channels = torch.tensor([4, 2, 0, 1, 3])  # channels permuted alike on both sides
    assert chsim([s[:, channels]], [t[:, channels]])[0].item() == pytest.approx(base, rel=1e-10)
    assert chsim([2.5 * t], [t])[0].item() == pytest.approx(0.0, abs=1e-12)
    rescaled = t.clone()
    rescaled[:, 0] *= 3.0  # one channel scaled alone does change the correlations
    assert chsim([rescaled], [t])[0].item() > 1e-6


def test_chsim_trains_the_student_and_its_embedding_never_the_teacher():
    torch.manual_seed(0)
    chsim = ChannelSimilarity(embed_kernel=3)
    chsim.bind([(3, 4, 4), (4, 2, 2)], [(6, 4, 4), (8, 2, 2)])  # one embedding per layer pair
    students = [torch.randn(4, 3, 4, 4, requires_grad=True), torch.randn(4, 4, 2, 2, requires_grad=True)]
    teachers = [torch.randn(4, 6, 4, 4, requires_grad=True), torch.randn(4, 8, 2, 2, requires_grad=True)]
    values = chsim(students, teachers)
    assert len(values) == 2
    sum(values).backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in students)
    assert all(t.grad is None for t in teachers)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in chsim.parameters())
    assert chsim.embeds[1][0].kernel_size == (3, 3) and chsim.embeds[1][0].out_channels == 8


def test_chsim_refuses_unequal_channels_bad_kernels_and_unbound_use():
    with pytest.raises(ConfigError, match="student has 4 channels and the teacher 6.*embed_kernel"):
        ChannelSimilarity(embed_kernel=None).bind([(4, 2, 2)], [(6, 2, 2)])
    with pytest.raises(ConfigError, match="student has 4 channels and the teacher 6"):
        ChannelSimilarity(embed_kernel=None)([torch.randn(2, 4, 2, 2)], [torch.randn(2, 6, 2, 2)])
    for bad in (0, 2, -1):
        with pytest.raises(ConfigError, match="embed_kernel must be an odd kernel size"):
            ChannelSimilarity(embed_kernel=bad)
    with pytest.raises(ConfigError, match="example_input"):
        ChannelSimilarity()([torch.randn(2, 4, 2, 2)], [torch.randn(2, 4, 2, 2)])
    with pytest.raises(ConfigError, match=r"conv maps \(C, H, W\)"):
        ChannelSimilarity().bind([(16,)], [(32,)])


# -- affinity ----------------------------------------------------------------------------


def affinity_reference(s: np.ndarray, t: np.ndarray) -> float:
    def affinity(f):
        vectors = f.reshape(f.shape[0], -1).T  # one vector across channels per position
        m = len(vectors)
        return np.array([[vectors[i] @ vectors[j] / (np.linalg.norm(vectors[i]) * np.linalg.norm(vectors[j])) / m
                          for j in range(m)] for i in range(m)])

    return float(np.mean([np.sqrt(((affinity(a) - affinity(b)) ** 2).sum()) for a, b in zip(s, t)]))


def test_affinity_is_the_gap_between_position_cosine_matrices():
    rng = np.random.default_rng(2)
    s, t = rng.normal(size=(3, 3, 4, 3)), rng.normal(size=(3, 7, 4, 3))  # channel counts may differ
    assert AffinityDistillation()(t64(s), t64(t)).item() == pytest.approx(affinity_reference(s, t), rel=1e-10)
    seq_s, seq_t = rng.normal(size=(2, 3, 6)), rng.normal(size=(2, 5, 6))
    assert AffinityDistillation()(t64(seq_s), t64(seq_t)).item() == pytest.approx(
        affinity_reference(seq_s, seq_t), rel=1e-10)


def test_affinity_invariances_and_minimum():
    torch.manual_seed(0)
    s, t = torch.randn(2, 4, 3, 4, 4, dtype=torch.float64)
    loss = AffinityDistillation()
    base = loss(s, t).item()
    assert base > 0
    per_position = torch.rand(4, 1, 4, 4, dtype=torch.float64) + 0.5  # cosines ignore each vector's length
    assert loss(s * per_position, t).item() == pytest.approx(base, rel=1e-10)
    rotation, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))  # any orthogonal map of channels
    rotated = torch.einsum("dc,bchw->bdhw", rotation, s)
    assert loss(rotated, t).item() == pytest.approx(base, rel=1e-10)
    perm = torch.randperm(16)  # positions permuted alike on both sides
    flat = lambda x: x.flatten(2)[:, :, perm].reshape(x.shape)  # noqa: E731
    assert loss(flat(s), flat(t)).item() == pytest.approx(base, rel=1e-10)
    assert loss(t * per_position, t).item() == pytest.approx(0.0, abs=1e-12)
    assert loss(flat(t), t).item() > 1e-6  # the student's positions alone permuted: a real change


def test_affinity_pools_the_larger_map_and_reaches_only_the_student():
    s = torch.randn(2, 3, 8, 8, requires_grad=True)
    t = torch.randn(2, 5, 4, 4, requires_grad=True)
    value = AffinityDistillation()(s, t)
    pooled = torch.nn.functional.avg_pool2d(s.detach(), 2)
    assert value.item() == pytest.approx(AffinityDistillation()(pooled, t.detach()).item(), rel=1e-6)
    value.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None


def test_affinity_refuses_vectors():
    with pytest.raises(ConfigError, match=r"affinity: needs conv maps"):
        AffinityDistillation().bind([(16,)], [(32,)])
    with pytest.raises(ConfigError, match="affinity: needs batches of conv maps"):
        AffinityDistillation()(torch.randn(2, 16), torch.randn(2, 32))


# -- KTAAD -------------------------------------------------------------------------------


def bound_ktaad(**kwargs) -> KnowledgeAdaptation:
    torch.manual_seed(0)
    loss = KnowledgeAdaptation(**kwargs)
    loss.bind([(3, 4, 4)], [(8, 4, 4)])
    return loss.double()


def test_ktaad_builds_the_paper_s_parts():
    loss = bound_ktaad()
    assert loss.translator.encoder[-3].out_channels == 4  # rate 0.5 of the teacher's 8 channels
    assert loss.translator.decoder[-3].out_channels == 8
    conv, norm, act = loss.feature_adapter
    assert conv.kernel_size == (3, 3) and conv.out_channels == 4 and isinstance(norm, torch.nn.BatchNorm2d)
    assert isinstance(act, torch.nn.ReLU)
    assert loss.affinity_adapter.kernel_size == (3, 3) and loss.affinity_adapter.out_channels == 4
    assert {id(p) for p in loss.trained_parameters()} == {
        id(p) for m in (loss.feature_adapter, loss.affinity_adapter) for p in m.parameters()}
    assert {id(p) for p in loss.pretrain_parameters()} == {id(p) for p in loss.translator.parameters()}
    assert KnowledgeAdaptation.pretrain.trains == ("loss",) and not KnowledgeAdaptation.pretrain.uses_student


@pytest.mark.parametrize("p", [1, 2])
def test_ktaad_matches_its_adapt_and_affinity_formulas(p):
    loss = bound_ktaad(p=p).eval()
    s, t = torch.randn(3, 3, 4, 4, dtype=torch.float64), torch.randn(3, 8, 4, 4, dtype=torch.float64)
    parts = loss(s, t)
    with torch.no_grad():
        factor = loss.translator.encoder(t).numpy()
        adapted = loss.feature_adapter(s).numpy()
        for_affinity = loss.affinity_adapter(s).numpy()
    a = adapted.reshape(3, -1)
    e = factor.reshape(3, -1)
    diff = a / np.linalg.norm(a, axis=1, keepdims=True) - e / np.linalg.norm(e, axis=1, keepdims=True)
    adapt = np.abs(diff).mean() if p == 1 else np.linalg.norm(diff, axis=1).mean()
    assert parts["adapt"].item() == pytest.approx(50.0 * adapt, rel=1e-10)
    assert parts["affinity"].item() == pytest.approx(affinity_reference(for_affinity, factor), rel=1e-10)


def test_ktaad_adapt_distance_is_scale_free_with_its_minimum_at_the_factor():
    loss = bound_ktaad()
    e = torch.rand(2, 4, 4, 4, dtype=torch.float64)
    a = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    scale = torch.tensor([3.0, 0.2], dtype=torch.float64).view(2, 1, 1, 1)
    assert loss.adapt_distance(a * scale, e / scale).item() == pytest.approx(loss.adapt_distance(a, e).item(),
                                                                            rel=1e-10)
    assert loss.adapt_distance(7.0 * e, e).item() == pytest.approx(0.0, abs=1e-12)
    assert loss.adapt_distance(a, e).item() > 1e-3


def test_ktaad_trains_its_adapters_and_the_student_with_the_encoder_fixed():
    loss = bound_ktaad().float().train()
    s = torch.randn(4, 3, 4, 4, requires_grad=True)
    t = torch.randn(4, 8, 4, 4, requires_grad=True)
    running = loss.translator.encoder[1].running_mean.clone()
    sum(loss(s, t).values()).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.trained_parameters())
    assert all(p.grad is None for p in loss.translator.parameters())
    # the encoder ran on its running statistics and left them alone, in a training step too
    assert torch.equal(loss.translator.encoder[1].running_mean, running) and loss.translator.training


def test_ktaad_pretraining_is_reconstruction_plus_sparse_codes():
    loss = bound_ktaad(sparsity=1e-3).train()
    t = torch.relu(torch.randn(3, 8, 4, 4, dtype=torch.float64))
    value = loss.pretrain_loss(None, t)
    code = loss.translator.encoder(t)
    reconstruction = loss.translator.decoder(code)
    l1 = code.abs().flatten(1).sum(1).mean()
    expected = ((reconstruction - t) ** 2).mean() + 1e-3 * l1
    assert value.item() == pytest.approx(expected.item(), rel=1e-10)
    loss.zero_grad()
    value.backward()
    assert all(p.grad is not None for p in loss.translator.parameters())
    assert all(p.grad is None for p in loss.trained_parameters())


def test_ktaad_parts_can_be_left_out():
    adapt_only = bound_ktaad(affinity_weight=0.0)
    assert adapt_only.affinity_adapter is None
    assert list(adapt_only(torch.randn(2, 3, 4, 4, dtype=torch.float64),
                           torch.randn(2, 8, 4, 4, dtype=torch.float64))) == ["adapt"]
    affinity_only = bound_ktaad(adapt_weight=0.0, affinity_weight=2.0).eval()
    s, t = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 8, 4, 4, dtype=torch.float64)
    parts = affinity_only(s, t)
    assert list(parts) == ["affinity"] and affinity_only.feature_adapter is None
    with torch.no_grad():
        single = AffinityDistillation()(affinity_only.affinity_adapter(s), affinity_only.translator.encoder(t))
    assert parts["affinity"].item() == pytest.approx(2.0 * single.item(), rel=1e-10)


@pytest.mark.parametrize("kwargs, message", [
    ({"rate": 0.0}, "rate"), ({"rate": 1.5}, "rate"), ({"p": 3}, "p .* is 1 or 2"), ({"q": 0.0}, "q .* must be > 0"),
    ({"adapt_weight": -1.0}, "adapt_weight"), ({"adapt_weight": 0.0, "affinity_weight": 0.0}, "adapt_weight.*not both 0"),
    ({"sparsity": -1e-7}, "sparsity"),
])
def test_ktaad_refuses_bad_hyper_parameters(kwargs, message):
    with pytest.raises(ConfigError, match=f"ktaad: {message}"):
        KnowledgeAdaptation(**kwargs)


def test_ktaad_refuses_bad_shapes_and_unbound_use():
    with pytest.raises(ConfigError, match="one layer pair"):
        KnowledgeAdaptation().bind([(3, 4, 4), (4, 2, 2)], [(8, 4, 4), (16, 2, 2)])
    with pytest.raises(ConfigError, match="ktaad: needs conv maps"):
        KnowledgeAdaptation().bind([(16,)], [(32,)])
    with pytest.raises(ConfigError, match="example_input"):
        KnowledgeAdaptation()(torch.randn(2, 3, 4, 4), torch.randn(2, 8, 4, 4))
    with pytest.raises(ConfigError, match="example_input"):
        KnowledgeAdaptation().pretrain_loss(None, torch.randn(2, 8, 4, 4))
