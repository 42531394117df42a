"""The rest of the zoo, each against an independent implementation of its paper's formula,
with the invariances it has, its minimum, and where its gradients go."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from featkd.errors import ConfigError
from featkd.losses import (
    LOSSES, ActivationBoundaries, CorrelationCongruence, CRDLoss, DISTLoss, DKDLoss, FactorTransfer, FeaturePairLoss,
    FSPLoss, LogitMSE, NSTLoss, ProbabilisticKT, SimilarityPreserving, VIDLoss, WithIndex,
)
from featkd.losses.crd import dataset_targets
from featkd.losses.deit import DistillationTokenLoss


def np_softmax(z: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    e = np.exp((z - z.max(axis=1, keepdims=True)) / temperature)
    return e / e.sum(axis=1, keepdims=True)


def t64(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64)


# -- logit MSE ---------------------------------------------------------------------------


def test_logit_mse_and_its_ensemble_form():
    rng = np.random.default_rng(0)
    s, t1, t2 = rng.normal(size=(3, 4, 5))
    assert LogitMSE()(t64(s), t64(t1)).item() == pytest.approx(((s - t1) ** 2).mean())
    assert LogitMSE()(t64(s), (t64(t1), t64(t2))).item() == pytest.approx(((s - (t1 + t2) / 2) ** 2).mean())
    assert LogitMSE()(t64(t1), t64(t1)).item() == 0.0


# -- DKD ---------------------------------------------------------------------------------


def dkd_reference(s, t, y, alpha, beta, temperature):
    p_s, p_t = np_softmax(s, temperature), np_softmax(t, temperature)
    tckd = nckd = 0.0
    for i, gt in enumerate(y):
        b_s = np.array([p_s[i, gt], 1 - p_s[i, gt]])
        b_t = np.array([p_t[i, gt], 1 - p_t[i, gt]])
        tckd += (b_t * np.log(b_t / b_s)).sum()
        q_s = np.delete(p_s[i], gt) / (1 - p_s[i, gt])
        q_t = np.delete(p_t[i], gt) / (1 - p_t[i, gt])
        nckd += (q_t * np.log(q_t / q_s)).sum()
    n = len(y)
    return alpha * tckd / n * temperature**2, beta * nckd / n * temperature**2


def test_dkd_matches_the_decoupled_formula():
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=(2, 6, 5)) * 2
    y = np.array([0, 3, 4, 1, 1, 2])
    loss = DKDLoss(alpha=1.5, beta=8.0, temperature=3.0, warmup=0)
    parts = loss(t64(s), t64(t), torch.tensor(y))
    tckd, nckd = dkd_reference(s, t, y, 1.5, 8.0, 3.0)
    assert parts["tckd"].item() == pytest.approx(tckd, rel=1e-9)
    assert parts["nckd"].item() == pytest.approx(nckd, rel=1e-9)


def test_dkd_decomposes_kd_as_the_paper_states():
    # KD = TCKD + (1 - p^t_gt) * NCKD, sample by sample (alpha = beta = 1)
    rng = np.random.default_rng(2)
    s, t = rng.normal(size=(2, 1, 7))
    y = np.array([2])
    temperature = 2.0
    p_s, p_t = np_softmax(s, temperature), np_softmax(t, temperature)
    kd = (p_t * np.log(p_t / p_s)).sum() * temperature**2
    parts = DKDLoss(alpha=1.0, beta=1.0, temperature=temperature, warmup=0)(t64(s), t64(t), torch.tensor(y))
    tckd, nckd = parts["tckd"].item(), parts["nckd"].item()
    assert tckd + (1 - p_t[0, 2]) * nckd == pytest.approx(kd, rel=1e-9)


def test_dkd_warm_up_needs_the_epoch_and_ramps_linearly():
    rng = np.random.default_rng(3)
    s, t = t64(rng.normal(size=(4, 5))), t64(rng.normal(size=(4, 5)))
    y = torch.tensor([0, 1, 2, 3])
    loss = DKDLoss(warmup=20)
    with pytest.raises(ConfigError, match="set_epoch"):
        loss(s, t, y)
    full = DKDLoss(warmup=0)(s, t, y)
    loss.set_epoch(5)
    quarter = loss(s, t, y)
    loss.set_epoch(40)
    after = loss(s, t, y)
    for key in full:
        assert quarter[key].item() == pytest.approx(full[key].item() / 4)
        assert after[key].item() == pytest.approx(full[key].item())


def test_dkd_is_zero_for_identical_logits_and_reaches_only_the_student():
    s = torch.randn(4, 6, requires_grad=True)
    t = s.detach().clone().requires_grad_()
    y = torch.tensor([1, 0, 5, 2])
    parts = DKDLoss(warmup=0)(s, t, y)
    assert sum(parts.values()).item() == pytest.approx(0.0, abs=1e-6)
    sum(DKDLoss(warmup=0)(s, torch.randn(4, 6), y).values()).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None


# -- DIST --------------------------------------------------------------------------------


def pearson_rows(a, b):
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_dist_matches_the_inter_and_intra_class_formula():
    rng = np.random.default_rng(4)
    s, t = rng.normal(size=(2, 8, 5))
    temperature = 4.0
    p_s, p_t = np_softmax(s, temperature), np_softmax(t, temperature)
    inter = 1 - pearson_rows(p_s, p_t).mean()
    intra = 1 - pearson_rows(p_s.T, p_t.T).mean()
    parts = DISTLoss(beta=2.0, gamma=3.0, temperature=temperature)(t64(s), t64(t))
    assert parts["inter"].item() == pytest.approx(2.0 * 16 * inter, rel=1e-6)
    assert parts["intra"].item() == pytest.approx(3.0 * 16 * intra, rel=1e-6)


def test_dist_invariances_and_minimum():
    torch.manual_seed(0)
    s, t = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    dist = DISTLoss()
    base = dist(s, t)
    shifted = dist(s + torch.randn(6, 1, dtype=torch.float64), t)  # a per-row shift leaves softmax unchanged
    for key in base:
        assert shifted[key].item() == pytest.approx(base[key].item(), rel=1e-9)
    assert sum(dist(t, t).values()).item() == pytest.approx(0.0, abs=1e-5)  # up to the Pearson eps


# -- NST ---------------------------------------------------------------------------------


def nst_reference(s, t):
    total = 0.0
    for fs, ft in zip(s, t):
        fs = fs.reshape(fs.shape[0], -1)
        ft = ft.reshape(ft.shape[0], -1)
        fs = fs / np.linalg.norm(fs, axis=1, keepdims=True)
        ft = ft / np.linalg.norm(ft, axis=1, keepdims=True)
        k = lambda a, b: np.mean([(x @ y) ** 2 for x in a for y in b])  # noqa: E731
        total += k(ft, ft) + k(fs, fs) - 2 * k(fs, ft)
    return total / len(s)


def test_nst_matches_the_squared_mmd_with_a_polynomial_kernel():
    rng = np.random.default_rng(5)
    s, t = rng.normal(size=(3, 4, 3, 3)), rng.normal(size=(3, 6, 3, 3))
    assert NSTLoss()(t64(s), t64(t)).item() == pytest.approx(nst_reference(s, t), rel=1e-9)


def test_nst_invariances_and_minimum():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    base = NSTLoss()(s, t)
    scale = torch.rand(1, 5, 1, 1, dtype=torch.float64) + 0.5
    assert NSTLoss()(s[:, torch.randperm(5)] * scale, t).item() == pytest.approx(base.item(), rel=1e-9)
    assert NSTLoss()(t, t).item() == pytest.approx(0.0, abs=1e-12)


# -- VID ---------------------------------------------------------------------------------


def test_vid_is_the_gaussian_negative_log_likelihood_with_learned_variance():
    torch.manual_seed(0)
    vid = VIDLoss(init_variance=5.0)
    vid.bind([(3, 4, 4)], [(6, 4, 4)])
    torch.testing.assert_close(vid.variances()[0], torch.full((6,), 5.0))
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 6, 4, 4)
    value = vid([s], [t])[0]
    mean = vid.regressors[0](s).detach().numpy()
    var = vid.variances()[0].detach().numpy().reshape(1, -1, 1, 1)
    expected = (0.5 * ((mean - t.numpy()) ** 2 / var + np.log(var))).mean()
    assert value.item() == pytest.approx(float(expected), rel=1e-5)


def test_vid_learns_its_variances_and_regressor_never_the_teacher():
    torch.manual_seed(0)
    vid = VIDLoss()
    vid.bind([(3, 8, 8)], [(6, 4, 4)])  # larger student map is pooled
    s = torch.randn(2, 3, 8, 8, requires_grad=True)
    t = torch.randn(2, 6, 4, 4, requires_grad=True)
    vid([s], [t])[0].backward()
    assert vid.log_scales[0].grad is not None and vid.log_scales[0].grad.abs().sum() > 0
    assert all(p.grad is not None for p in vid.regressors.parameters())
    assert s.grad.abs().sum() > 0 and t.grad is None
    assert {n for n, _ in vid.named_parameters()} >= {"log_scales.0"}


def test_vid_variance_optimum_is_the_mean_squared_error():
    # d/d(var) of 0.5 * (e^2 / var + log var) vanishes at var = e^2
    vid = VIDLoss(init_variance=2.0)
    vid.bind([(1, 2, 2)], [(1, 2, 2)])
    with torch.no_grad():
        for p in vid.regressors.parameters():
            p.zero_()  # mean prediction 0: the squared error is t^2
    t = torch.full((1, 1, 2, 2), math.sqrt(2.0))
    vid([torch.zeros(1, 1, 2, 2)], [t])[0].backward()
    assert abs(vid.log_scales[0].grad.item()) < 1e-4


# -- FT ----------------------------------------------------------------------------------


def test_factor_transfer_matches_its_formula_and_trains_only_the_translator():
    torch.manual_seed(0)
    ft = FactorTransfer()
    ft.bind([(4, 4, 4)], [(8, 4, 4)])
    ft.eval()
    s, t = torch.randn(3, 4, 4, 4, requires_grad=True), torch.randn(3, 8, 4, 4)
    value = ft(s, t)
    with torch.no_grad():
        f_s = ft.translator(s).flatten(1).numpy()
        f_t = ft.paraphraser.encoder(t).flatten(1).numpy()
    f_s /= np.linalg.norm(f_s, axis=1, keepdims=True)
    f_t /= np.linalg.norm(f_t, axis=1, keepdims=True)
    assert value.item() == pytest.approx(float(np.abs(f_s - f_t).mean()), rel=1e-5)
    value.backward()
    assert all(p.grad is not None for p in ft.translator.parameters())
    assert all(p.grad is None for p in ft.paraphraser.parameters())
    assert f_s.shape[1] == 4 * 16  # the factor has rate x teacher channels


def test_factor_transfer_pretraining_reconstructs_the_teacher_map():
    torch.manual_seed(0)
    ft = FactorTransfer()
    ft.bind([(4, 4, 4)], [(8, 4, 4)])
    params = list(ft.pretrain_parameters())
    assert {id(p) for p in params} == {id(p) for p in ft.paraphraser.parameters()}
    teacher = torch.relu(torch.randn(16, 8, 4, 4))
    optimizer = torch.optim.Adam(params, lr=1e-2)
    first = ft.pretrain_loss(None, teacher).item()
    for _ in range(150):
        optimizer.zero_grad()
        ft.pretrain_loss(None, teacher).backward()
        optimizer.step()
    assert ft.pretrain_loss(None, teacher).item() < 0.4 * first
    assert FactorTransfer.pretrain.trains == ("loss",) and not FactorTransfer.pretrain.uses_student


# -- AB ----------------------------------------------------------------------------------


def ab_reference(s, t, margin):
    loss = np.where(t > 0, np.maximum(margin - s, 0) ** 2, np.maximum(margin + s, 0) ** 2)
    return loss.sum() / len(s)


def test_activation_boundaries_hinge_and_layer_weights():
    rng = np.random.default_rng(6)
    s1, t1 = rng.normal(size=(2, 3, 2, 4, 4))
    s2, t2 = rng.normal(size=(2, 3, 5, 2, 2))
    ab = ActivationBoundaries(margin=0.7, scale=1.0)
    values = ab([t64(s1), t64(s2)], [t64(t1), t64(t2)])
    assert values[0].item() == pytest.approx(0.5 * ab_reference(s1, t1, 0.7))  # 2^(0 - 2 + 1)
    assert values[1].item() == pytest.approx(1.0 * ab_reference(s2, t2, 0.7))


def test_activation_boundaries_vanish_once_beyond_the_margin():
    t = torch.randn(2, 3, 4, 4)
    s = torch.where(t > 0, 1.5, -1.5)
    assert ActivationBoundaries(margin=1.0)([s], [t])[0].item() == 0.0


# -- FSP ---------------------------------------------------------------------------------


def fsp_reference(maps):
    out = []
    for a, b in zip(maps[:-1], maps[1:]):
        if a.shape[-1] > b.shape[-1]:  # pool the larger map (2x2 average)
            a = a.reshape(*a.shape[:2], b.shape[2], 2, b.shape[3], 2).mean(axis=(3, 5))
        fa, fb = a.reshape(*a.shape[:2], -1), b.reshape(*b.shape[:2], -1)
        out.append(np.einsum("bip,bjp->bij", fa, fb) / fa.shape[-1])
    return out


def test_fsp_matches_the_gram_between_consecutive_layers():
    rng = np.random.default_rng(7)
    s = [rng.normal(size=(2, 3, 8, 8)), rng.normal(size=(2, 4, 4, 4)), rng.normal(size=(2, 4, 4, 4))]
    t = [rng.normal(size=(2, 3, 8, 8)), rng.normal(size=(2, 4, 4, 4)), rng.normal(size=(2, 4, 4, 4))]
    expected = sum(((gs - gt) ** 2).mean() for gs, gt in zip(fsp_reference(s), fsp_reference(t)))
    assert FSPLoss()([t64(a) for a in s], [t64(a) for a in t]).item() == pytest.approx(expected, rel=1e-9)
    assert FSPLoss()([t64(a) for a in t], [t64(a) for a in t]).item() == 0.0


def test_fsp_refuses_unequal_channels_and_single_layers():
    with pytest.raises(ConfigError, match="adapter: auto"):
        FSPLoss().bind([(4, 8, 8), (8, 4, 4)], [(16, 8, 8), (32, 4, 4)])
    with pytest.raises(ConfigError, match="at least two layers"):
        FSPLoss().bind([(4, 8, 8)], [(4, 8, 8)])


# -- SP, CC, PKT -------------------------------------------------------------------------


def sp_reference(s, t):
    def g(x):
        x = x.reshape(len(x), -1)
        m = x @ x.T
        return m / np.linalg.norm(m, axis=1, keepdims=True)

    return ((g(s) - g(t)) ** 2).sum() / len(s) ** 2


def test_similarity_preserving_formula_and_invariances():
    rng = np.random.default_rng(8)
    s, t = rng.normal(size=(6, 3, 2, 2)), rng.normal(size=(6, 7))
    sp = SimilarityPreserving()
    base = sp(t64(s), t64(t))
    assert base.item() == pytest.approx(sp_reference(s, t), rel=1e-9)
    perm = torch.randperm(6)
    assert sp(t64(s)[perm], t64(t)[perm]).item() == pytest.approx(base.item(), rel=1e-9)
    assert sp(4.2 * t64(s), t64(t)).item() == pytest.approx(base.item(), rel=1e-9)
    assert sp(t64(t), t64(t)).item() == pytest.approx(0.0, abs=1e-12)


def test_correlation_congruence_is_a_taylor_expanded_rbf_kernel():
    rng = np.random.default_rng(9)
    s, t = rng.normal(size=(5, 4)), rng.normal(size=(5, 9))
    gamma = 0.4
    # with a high order the Taylor series is the RBF kernel exp(-gamma ||x - y||^2) on unit vectors
    def rbf(x):
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        d2 = ((x[:, None] - x[None]) ** 2).sum(-1)
        return np.exp(-gamma * d2)

    expected = ((rbf(s) - rbf(t)) ** 2).sum() / 25
    assert CorrelationCongruence(gamma, order=20)(t64(s), t64(t)).item() == pytest.approx(expected, rel=1e-9)
    cc = CorrelationCongruence()
    base = cc(t64(s), t64(t))
    assert cc(3.0 * t64(s), t64(t)).item() == pytest.approx(base.item(), rel=1e-9)
    assert cc(t64(t), t64(t)).item() == 0.0


def pkt_reference(s, t, eps=1e-7):
    def p(x):
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        sim = (x @ x.T + 1) / 2
        return sim / sim.sum(1, keepdims=True)

    ps, pt = p(s), p(t)
    return (pt * np.log((pt + eps) / (ps + eps))).mean()


def test_pkt_formula_invariances_and_minimum():
    rng = np.random.default_rng(10)
    s, t = rng.normal(size=(7, 3)), rng.normal(size=(7, 5))
    pkt = ProbabilisticKT()
    base = pkt(t64(s), t64(t))
    assert base.item() == pytest.approx(pkt_reference(s, t), rel=1e-9)
    assert pkt(2.5 * t64(s), t64(t)).item() == pytest.approx(base.item(), rel=1e-9)
    assert pkt(t64(t), t64(t)).item() == pytest.approx(0.0, abs=1e-12)


# pair losses on conv maps that take maps of different channel counts as they are (no adapter,
# no learned parts); the transformer losses and DeiT's terms on logits have their own tests
# (test_losses_language.py, test_deit.py)
UNADAPTED_PAIR_LOSSES = [n for n in LOSSES.names() if issubclass(LOSSES.get(n), FeaturePairLoss)
                         and not LOSSES.get(n).has_shape_dependent_parameters and not LOSSES.get(n).needs_same_shape
                         and not LOSSES.get(n).batch_keys and LOSSES.get(n).example.models == "cnn"
                         and not issubclass(LOSSES.get(n), DistillationTokenLoss)]


@pytest.mark.parametrize("name", UNADAPTED_PAIR_LOSSES)
def test_relation_losses_reach_the_student_never_the_teacher(name):
    loss = LOSSES.get(name)()
    s = torch.randn(4, 3, 2, 2, requires_grad=True)
    t = torch.randn(4, 5, 2, 2, requires_grad=True)
    value = loss(s, t)
    (sum(value.values()) if isinstance(value, dict) else value).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None


# -- CRD ---------------------------------------------------------------------------------


class Labelled(torch.utils.data.Dataset):
    def __init__(self, labels):
        self.labels = labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return torch.zeros(2), self.labels[i]


def make_crd(labels, **kwargs):
    crd = CRDLoss(feat_dim=4, **kwargs)
    crd.bind([(3,)], [(5,)])
    wrapped = crd.prepare_data(Labelled(labels))
    return crd, wrapped


def test_crd_dataset_wrapper_adds_indices_and_keeps_targets():
    crd, wrapped = make_crd([0, 1, 1, 2, 2, 2])
    x, y, extras = wrapped[4]
    assert y == 2 and extras == {"index": 4} and len(wrapped) == 6
    assert dataset_targets(wrapped).tolist() == [0, 1, 1, 2, 2, 2]
    assert crd.memory_student.shape == (6, 4) and crd.memory_teacher.shape == (6, 4)


def test_crd_negatives_come_from_other_classes_on_the_device():
    labels = [0] * 5 + [1] * 3 + [2] * 7
    crd, _ = make_crd(labels, num_negatives=500)
    index = torch.tensor([0, 6, 10])
    negatives = crd.sample_negatives(index)
    assert negatives.shape == (3, 500) and negatives.device == crd.labels.device
    lab = torch.tensor(labels)
    for row, i in zip(negatives, index):
        assert (lab[row] != lab[i]).all()
        assert set(row.tolist()) == {j for j in range(15) if labels[j] != labels[i]}  # all of them get drawn
    any_crd, _ = make_crd(labels, num_negatives=300, negatives="any")
    drawn = any_crd.sample_negatives(index)
    assert all((row != i).all() for row, i in zip(drawn, index))


def nce_reference(scores: np.ndarray, k: int, n: int) -> float:
    noise = k / n
    eps = 1e-7
    pos = np.log(scores[:, 0] / (scores[:, 0] + noise + eps))
    neg = np.log(noise / (scores[:, 1:] + noise + eps)).sum(1)
    return float(-(pos + neg).mean())


def test_crd_loss_memory_update_and_normalizers():
    torch.manual_seed(0)
    labels = [0, 0, 1, 1, 2, 2, 3, 3]
    crd, _ = make_crd(labels, num_negatives=3, temperature=0.5, momentum=0.25, share_negatives=False)
    fixed = torch.tensor([[2, 4, 6], [0, 4, 7]])
    crd.sample_negatives = lambda index: fixed
    bank_s, bank_t = crd.memory_student.clone(), crd.memory_teacher.clone()
    s, t = torch.randn(2, 3), torch.randn(2, 5)
    index = torch.tensor([1, 3])
    parts = crd(s, t, index)
    e_s = F.normalize(crd.embed_student(s), dim=1).detach()
    e_t = F.normalize(crd.embed_teacher(t), dim=1).detach()
    candidates = torch.cat([index[:, None], fixed], 1)
    raw_s = torch.exp((bank_t[candidates] @ e_s[:, :, None]).squeeze(2) / 0.5)
    raw_t = torch.exp((bank_s[candidates] @ e_t[:, :, None]).squeeze(2) / 0.5)
    z_s, z_t = raw_s.mean() * 8, raw_t.mean() * 8
    torch.testing.assert_close(crd.normalizers, torch.stack([z_s, z_t]))
    assert parts["student"].item() == pytest.approx(nce_reference((raw_s / z_s).numpy(), 3, 8), rel=1e-5)
    assert parts["teacher"].item() == pytest.approx(nce_reference((raw_t / z_t).numpy(), 3, 8), rel=1e-5)
    torch.testing.assert_close(crd.memory_student[index], F.normalize(0.25 * bank_s[index] + 0.75 * e_s, dim=1))
    torch.testing.assert_close(crd.memory_teacher[index], F.normalize(0.25 * bank_t[index] + 0.75 * e_t, dim=1))
    untouched = [0, 2, 4, 5, 6, 7]
    torch.testing.assert_close(crd.memory_student[untouched], bank_s[untouched])
    crd(s, t, index)
    assert crd.normalizers[0].item() == pytest.approx(z_s.item())  # fixed after the first step


def shared_reference(e, pos, neg, keep, z, temperature, n):
    """NCE with negatives shared by the batch, written out with plain autograd ops."""
    h_pos = torch.exp((e * pos).sum(1) / temperature) / z
    h_neg = torch.exp(e @ neg.t() / temperature) / z
    c = keep.sum(1) / n
    positive = torch.log(h_pos / (h_pos + c))
    negative = (torch.log(c[:, None] / (h_neg + c[:, None])) * keep).sum(1)
    return -(positive + negative).mean()


@pytest.mark.parametrize("negatives", ["other_class", "any"])
def test_crd_shared_negatives_match_the_written_out_formula_and_its_gradient(negatives):
    torch.manual_seed(0)
    labels = [i % 4 for i in range(40)]
    crd, _ = make_crd(labels, num_negatives=9, temperature=0.3, negatives=negatives)
    shared = torch.tensor([0, 5, 6, 11, 12, 20, 33, 34, 39])
    crd.sample_shared_negatives = lambda device: shared
    index = torch.tensor([1, 4, 6, 39])  # 6 and 39 are among the negatives
    s = torch.randn(4, 3, requires_grad=True)
    t = torch.randn(4, 5)
    bank_s, bank_t = crd.memory_student.clone(), crd.memory_teacher.clone()
    parts = crd(s, t, index)
    (parts["student"] + parts["teacher"]).backward()
    lab = torch.tensor(labels)
    keep = (lab[index][:, None] != lab[shared][None, :]) if negatives == "other_class" else \
        (index[:, None] != shared[None, :])
    keep = keep.float()
    s2 = s.detach().clone().requires_grad_()
    head_s = crd.embed_student.weight.detach().clone().requires_grad_()
    e_s = F.normalize(F.linear(s2, head_s, crd.embed_student.bias.detach()), dim=1)
    e_t = F.normalize(crd.embed_teacher(t), dim=1).detach()
    z_s, z_t = crd.normalizers
    ref_s = shared_reference(e_s, bank_t[index], bank_t[shared], keep, z_s, 0.3, 40)
    ref_t = shared_reference(e_t, bank_s[index], bank_s[shared], keep, z_t, 0.3, 40)
    assert parts["student"].item() == pytest.approx(ref_s.item(), rel=1e-5)
    assert parts["teacher"].item() == pytest.approx(ref_t.item(), rel=1e-5)
    ref_s.backward()
    torch.testing.assert_close(s.grad, s2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(crd.embed_student.weight.grad, head_s.grad, rtol=1e-4, atol=1e-6)


def test_crd_shared_and_per_sample_negatives_agree_for_one_anchor():
    torch.manual_seed(0)
    labels = list(range(10))
    negatives = torch.tensor([2, 3, 5, 7, 9])
    index = torch.tensor([4])
    s, t = torch.randn(1, 3), torch.randn(1, 5)
    results = []
    for share in (True, False):
        torch.manual_seed(1)  # the same heads
        crd, _ = make_crd(labels, num_negatives=5, negatives="any", share_negatives=share)
        crd.sample_shared_negatives = lambda device: negatives
        crd.sample_negatives = lambda idx: negatives[None, :]
        results.append(crd(s, t, index))
    for key in results[0]:
        assert results[0][key].item() == pytest.approx(results[1][key].item(), rel=1e-5)


def test_crd_gradients_reach_student_and_both_heads_never_the_teacher():
    crd, _ = make_crd([0, 1, 0, 1, 2, 2], num_negatives=4)
    s = torch.randn(3, 3, requires_grad=True)
    t = torch.randn(3, 5, requires_grad=True)
    sum(crd(s, t, torch.tensor([0, 1, 4])).values()).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None
    assert crd.embed_student.weight.grad.abs().sum() > 0
    assert crd.embed_teacher.weight.grad.abs().sum() > 0


def test_crd_without_data_preparation_says_how_to_supply_indices():
    crd = CRDLoss()
    crd.bind([(3,)], [(5,)])
    with pytest.raises(ConfigError, match="prepare_data"):
        crd(torch.randn(2, 3), torch.randn(2, 5), torch.tensor([0, 1]))
    assert isinstance(crd.prepare_data(Labelled([0, 1])), WithIndex)
