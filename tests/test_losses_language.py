"""The language-model losses, each against a straightforward loop implementation of its
paper's formula and against the public reference computations (DistilBERT's distiller,
TextBrewer's masked losses), with padding left out, and gradients reaching the student only."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from featkd.errors import ConfigError
from featkd.losses import (
    LOSSES, AttentionMSE, CrossEntropy, HiddenCosine, HiddenMSE, MiniLM, MiniLMv2, SoftCrossEntropy, TermInputs,
    TokenKD, ensemble_log_probs,
)

B, T, V = 3, 6, 7
#: right padding, left padding (a decoder's batch), and no padding
MASK = torch.tensor([[1, 1, 1, 1, 0, 0],
                     [0, 0, 1, 1, 1, 1],
                     [1, 1, 1, 1, 1, 1]], dtype=torch.bool)


def t64(*shape, scale=1.0, seed=None):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.randn(*shape, dtype=torch.float64, generator=g) * scale


def np_softmax(z, temperature=1.0):
    z = np.asarray(z, dtype=np.float64) / temperature
    e = np.exp(z - z.max())
    return e / e.sum()


def kl(p, q):
    return float(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0))


def real(mask, b, i):
    return mask is None or bool(mask[b, i])


def perturb_padding(x, mask, dims=(1,), scale=50.0):
    """x with every padded position (along each of `dims`, indexed by token) replaced by noise."""
    x = x.clone()
    for b in range(x.shape[0]):
        for i in range(mask.shape[1]):
            if not mask[b, i]:
                for d in dims:
                    index = [b] + [slice(None)] * (x.dim() - 1)
                    index[d] = i
                    x[tuple(index)] = torch.randn_like(x[tuple(index)]) * scale
    return x


# -- references written with loops --------------------------------------------------------


def ref_token_kd(s, t, select, divergence="forward_kl", temperature=1.0, beta=0.5):
    """mean over selected positions of D(P_teacher, Q_student), times T^2; select(b, i) -> bool."""
    s, t = s.numpy(), t.numpy()
    values = []
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            if not select(b, i):
                continue
            p, q = np_softmax(t[b, i], temperature), np_softmax(s[b, i], temperature)
            if divergence == "forward_kl":
                values.append(kl(p, q))
            elif divergence == "reverse_kl":
                values.append(kl(q, p))
            else:
                m = beta * p + (1 - beta) * q
                values.append(beta * kl(p, m) + (1 - beta) * kl(q, m))
    return float(np.mean(values)) * temperature**2


def ref_soft_ce(s, t, mask, temperature=1.0):
    values = []
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            if real(mask, b, i):
                p, q = np_softmax(t[b, i].numpy(), temperature), np_softmax(s[b, i].numpy(), temperature)
                values.append(-sum(pv * math.log(qv) for pv, qv in zip(p, q)))
    return float(np.mean(values))


def ref_hidden_cosine(s, t, mask):
    values = []
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            if real(mask, b, i):
                x, y = s[b, i].numpy(), t[b, i].numpy()
                values.append(1 - float(x @ y) / (np.linalg.norm(x) * np.linalg.norm(y)))
    return float(np.mean(values))


def ref_hidden_mse(s, t, mask):
    total, count = 0.0, 0
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            if real(mask, b, i):
                for d in range(s.shape[2]):
                    total += float(s[b, i, d] - t[b, i, d]) ** 2
                    count += 1
    return total / count


def ref_attention_mse(s, t, mask):
    total, count = 0.0, 0
    for b in range(s.shape[0]):
        for h in range(s.shape[1]):
            for q in range(s.shape[2]):
                for k in range(s.shape[3]):
                    if real(mask, b, q) and real(mask, b, k):
                        total += float(s[b, h, q, k] - t[b, h, q, k]) ** 2
                        count += 1
    return total / count


def ref_row_kl(p_t, p_s, mask, b):
    """KL over the real keys of one query row, the rows given as probabilities."""
    return sum(float(p_t[k]) * math.log(float(p_t[k]) / float(p_s[k]))
               for k in range(len(p_t)) if real(mask, b, k) and p_t[k] > 0)


def ref_relation(x, b, head, heads, q, mask):
    """softmax over the real keys of x_h[q] . x_h[k] / sqrt(d_h), x (B, T, D) split in heads."""
    d = x.shape[2] // heads
    xs = x[b, :, head * d:(head + 1) * d].numpy()
    keys = [k for k in range(x.shape[1]) if real(mask, b, k)]
    scores = np.array([xs[q] @ xs[k] / math.sqrt(d) for k in keys])
    probs = np_softmax(scores)
    out = np.zeros(x.shape[1])
    out[keys] = probs
    return out


def ref_relation_kl(teacher, student, heads, mask):
    values = []
    for b in range(teacher.shape[0]):
        for head in range(heads):
            for q in range(teacher.shape[1]):
                if real(mask, b, q):
                    r_t = ref_relation(teacher, b, head, heads, q, mask)
                    r_s = ref_relation(student, b, head, heads, q, mask)
                    values.append(ref_row_kl(r_t, r_s, mask, b))
    return float(np.mean(values))


def ref_attention_kl(a_t, a_s, mask):
    values = []
    for b in range(a_t.shape[0]):
        for h in range(a_t.shape[1]):
            for q in range(a_t.shape[2]):
                if real(mask, b, q):
                    values.append(ref_row_kl(a_t[b, h, q], a_s[b, h, q], mask, b))
    return float(np.mean(values))


def attention_probs(heads, mask, seed, causal=False):
    """(B, H, T, T) attention probabilities as the capture gives them: 0 at padded keys."""
    scores = t64(B, heads, T, T, scale=2.0, seed=seed)
    keep = MASK[:, None, None, :] if mask is not None else torch.ones(B, 1, 1, T, dtype=torch.bool)
    if causal:
        keep = keep & torch.ones(T, T, dtype=torch.bool).tril()
    return scores.masked_fill(~keep, float("-inf")).softmax(-1).nan_to_num(0.0)


# -- token_kd ------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("mask", [None, MASK])
def test_token_kd_matches_the_per_position_divergence(divergence, mask):
    s, t = t64(B, T, V, scale=2, seed=0), t64(B, T, V, scale=2, seed=1)
    loss = TokenKD(divergence=divergence, temperature=2.0, beta=0.3)
    expected = ref_token_kd(s, t, lambda b, i: real(mask, b, i), divergence, 2.0, 0.3)
    assert loss(s, t, mask=mask).item() == pytest.approx(expected, rel=1e-10)


def test_token_kd_on_class_logits_is_the_batch_mean_and_ignores_the_token_mask():
    s, t = t64(B, V, seed=2), t64(B, V, seed=3)
    expected = ref_token_kd(s[:, None], t[:, None], lambda b, i: True, "forward_kl", 3.0)
    loss = TokenKD(temperature=3.0)
    assert loss(s, t).item() == pytest.approx(expected, rel=1e-10)
    assert loss(s, t, mask=MASK).item() == pytest.approx(expected, rel=1e-10)
    # the same as KD on (B, C) logits
    assert loss(s, t).item() == pytest.approx(LOSSES.build("kd", temperature=3.0)(s, t).item(), rel=1e-10)


def distilbert_kd(s, t, select, temperature):
    """DistilBERT's distiller: masked_select the selected rows, KLDivLoss(batchmean) on
    log_softmax(s/T) against softmax(t/T), times T^2."""
    rows = select.unsqueeze(-1).expand_as(s)
    s_rows = torch.masked_select(s, rows).view(-1, s.size(-1))
    t_rows = torch.masked_select(t, rows).view(-1, s.size(-1))
    kl_div = nn.KLDivLoss(reduction="batchmean")
    return kl_div(F.log_softmax(s_rows / temperature, dim=-1), F.softmax(t_rows / temperature, dim=-1)) * temperature**2


def test_token_kd_forward_kl_equals_distilberts_reference_computation():
    s, t = t64(B, T, V, scale=3, seed=4), t64(B, T, V, scale=3, seed=5)
    ours = TokenKD(temperature=2.0)(s, t, mask=MASK)
    torch.testing.assert_close(ours, distilbert_kd(s, t, MASK, 2.0), rtol=1e-12, atol=0)
    # restrict_ce_to_mask: only the labelled (masked-LM) positions
    labels = torch.full((B, T), -100)
    labels[0, 1], labels[1, 3], labels[1, 5], labels[2, 0] = 4, 2, 0, 6
    ours = TokenKD(temperature=2.0, positions="labelled")(s, t, labels, mask=MASK)
    torch.testing.assert_close(ours, distilbert_kd(s, t, labels > -1, 2.0), rtol=1e-12, atol=0)
    # without padding, DistilBERT's all-ones attention mask
    torch.testing.assert_close(TokenKD(temperature=2.0)(s, t), distilbert_kd(s, t, torch.ones(B, T, dtype=torch.bool),
                                                                            2.0), rtol=1e-12, atol=0)


def test_token_kd_labelled_positions_need_labels_and_use_only_them():
    s, t = t64(B, T, V, seed=6), t64(B, T, V, seed=7)
    labels = torch.full((B, T), -100)
    labels[0, 2], labels[1, 4], labels[2, 5] = 1, 3, 0
    loss = TokenKD(positions="labelled")
    assert loss.needs_targets and not TokenKD().needs_targets
    expected = ref_token_kd(s, t, lambda b, i: labels[b, i] != -100)
    assert loss(s, t, labels, mask=MASK).item() == pytest.approx(expected, rel=1e-10)
    unlabelled = labels[..., None] == -100
    moved = loss(torch.where(unlabelled, t64(B, T, V, scale=40), s), torch.where(unlabelled, t64(B, T, V), t),
                 labels, mask=MASK)
    assert moved.item() == pytest.approx(expected, rel=1e-10)
    with pytest.raises(ConfigError, match="needs the labels"):
        loss(s, t, None, mask=MASK)
    with pytest.raises(ConfigError, match="labels of shape"):
        loss(s, t, labels[:, :3])
    no_labels = torch.full((B, T), -100)
    zero = loss(s.clone().requires_grad_(), t, no_labels)
    assert zero.item() == 0.0 and zero.requires_grad


def test_token_kd_ensemble_averages_the_softened_probabilities():
    s, t1, t2 = t64(B, T, V, seed=8), t64(B, T, V, seed=9), t64(B, T, V, seed=10)
    temperature = 2.0
    values = []
    for b in range(B):
        for i in range(T):
            if MASK[b, i]:
                p = (np_softmax(t1[b, i].numpy(), temperature) + np_softmax(t2[b, i].numpy(), temperature)) / 2
                values.append(kl(p, np_softmax(s[b, i].numpy(), temperature)))
    expected = float(np.mean(values)) * temperature**2
    assert TokenKD(temperature=temperature)(s, (t1, t2), mask=MASK).item() == pytest.approx(expected, rel=1e-10)
    # ensemble_log_probs now softmaxes over the last dimension, for 3-D logits too
    probs = ensemble_log_probs((t1, t2), temperature).exp()
    torch.testing.assert_close(probs, ((t1 / 2).softmax(-1) + (t2 / 2).softmax(-1)) / 2)


def test_jsd_limits_are_forward_and_reverse_kl():
    s, t = t64(B, T, V, seed=11), t64(B, T, V, seed=12)
    forward = TokenKD("forward_kl")(s, t, mask=MASK).item()
    reverse = TokenKD("reverse_kl")(s, t, mask=MASK).item()
    small, large = 1e-6, 1 - 1e-6
    assert TokenKD("jsd", beta=small)(s, t, mask=MASK).item() / small == pytest.approx(forward, rel=1e-4)
    assert TokenKD("jsd", beta=large)(s, t, mask=MASK).item() / (1 - large) == pytest.approx(reverse, rel=1e-4)


def test_divergences_vanish_for_equal_distributions_and_are_non_negative():
    torch.manual_seed(13)
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        for beta in (0.1, 0.5, 0.9):
            loss = TokenKD(divergence, temperature=1.5, beta=beta)
            t = t64(B, T, V, scale=3)
            assert loss(t.clone(), t, mask=MASK).item() == pytest.approx(0.0, abs=1e-12)
            shifted = t + t64(B, T, 1) * 5  # a per-position shift leaves the softmax unchanged
            assert loss(shifted, t, mask=MASK).item() == pytest.approx(0.0, abs=1e-12)
            for _ in range(5):
                value = loss(t64(B, T, V, scale=4), t64(B, T, V, scale=4), mask=MASK).item()
                assert value >= 0.0
    # JSD(0.5) is symmetric in student and teacher, and bounded by the mixing weights' entropy
    s, t = t64(B, T, V, scale=5, seed=14), t64(B, T, V, scale=5, seed=15)
    jsd = TokenKD("jsd", beta=0.5)
    assert jsd(s, t, mask=MASK).item() == pytest.approx(jsd(t, s, mask=MASK).item(), rel=1e-12)
    for beta in (0.2, 0.5, 0.7):
        bound = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
        assert TokenKD("jsd", beta=beta)(s * 100, t * 100, mask=MASK).item() <= bound + 1e-12


def test_token_kd_stays_finite_for_extreme_and_masked_vocabulary_logits():
    s, t = t64(B, T, V, scale=1e4, seed=16), t64(B, T, V, scale=1e4, seed=17)
    t[:, :, 0] = float("-inf")  # a vocabulary entry the teacher rules out
    s.requires_grad_()
    for divergence in ("forward_kl", "jsd"):
        value = TokenKD(divergence)(s, t, mask=MASK)
        assert torch.isfinite(value)
        (grad,) = torch.autograd.grad(value, s)
        assert torch.isfinite(grad).all()


# -- soft_ce -------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [None, MASK])
def test_soft_ce_matches_the_soft_cross_entropy(mask):
    s, t = t64(B, T, V, seed=20), t64(B, T, V, seed=21)
    assert SoftCrossEntropy(temperature=2.0)(s, t, mask=mask).item() == pytest.approx(
        ref_soft_ce(s, t, mask, 2.0), rel=1e-10)


def test_soft_ce_on_class_logits_and_against_the_references():
    s, t = t64(B, V, seed=22), t64(B, V, seed=23)
    expected = ref_soft_ce(s[:, None], t[:, None], None)
    assert SoftCrossEntropy()(s, t, mask=MASK).item() == pytest.approx(expected, rel=1e-10)
    # TextBrewer's kd_ce_loss: -(p_T * log_softmax(s)).sum(-1).mean(), the same on (B, C)
    textbrewer = -(F.softmax(t, -1) * F.log_softmax(s, -1)).sum(-1).mean()
    assert SoftCrossEntropy()(s, t).item() == pytest.approx(textbrewer.item(), rel=1e-12)
    # TinyBERT's own soft_cross_entropy takes .mean() over classes too: 1/C of ours
    tinybert = (-F.softmax(t, -1) * F.log_softmax(s, -1)).mean()
    assert SoftCrossEntropy()(s, t).item() == pytest.approx(V * tinybert.item(), rel=1e-12)


def test_soft_ce_differs_from_kd_by_the_teacher_entropy():
    s, t = t64(B, T, V, seed=24), t64(B, T, V, seed=25)
    p = t.softmax(-1)
    entropy = -(p * p.log()).sum(-1)[MASK].mean()
    assert SoftCrossEntropy()(s, t, mask=MASK).item() == pytest.approx(
        TokenKD()(s, t, mask=MASK).item() + entropy.item(), rel=1e-10)


# -- hidden_cosine / hidden_mse ------------------------------------------------------------


@pytest.mark.parametrize("mask", [None, MASK])
def test_hidden_cosine_matches_one_minus_cosine_over_real_tokens(mask):
    s, t = t64(B, T, 5, seed=30), t64(B, T, 5, seed=31)
    assert HiddenCosine()(s, t, mask=mask).item() == pytest.approx(ref_hidden_cosine(s, t, mask), rel=1e-10)


def test_hidden_cosine_equals_distilberts_cosine_embedding_loss():
    s, t = t64(B, T, 5, seed=32), t64(B, T, 5, seed=33)
    rows = MASK.unsqueeze(-1).expand_as(s)
    s_rows, t_rows = torch.masked_select(s, rows).view(-1, 5), torch.masked_select(t, rows).view(-1, 5)
    reference = nn.CosineEmbeddingLoss(reduction="mean")(s_rows, t_rows, s_rows.new(s_rows.size(0)).fill_(1))
    torch.testing.assert_close(HiddenCosine()(s, t, mask=MASK), reference, rtol=1e-10, atol=0)
    # (B, D) features: the batch mean
    flat = nn.CosineEmbeddingLoss()(s[:, 0], t[:, 0], torch.ones(B, dtype=torch.float64))
    torch.testing.assert_close(HiddenCosine()(s[:, 0], t[:, 0], mask=MASK), flat, rtol=1e-10, atol=0)


@pytest.mark.parametrize("mask", [None, MASK])
def test_hidden_mse_matches_the_mse_over_real_tokens(mask):
    s, t = t64(B, T, 5, seed=34), t64(B, T, 5, seed=35)
    assert HiddenMSE()(s, t, mask=mask).item() == pytest.approx(ref_hidden_mse(s, t, mask), rel=1e-10)


def test_hidden_mse_against_textbrewer_and_tinybert():
    s, t = t64(B, T, 5, seed=36), t64(B, T, 5, seed=37)
    # TextBrewer's hid_mse_loss with a mask: squared errors at real tokens / (real tokens * D)
    m = MASK.to(s)
    textbrewer = (F.mse_loss(s, t, reduction="none") * m.unsqueeze(-1)).sum() / (m.sum() * s.size(-1))
    torch.testing.assert_close(HiddenMSE()(s, t, mask=MASK), textbrewer, rtol=1e-12, atol=0)
    # TinyBERT's code takes MSELoss over every position, padding included: equal without padding
    torch.testing.assert_close(HiddenMSE()(s, t), F.mse_loss(s, t), rtol=1e-12, atol=0)


def test_hidden_mse_defaults_to_tinyberts_learned_projection():
    assert HiddenMSE.default_adapter == "linear" and HiddenMSE.needs_same_shape
    assert HiddenCosine.default_adapter is None and HiddenCosine.needs_same_shape
    with pytest.raises(ConfigError, match="hidden states"):
        HiddenMSE().bind([(4, 3, 3)], [(4, 3, 3)])
    HiddenCosine().bind([(6, 8)], [(6, 8)])


# -- attention_mse -------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [None, MASK])
def test_attention_mse_matches_the_mse_over_heads_and_real_pairs(mask):
    s, t = t64(B, 2, T, T, seed=40), t64(B, 2, T, T, seed=41)
    if mask is not None:  # the capture's scores are 0 at padded keys
        s, t = s * MASK[:, None, None, :], t * MASK[:, None, None, :]
    assert AttentionMSE()(s, t, mask=mask).item() == pytest.approx(ref_attention_mse(s, t, mask), rel=1e-10)


def test_attention_mse_against_textbrewer_and_tinybert():
    s, t = t64(B, 2, T, T, seed=42), t64(B, 2, T, T, seed=43)
    s, t = s * MASK[:, None, None, :], t * MASK[:, None, None, :]
    m = MASK.to(s).unsqueeze(1).expand(-1, 2, -1)
    textbrewer = ((F.mse_loss(s, t, reduction="none") * m.unsqueeze(-1) * m.unsqueeze(2)).sum()
                  / m.sum(dim=2).pow(2).sum())
    torch.testing.assert_close(AttentionMSE()(s, t, mask=MASK), textbrewer, rtol=1e-12, atol=0)
    # TinyBERT's code: MSELoss over every entry (padded query rows included): equal without padding
    torch.testing.assert_close(AttentionMSE()(s, t), F.mse_loss(s, t), rtol=1e-12, atol=0)


def test_attention_losses_need_equal_head_counts():
    with pytest.raises(ConfigError, match="equal head counts.*minilmv2"):
        AttentionMSE().bind([(2, T, T)], [(4, T, T)])
    with pytest.raises(ConfigError, match="equal head counts"):
        AttentionMSE()(t64(B, 2, T, T), t64(B, 4, T, T))
    with pytest.raises(ConfigError, match="attention maps"):
        AttentionMSE().bind([(T, 8)], [(T, 8)])
    AttentionMSE().bind([(4, T, T)], [(4, T, T)])


# -- minilm / minilmv2 ---------------------------------------------------------------------


@pytest.mark.parametrize("mask", [None, MASK])
@pytest.mark.parametrize("causal", [False, True])
def test_minilm_matches_attention_and_value_relation_kls(mask, causal):
    heads = 2
    a_s, a_t = attention_probs(heads, mask, 50, causal), attention_probs(heads, mask, 51, causal)
    v_s, v_t = t64(B, T, 4, scale=2, seed=52), t64(B, T, 6, scale=2, seed=53)  # widths may differ
    parts = MiniLM()([a_s, v_s], [a_t, v_t], mask=mask)
    assert set(parts) == {"attention", "value_relation"}
    assert parts["attention"].item() == pytest.approx(ref_attention_kl(a_t, a_s, mask), rel=1e-10)
    assert parts["value_relation"].item() == pytest.approx(ref_relation_kl(v_t, v_s, heads, mask), rel=1e-10)


def test_minilm_is_zero_for_equal_relations_and_checks_its_features():
    a = attention_probs(2, MASK, 54)
    v = t64(B, T, 4, seed=55)
    parts = MiniLM()([a, v], [a.clone(), v.clone()], mask=MASK)
    assert all(p.item() == pytest.approx(0.0, abs=1e-12) for p in parts.values())
    loss = MiniLM()
    loss.bind([(2, T, T), (T, 4)], [(2, T, T), (T, 8)])
    with pytest.raises(ConfigError, match="equal head counts"):
        loss.bind([(2, T, T), (T, 4)], [(4, T, T), (T, 8)])
    with pytest.raises(ConfigError, match="two features"):
        loss.bind([(2, T, T)], [(2, T, T)])
    with pytest.raises(ConfigError, match="values"):
        loss.bind([(2, T, T), (2, T, T)], [(2, T, T), (T, 8)])
    with pytest.raises(ConfigError, match="not divisible"):
        loss.bind([(2, T, T), (T, 5)], [(2, T, T), (T, 8)])


@pytest.mark.parametrize("mask", [None, MASK])
def test_minilmv2_matches_the_qq_kk_vv_relation_kls(mask):
    student = [t64(B, T, 4, scale=2, seed=60 + i) for i in range(3)]
    teacher = [t64(B, T, 8, scale=2, seed=70 + i) for i in range(3)]
    parts = MiniLMv2(relation_heads=2)(student, teacher, mask=mask)
    assert set(parts) == {"qq", "kk", "vv"}
    for name, s, t in zip(("qq", "kk", "vv"), student, teacher):
        assert parts[name].item() == pytest.approx(ref_relation_kl(t, s, 2, mask), rel=1e-10)


def test_minilmv2_relation_heads_are_the_papers_and_must_divide_both_widths():
    assert MiniLMv2().relation_heads == 48
    assert MiniLMv2.example.params["relation_heads"] == 4
    MiniLMv2(relation_heads=4).bind([(T, 16)] * 3, [(T, 32)] * 3)
    with pytest.raises(ConfigError, match="not divisible by relation_heads=3"):
        MiniLMv2(relation_heads=3).bind([(T, 16)] * 3, [(T, 32)] * 3)
    with pytest.raises(ConfigError, match=r"\[queries, keys, values\]"):
        MiniLMv2(relation_heads=4).bind([(T, 16)] * 2, [(T, 32)] * 2)
    with pytest.raises(ConfigError, match="not divisible"):
        MiniLMv2(relation_heads=48)([t64(B, T, 16)] * 3, [t64(B, T, 32)] * 3)
    parts = MiniLMv2(relation_heads=4)([t64(B, T, 16, seed=80)] * 3, [t64(B, T, 16, seed=80)] * 3, mask=MASK)
    assert all(p.item() == pytest.approx(0.0, abs=1e-12) for p in parts.values())


# -- padding changes nothing ---------------------------------------------------------------


def value_of(result):
    if isinstance(result, dict):
        return torch.stack([v.detach() for v in result.values()])
    return result.detach()


def test_padded_positions_change_nothing():
    logits_s, logits_t = t64(B, T, V, seed=90), t64(B, T, V, seed=91)
    hidden_s, hidden_t = t64(B, T, 8, seed=92), t64(B, T, 8, seed=93)
    scores_s = t64(B, 2, T, T, seed=94) * MASK[:, None, None, :]
    scores_t = t64(B, 2, T, T, seed=95) * MASK[:, None, None, :]
    att_s, att_t = attention_probs(2, MASK, 96), attention_probs(2, MASK, 97)
    qkv_s = [t64(B, T, 4, seed=98 + i) for i in range(3)]
    qkv_t = [t64(B, T, 8, seed=101 + i) for i in range(3)]

    def pad(x, dims=(1,)):
        return perturb_padding(x, MASK, dims)

    cases = [
        (TokenKD(), (logits_s, logits_t), (pad(logits_s), pad(logits_t))),
        (TokenKD("reverse_kl"), (logits_s, logits_t), (pad(logits_s), pad(logits_t))),
        (TokenKD("jsd", beta=0.3), (logits_s, logits_t), (pad(logits_s), pad(logits_t))),
        (SoftCrossEntropy(), (logits_s, logits_t), (pad(logits_s), pad(logits_t))),
        (HiddenCosine(), (hidden_s, hidden_t), (pad(hidden_s), pad(hidden_t))),
        (HiddenMSE(), (hidden_s, hidden_t), (pad(hidden_s), pad(hidden_t))),
        (AttentionMSE(), (scores_s, scores_t), (pad(scores_s, (2, 3)), pad(scores_t, (2, 3)))),
        (MiniLM(), ([att_s, hidden_s[..., :4]], [att_t, hidden_t]),
         ([pad(att_s, (2, 3)), pad(hidden_s[..., :4])], [pad(att_t, (2, 3)), pad(hidden_t)])),
        (MiniLMv2(relation_heads=2), (qkv_s, qkv_t), ([pad(x) for x in qkv_s], [pad(x) for x in qkv_t])),
    ]
    for loss, clean, padded in cases:
        before = value_of(loss(*clean, mask=MASK))
        after = value_of(loss(*padded, mask=MASK))
        torch.testing.assert_close(after, before, rtol=1e-12, atol=1e-14, msg=f"{type(loss).__name__}")
        # ... while without the mask the same change is seen (the perturbation is not a no-op)
        assert not torch.allclose(value_of(loss(*padded, mask=None)), value_of(loss(*clean, mask=None)))


def test_the_distiller_passes_the_mask_to_losses_that_read_it():
    s, t = t64(B, T, V, seed=110), t64(B, T, V, seed=111)
    inputs = TermInputs(s, t, None, mask=MASK)
    assert TokenKD().evaluate(inputs).item() == pytest.approx(TokenKD()(s, t, mask=MASK).item())
    pair = TermInputs(None, None, None, students=[t64(B, T, 8, seed=112)], teachers=[t64(B, T, 8, seed=113)],
                      mask=MASK)
    assert HiddenMSE().evaluate(pair)[0].item() == pytest.approx(
        HiddenMSE()(pair.students[0], pair.teachers[0], mask=MASK).item())
    for name in ("token_kd", "soft_ce", "hidden_cosine", "hidden_mse", "attention_mse", "minilm", "minilmv2"):
        assert LOSSES.get(name).reads_mask, name
    with pytest.raises(ConfigError, match="token mask"):
        HiddenMSE()(t64(B, T + 1, 8), t64(B, T + 1, 8), mask=MASK)


# -- gradients -----------------------------------------------------------------------------


def test_gradients_reach_the_student_and_never_the_teacher():
    def leaf(x):
        return x.clone().requires_grad_()

    labels = torch.full((B, T), -100)
    labels[0, 1], labels[1, 4], labels[2, 2] = 3, 1, 5
    cases = [
        (TokenKD(), (t64(B, T, V, seed=120), t64(B, T, V, seed=121)), {}),
        (TokenKD("reverse_kl"), (t64(B, T, V, seed=122), t64(B, T, V, seed=123)), {}),
        (TokenKD("jsd"), (t64(B, T, V, seed=124), t64(B, T, V, seed=125)), {}),
        (TokenKD(positions="labelled"), (t64(B, T, V, seed=126), t64(B, T, V, seed=127)), {"targets": labels}),
        (SoftCrossEntropy(), (t64(B, T, V, seed=128), t64(B, T, V, seed=129)), {}),
        (HiddenCosine(), (t64(B, T, 8, seed=130), t64(B, T, 8, seed=131)), {}),
        (HiddenMSE(), (t64(B, T, 8, seed=132), t64(B, T, 8, seed=133)), {}),
        (AttentionMSE(), (t64(B, 2, T, T, seed=134), t64(B, 2, T, T, seed=135)), {}),
    ]
    for loss, (s, t), extra in cases:
        s, t = leaf(s), leaf(t)
        loss(s, t, mask=MASK, **extra).backward()
        assert s.grad is not None and s.grad.abs().sum() > 0 and torch.isfinite(s.grad).all(), type(loss).__name__
        assert t.grad is None, type(loss).__name__
    # the teacher's ensemble members get no gradient either
    s, t1, t2 = leaf(t64(B, T, V)), leaf(t64(B, T, V)), leaf(t64(B, T, V))
    TokenKD()(s, (t1, t2), mask=MASK).backward()
    assert t1.grad is None and t2.grad is None and s.grad.abs().sum() > 0
    # feature sets
    for causal in (False, True):
        a_s, a_t = leaf(attention_probs(2, MASK, 136, causal)), leaf(attention_probs(2, MASK, 137, causal))
        v_s, v_t = leaf(t64(B, T, 4, seed=138)), leaf(t64(B, T, 8, seed=139))
        sum(MiniLM()([a_s, v_s], [a_t, v_t], mask=MASK).values()).backward()
        for x in (a_s, v_s):
            assert x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()
        assert a_t.grad is None and v_t.grad is None
    qkv_s = [leaf(t64(B, T, 4, seed=140 + i)) for i in range(3)]
    qkv_t = [leaf(t64(B, T, 8, seed=150 + i)) for i in range(3)]
    sum(MiniLMv2(relation_heads=2)(qkv_s, qkv_t, mask=MASK).values()).backward()
    assert all(x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all() for x in qkv_s)
    assert all(x.grad is None for x in qkv_t)


def test_padding_gets_no_gradient():
    s = t64(B, T, V, seed=160).requires_grad_()
    TokenKD()(s, t64(B, T, V, seed=161), mask=MASK).backward()
    assert (s.grad[~MASK] == 0).all() and (s.grad[MASK].abs().sum(-1) > 0).all()
    h = t64(B, T, 8, seed=162).requires_grad_()
    HiddenCosine()(h, t64(B, T, 8, seed=163), mask=MASK).backward()
    assert (h.grad[~MASK] == 0).all()


# -- hyper-parameters ----------------------------------------------------------------------


@pytest.mark.parametrize("build", [
    lambda: TokenKD(divergence="kl"),
    lambda: TokenKD(positions="masked"),
    lambda: TokenKD(temperature=0.0),
    lambda: TokenKD(temperature=-1.0),
    lambda: TokenKD(temperature=float("nan")),
    lambda: TokenKD("jsd", beta=0.0),
    lambda: TokenKD("jsd", beta=1.0),
    lambda: TokenKD("jsd", beta=1.5),
    lambda: SoftCrossEntropy(temperature=0.0),
    lambda: MiniLMv2(relation_heads=0),
    lambda: CrossEntropy(label_smoothing=1.5),
    lambda: LOSSES.build("token_kd", divergence="kl"),
    lambda: LOSSES.build("minilmv2", relation_heads="many"),
])
def test_bad_hyper_parameters_raise_config_errors(build):
    with pytest.raises(ConfigError):
        build()


def test_defaults_are_the_literatures():
    kd = TokenKD()
    assert (kd.divergence, kd.temperature, kd.beta, kd.positions) == ("forward_kl", 1.0, 0.5, "tokens")
    assert TokenKD("forward_kl", beta=0.0).beta == 0.0  # beta only matters (and is checked) for jsd
    assert SoftCrossEntropy().temperature == 1.0
    for cls in (HiddenCosine, HiddenMSE, AttentionMSE, MiniLM, MiniLMv2):
        assert cls.example.models == "transformer" and cls.reads_mask


# -- cross-entropy on tokens ---------------------------------------------------------------


def test_ce_on_token_logits_is_the_mean_over_labelled_positions():
    s = t64(B, T, V, seed=170)
    labels = torch.full((B, T), -100)
    labels[0, 0], labels[0, 3], labels[1, 2], labels[2, 5] = 1, 6, 0, 2
    values = [-math.log(np_softmax(s[b, i].numpy())[labels[b, i]]) for b in range(B) for i in range(T)
              if labels[b, i] != -100]
    assert CrossEntropy()(s, None, labels).item() == pytest.approx(float(np.mean(values)), rel=1e-10)
    # DistilBERT's L_mlm: CrossEntropyLoss(ignore_index=-100) on the flattened logits
    reference = nn.CrossEntropyLoss(ignore_index=-100)(s.view(-1, V), labels.view(-1))
    torch.testing.assert_close(CrossEntropy()(s, None, labels), reference, rtol=1e-12, atol=0)
    empty = CrossEntropy()(s.clone().requires_grad_(), None, torch.full((B, T), -100))
    assert empty.item() == 0.0 and empty.requires_grad
    with pytest.raises(ConfigError, match="labels of shape"):
        CrossEntropy()(s, None, labels[:, :2])


def test_ce_on_class_logits_is_unchanged():
    s, y = t64(5, V, seed=171), torch.tensor([0, 3, 6, 2, 2])
    torch.testing.assert_close(CrossEntropy()(s, None, y), F.cross_entropy(s, y), rtol=0, atol=0)
    torch.testing.assert_close(CrossEntropy(label_smoothing=0.1)(s, None, y),
                               F.cross_entropy(s, y, label_smoothing=0.1), rtol=0, atol=0)
