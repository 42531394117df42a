"""OFA-KD against a written-out version of its loss, the branches it builds for conv maps,
tokens and embeddings, the loss's minimum and invariances, where its gradients go and how it
refuses bad input."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from featkd.errors import ConfigError
from featkd.losses.heterogeneous import MapBranch, OFALoss, SepConv, TokenBranch, VectorBranch, ofa_loss


def t64(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64)


def softmax(row: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    e = np.exp((row - row.max()) / temperature)
    return e / e.sum()


def ofa_reference(s: np.ndarray, t: np.ndarray, labels, eps: float, temperature: float = 1.0) -> float:
    """Sample by sample, class by class: -(1+p_t)^eps + 1 at the label, -(p_t)^eps elsewhere, times log p_s."""
    total = 0.0
    for i, y in enumerate(labels):
        p_s, p_t = softmax(s[i], temperature), softmax(t[i], temperature)
        for c in range(len(p_s)):
            weight = (1 + p_t[c]) ** eps - 1 if c == y else p_t[c] ** eps
            total -= weight * math.log(p_s[c])
    return total / len(labels)


# -- the loss --------------------------------------------------------------------------------


@pytest.mark.parametrize("eps,temperature", [(1.0, 1.0), (1.5, 1.0), (2.0, 3.0), (0.5, 0.7)])
def test_ofa_loss_matches_the_written_out_formula(eps, temperature):
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(2, 5, 6)) * 2
    y = [0, 3, 5, 1, 1]
    value = ofa_loss(t64(s), t64(t), torch.tensor(y), eps, temperature)
    assert value.item() == pytest.approx(ofa_reference(s, t, y, eps, temperature), rel=1e-12)


def test_with_eps_one_it_is_the_cross_entropy_with_the_teachers_soft_labels():
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=(2, 4, 5))
    expected = -np.mean([(softmax(t[i]) * np.log(softmax(s[i]))).sum() for i in range(4)])
    assert ofa_loss(t64(s), t64(t), torch.tensor([0, 1, 2, 3]), 1.0).item() == pytest.approx(expected, rel=1e-12)


def test_unlabelled_rows_take_the_teachers_probabilities_raised_to_eps():
    rng = np.random.default_rng(2)
    s, t = rng.normal(size=(2, 3, 4))
    expected = -np.mean([(softmax(t[i]) ** 1.5 * np.log(softmax(s[i]))).sum() for i in range(3)])
    assert ofa_loss(t64(s), t64(t), torch.tensor([-100] * 3), 1.5).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("eps", [1.0, 1.5])
def test_the_minimum_is_at_the_normalised_modulated_teacher(eps):
    rng = np.random.default_rng(3)
    t = rng.normal(size=(1, 5)) * 2
    y = torch.tensor([2])
    p_t = softmax(t[0])
    weights = p_t**eps
    weights[2] = (1 + p_t[2]) ** eps - 1
    best = t64(np.log(weights)[None]).requires_grad_()
    value = ofa_loss(best, t64(t), y, eps)
    value.backward()
    assert best.grad.abs().max().item() < 1e-12
    for delta in (rng.normal(size=(3, 1, 5)) * 0.1):
        assert ofa_loss(best.detach() + t64(delta), t64(t), y, eps).item() > value.item()
    if eps > 1:  # the label class gets more than the teacher gives it
        assert weights[2] / weights.sum() > p_t[2]


def test_shifting_either_models_logits_changes_nothing():
    rng = np.random.default_rng(4)
    s, t = rng.normal(size=(2, 3, 4))
    y = torch.tensor([1, 0, 3])
    shift = np.array([[1.0], [-2.0], [5.0]])
    assert ofa_loss(t64(s + shift), t64(t - shift), y, 1.5).item() == pytest.approx(
        ofa_loss(t64(s), t64(t), y, 1.5).item(), rel=1e-12)


# -- the branches --------------------------------------------------------------------------


CNN = [(4, 8, 8), (8, 4, 4), (16, 2, 2)]


def bound(shapes, modules=None, **params) -> OFALoss:
    loss = OFALoss(num_classes=params.pop("num_classes", 10), **params)
    loss.bind(shapes, [(10,)] * len(shapes))
    if modules is not None:
        loss.bind_modules(modules, [None] * len(shapes))
    return loss


def test_conv_maps_are_brought_to_the_deepest_resolution_doubling_channels():
    loss = bound(CNN)
    sepconvs = [[m for m in b if isinstance(m, SepConv)] for b in loss.branches]
    assert [len(s) for s in sepconvs] == [2, 1, 0]
    assert [(s[0].in_channels, s[5].out_channels) for s in sepconvs[0]] == [(4, 8), (8, 16)]
    assert isinstance(loss.branches[2][0], nn.Conv2d) and loss.branches[2][0].kernel_size == (1, 1)
    assert all(isinstance(b, MapBranch) and b[-1].out_features == 10 for b in loss.branches)
    assert all(b[-1].in_features == 16 for b in loss.branches)  # the widest student feature
    assert all(b[-1].in_features == 32 for b in bound(CNN, embed_dim=32).branches)
    out = [b(torch.randn(3, *s)) for b, s in zip(loss.branches, CNN)]
    assert all(o.shape == (3, 10) for o in out)


def test_an_odd_size_halves_rounding_up():
    loss = bound([(3, 7, 7), (6, 2, 2)])
    assert len([m for m in loss.branches[0] if isinstance(m, SepConv)]) == 2  # 7 -> 4 -> 2


def test_maps_of_conv1d_models_get_one_dimensional_branches():
    conv1d = nn.Sequential(nn.Conv1d(1, 4, 3))
    loss = bound([(4, 16), (8, 4)], modules=[conv1d, conv1d])
    assert isinstance(loss.branches[0][0][0], nn.Conv1d) and len(loss.branches[0]) == 2 + 3
    assert loss.branches[1](torch.randn(2, 8, 4)).shape == (2, 10)
    tokens = bound([(4, 16), (8, 4)], modules=[nn.Linear(2, 2), None])  # no Conv1d: tokens
    assert all(isinstance(b, TokenBranch) for b in tokens.branches)


@pytest.mark.parametrize("tokens,prefix,merges", [(197, 1, 1), (196, 0, 1), (17, 1, 0), (785, 1, 2), (65, 1, 0)])
def test_tokens_keep_their_class_token_and_merge_down_to_the_final_grid(tokens, prefix, merges):
    loss = bound([(tokens, 32)] * 2)
    assert [(b.prefix, len(b.merge)) for b in loss.branches] == [(prefix, merges)] * 2
    out = loss.branches[0](torch.randn(2, tokens, 32))
    assert out.shape == (2, 10)


def test_earlier_token_branches_get_more_blocks():
    loss = bound([(17, 8)] * 4)
    assert [len(b.blocks) for b in loss.branches] == [3, 2, 1, 1]  # max(n - i, 1), as the paper's 4 stages


def test_a_branch_without_class_token_pools_the_mean_so_token_order_does_not_matter():
    loss = bound([(16, 8)], class_tokens=0)
    branch = loss.branches[0].double()
    x = torch.randn(2, 16, 8, dtype=torch.float64)
    order = torch.randperm(16)
    assert torch.allclose(branch(x[:, order]), branch(x), atol=1e-12)
    with_token = bound([(17, 8)]).branches[0].double()  # the class token's output depends on its position
    y = torch.randn(2, 17, 8, dtype=torch.float64)
    assert not torch.allclose(with_token(y[:, [1, 0, *range(2, 17)]]), with_token(y), atol=1e-6)


def test_embeddings_get_a_linear_branch():
    loss = bound([(12,)], embed_dim=6)
    assert isinstance(loss.branches[0], VectorBranch)
    assert [m.out_features for m in loss.branches[0]] == [6, 10]


def test_branches_start_from_the_papers_initialisation():
    torch.manual_seed(0)
    loss = bound([(64, 8, 8), (128, 4, 4)])
    linear = loss.branches[0][-1]
    assert linear.bias.abs().sum() == 0 and linear.weight.std().item() == pytest.approx(0.02, rel=0.15)
    bn = loss.branches[0][0][2]
    assert torch.equal(bn.weight, torch.ones(64)) and torch.equal(bn.bias, torch.zeros(64))
    conv = loss.branches[0][0][1]  # Kaiming, fan out: std sqrt(2 / 64)
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / 64), rel=0.1)


# -- the term ----------------------------------------------------------------------------------


def test_the_term_is_each_branchs_ofa_loss_plus_the_logits():
    torch.manual_seed(1)
    loss = bound(CNN, eps=(1.5, 1.2, 1.0, 2.0), logit_weight=0.5).double().eval()
    feats = [torch.randn(3, *s, dtype=torch.float64) for s in CNN]
    rng = np.random.default_rng(5)
    s, t = rng.normal(size=(2, 3, 10))
    y = [4, 0, 9]
    parts = loss(feats, [None] * 3, t64(s), t64(t), torch.tensor(y))
    assert list(parts) == ["branch1", "branch2", "branch3", "logits"]
    with torch.no_grad():
        for i, (branch, f, eps) in enumerate(zip(loss.branches, feats, (1.5, 1.2, 1.0))):
            expected = ofa_reference(branch(f).numpy(), t, y, eps)
            assert parts[f"branch{i + 1}"].item() == pytest.approx(expected, rel=1e-12)
    assert parts["logits"].item() == pytest.approx(0.5 * ofa_reference(s, t, y, 2.0), rel=1e-12)
    assert "logits" not in bound(CNN, logit_weight=0.0)([f.float() for f in feats], [None] * 3, t64(s).float(),
                                                        t64(t).float(), torch.tensor(y))


def test_gradients_reach_the_student_and_the_branches_never_the_teacher():
    torch.manual_seed(2)
    loss = bound(CNN + [(17, 16), (16,)])
    feats = [torch.randn(3, *s, requires_grad=True) for s in CNN + [(17, 16), (16,)]]
    s = torch.randn(3, 10, requires_grad=True)
    t = torch.randn(3, 10, requires_grad=True)
    sum(loss(feats, [None] * 5, s, t, torch.tensor([1, 2, 3])).values()).backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats + [s])
    assert t.grad is None
    assert all(p.grad is not None for p in loss.parameters())


# -- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize("params,match", [
    ({"num_classes": 1}, "num_classes"),
    ({"eps": 0.0}, "eps must be > 0"),
    ({"eps": (1.0, float("nan"))}, "eps must be > 0"),
    ({"eps": ()}, "eps must be > 0"),
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"logit_weight": -1.0}, "logit_weight must be >= 0"),
    ({"embed_dim": 0}, "embed_dim must be >= 1"),
    ({"class_tokens": -1}, "class_tokens must be >= 0"),
    ({"final_grid": 0}, "final_grid and heads"),
])
def test_bad_hyper_parameters_are_refused(params, match):
    with pytest.raises(ConfigError, match=match):
        OFALoss(**{"num_classes": 10, **params})


@pytest.mark.parametrize("shapes,params,match", [
    ([(2, 3, 4, 5)], {}, "conv maps .* tokens .* embeddings"),
    (CNN, {"eps": (1.0, 1.5)}, "eps has 2 values for 3 branches"),
    ([(17, 10)], {}, "embed_dim divisible by heads"),
    ([(325, 8)], {"final_grid": 4}, "9x9, which is odd"),
    ([(3, 8)], {"class_tokens": 3}, "class_tokens=3"),
])
def test_features_it_cannot_branch_from_are_refused(shapes, params, match):
    with pytest.raises(ConfigError, match=match):
        bound(shapes, **params)


def test_logits_of_another_width_or_an_ensemble_are_refused():
    loss = bound([(4,)])
    f, y = [torch.randn(2, 4)], torch.tensor([0, 1])
    with pytest.raises(ConfigError, match="num_classes=10, but the teacher's logits are"):
        loss(f, [None], torch.randn(2, 10), torch.randn(2, 7), y)
    with pytest.raises(ConfigError, match="num_classes=10, but the student's logits are"):
        loss(f, [None], torch.randn(2, 5), torch.randn(2, 10), y)
    with pytest.raises(ConfigError, match="one teacher"):
        loss(f, [None], torch.randn(2, 10), (torch.randn(2, 10), torch.randn(2, 10)), y)
    with pytest.raises(ConfigError, match="example_input"):
        OFALoss(num_classes=10)(f, [None], torch.randn(2, 10), torch.randn(2, 10), y)


def test_the_number_of_classes_is_probed_from_the_students_logits_or_checked_against_them():
    from featkd import Distiller, Term
    from featkd.models import build_model

    torch.manual_seed(0)
    teacher = build_model("cnn", 10, (1, 8, 8), {"widths": (8, 16, 32)})
    student = build_model("cnn", 10, (1, 8, 8), {"widths": (4, 8, 16)})
    x = torch.randn(4, 1, 8, 8)
    distiller = Distiller(teacher, student, [Term("ofa", student="layer*", teacher="layer*")], example_input=x)
    ofa = distiller.losses["ofa"]
    assert ofa.num_classes == 10 and all(branch(torch.randn(2, *s)).shape == (2, 10)
                                         for branch, s in zip(ofa.branches, [(4, 8, 8), (8, 4, 4), (16, 2, 2)]))
    with pytest.raises(ConfigError, match="num_classes=7, but the student's logits have 10"):
        Distiller(teacher, student, [Term("ofa", student="layer*", teacher="layer*", num_classes=7)], example_input=x)
    with pytest.raises(ConfigError, match="give num_classes"):
        OFALoss().bind([(4,)], [(4,)])
