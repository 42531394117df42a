"""SSKD against a written-out version of the paper's objective (rotated copies, error-level
filter, similarity distillation, the teacher head's stage), the batches its dataset wrapper
builds, its minimum and invariances, where its gradients go and how it refuses bad input."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from featkd import Distiller, Term
from featkd.data import ArrayDataset, RandomShift, collate_of, with_index
from featkd.errors import ConfigError
from featkd.losses.self_supervised import (
    ROTATIONS,
    RotatedCopies,
    SSKDLoss,
    error_ranks,
    kept_by_error_level,
    rotated_copies,
)


def t64(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64)


# -- the reference ---------------------------------------------------------------------------


def softmax(row: np.ndarray, temperature: float) -> np.ndarray:
    e = np.exp((row - row.max()) / temperature)
    return e / e.sum()


def kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(sum(p[c] * math.log(p[c] / q[c]) for c in range(len(p))))


def head(loss_head, f: np.ndarray) -> np.ndarray:
    """Linear-ReLU-Linear with the head's own weights, row by row."""
    w1, b1 = loss_head[0].weight.detach().double().numpy(), loss_head[0].bias.detach().double().numpy()
    w2, b2 = loss_head[2].weight.detach().double().numpy(), loss_head[2].bias.detach().double().numpy()
    return np.stack([w2 @ np.maximum(w1 @ row + b1, 0.0) + b2 for row in f])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def kept(ranks: list[int], ratio: float) -> list[int]:
    """Every rank-0 row, then floor(wrong x ratio) wrong rows by (rank, row)."""
    wrong = sorted((r, i) for i, r in enumerate(ranks) if r > 0)
    return sorted([i for i, r in enumerate(ranks) if r == 0] + [i for _, i in wrong[:int(len(wrong) * ratio)]])


def sskd_reference(s_logits, t_logits, f_s, f_t, labels, loss: SSKDLoss):
    """Image by image, copy by copy: (kd, tf, ss), each already weighted."""
    batch = len(labels)
    z_s, z_t = head(loss.student_head, f_s), head(loss.teacher_head, f_t)
    t = loss.kd_temperature
    kd = sum(kl(softmax(t_logits[4 * i], t), softmax(s_logits[4 * i], t)) for i in range(batch)) / batch
    copies = [(i, 4 * i + r) for i in range(batch) for r in range(1, 4)]  # (image, row)
    t = loss.tf_temperature
    ranks = []
    for i, row in copies:
        p = softmax(t_logits[row], t)
        ranks.append(sum(1 for c in range(len(p)) if p[c] > p[labels[i]]))
    keep = kept(ranks, loss.tf_ratio)
    tf = sum(kl(softmax(t_logits[copies[j][1]], t), softmax(s_logits[copies[j][1]], t)) for j in keep) / len(keep)
    sim_s = [[cosine(z_s[row], z_s[4 * k]) for k in range(batch)] for _, row in copies]
    sim_t = [[cosine(z_t[row], z_t[4 * k]) for k in range(batch)] for _, row in copies]
    ranks = [sum(1 for k in range(batch) if sim_t[j][k] > sim_t[j][i]) for j, (i, _) in enumerate(copies)]
    keep = kept(ranks, loss.ss_ratio)
    t = loss.ss_temperature
    ss = sum(kl(softmax(np.array(sim_t[j]), t), softmax(np.array(sim_s[j]), t)) for j in keep) / len(keep)
    return (loss.kd_weight * loss.kd_temperature**2 * kd, loss.tf_weight * loss.tf_temperature**2 * tf,
            loss.ss_weight * loss.ss_temperature**2 * ss)


def setting(seed: int = 0, batch: int = 5, classes: int = 6, dim: int = 7, **params):
    """A bound loss (float64) and random inputs in the layout of `RotatedCopies`."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    loss = SSKDLoss(**params)
    loss.bind([(dim,)], [(dim + 1,)])
    loss.double()
    rows = ROTATIONS * batch
    s_logits, t_logits = rng.normal(size=(rows, classes)) * 2, rng.normal(size=(rows, classes)) * 2
    f_s, f_t = rng.normal(size=(rows, dim)), rng.normal(size=(rows, dim + 1))
    labels = rng.integers(0, classes, size=batch)
    row_labels = np.full((batch, ROTATIONS), -100)
    row_labels[:, 0] = labels
    return loss, s_logits, t_logits, f_s, f_t, labels, torch.tensor(row_labels.reshape(-1))


def call(loss, s_logits, t_logits, f_s, f_t, row_labels, rotation=None):
    rotation = torch.arange(ROTATIONS).repeat(len(s_logits) // ROTATIONS) if rotation is None else rotation
    return loss([t64(f_s)], [t64(f_t)], t64(s_logits), t64(t_logits), row_labels, rotation)


# -- the value -------------------------------------------------------------------------------


@pytest.mark.parametrize("params", [{}, {"tf_ratio": 0.5, "ss_ratio": 0.25}, {"tf_ratio": 0.0, "ss_ratio": 1.0,
                                                                              "kd_temperature": 2.0, "ss_weight": 3.0}])
def test_sskd_matches_the_written_out_objective(params):
    loss, s, t, f_s, f_t, labels, row_labels = setting(**params)
    parts = call(loss, s, t, f_s, f_t, row_labels)
    kd, tf, ss = sskd_reference(s, t, f_s, f_t, labels, loss)
    assert parts["kd"].item() == pytest.approx(kd, rel=1e-10)
    assert parts["tf"].item() == pytest.approx(tf, rel=1e-10)
    assert parts["ss"].item() == pytest.approx(ss, rel=1e-10)


def test_the_teacher_stage_finds_each_copys_original():
    loss, s, t, f_s, f_t, labels, row_labels = setting(seed=3, batch=4)
    rotation = torch.arange(ROTATIONS).repeat(4)
    value = loss.pretrain_loss([None], [t64(f_t)], None, t64(t), row_labels, rotation)
    z = head(loss.teacher_head, f_t)
    expected = 0.0
    for i in range(4):
        for r in range(1, 4):
            sims = [cosine(z[4 * i + r], z[4 * k]) for k in range(4)]
            expected -= sims[i] - math.log(sum(math.exp(x) for x in sims))
    assert value.item() == pytest.approx(expected / 12, rel=1e-10)


def test_error_ranks_count_what_beats_the_truth():
    scores = torch.tensor([[0.1, 0.5, 0.4], [0.3, 0.3, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5]])
    truth = torch.tensor([1, 0, 2, -100])
    assert error_ranks(scores, truth).tolist() == [0, 1, 1, 0]  # a tie counts for the truth; no label ranks 0


@pytest.mark.parametrize("ratio,expected", [(0.0, [0, 3]), (0.5, [0, 2, 3, 5]), (0.75, [0, 2, 3, 4, 5]),
                                            (1.0, [0, 1, 2, 3, 4, 5])])
def test_the_filter_keeps_right_copies_and_the_least_wrong(ratio, expected):
    ranks = torch.tensor([0, 3, 1, 0, 2, 1])
    assert kept_by_error_level(ranks, ratio).nonzero().flatten().tolist() == expected


def test_the_filter_breaks_ties_of_rank_in_row_order():
    assert kept_by_error_level(torch.tensor([2, 1, 1, 0]), 0.5).nonzero().flatten().tolist() == [1, 3]


def test_filtered_copies_do_not_count():
    # a copy the teacher gets wrong, dropped at ratio 0, changes nothing however the student scores it
    loss, s, t, f_s, f_t, labels, row_labels = setting(seed=1, tf_ratio=0.0)
    p = np.array([[softmax(t[4 * i + r], 4.0) for r in range(1, 4)] for i in range(len(labels))])
    wrong = [(i, r) for i in range(len(labels)) for r in range(1, 4) if p[i, r - 1].argmax() != labels[i]]
    assert wrong
    i, r = wrong[0]
    changed = s.copy()
    changed[4 * i + r] += np.linspace(-3, 3, s.shape[1])
    before = call(loss, s, t, f_s, f_t, row_labels)["tf"]
    assert call(loss, changed, t, f_s, f_t, row_labels)["tf"].item() == pytest.approx(before.item(), rel=1e-12)


# -- minimum and invariances ---------------------------------------------------------------


def test_a_student_that_is_the_teacher_scores_zero():
    loss, s, t, f_s, f_t, labels, row_labels = setting(seed=2)
    loss.bind([(8,)], [(8,)])
    loss.double()
    loss.student_head.load_state_dict(loss.teacher_head.state_dict())
    parts = call(loss, t, t, f_t, f_t, row_labels)
    assert all(abs(v.item()) < 1e-12 for v in parts.values())
    other = call(loss, s, t, f_t[::-1].copy(), f_t, row_labels)  # another student: every part above 0
    assert all(v.item() > 1e-6 for v in other.values())


def test_shifting_logits_and_scaling_the_heads_change_nothing():
    loss, s, t, f_s, f_t, labels, row_labels = setting(seed=4)
    before = call(loss, s, t, f_s, f_t, row_labels)
    with torch.no_grad():  # cosine similarities ignore the scale of the heads' outputs
        for h in (loss.student_head, loss.teacher_head):
            h[2].weight.mul_(3.0)
            h[2].bias.mul_(3.0)
    shift = np.arange(len(s))[:, None] * 0.7
    after = call(loss, s + shift, t - shift, f_s, f_t, row_labels)
    for k in before:
        assert after[k].item() == pytest.approx(before[k].item(), rel=1e-10)


def test_the_order_of_the_images_does_not_matter():
    loss, s, t, f_s, f_t, labels, row_labels = setting(seed=5, tf_ratio=1.0, ss_ratio=1.0)
    order = np.array([2, 0, 4, 1, 3])
    rows = (order[:, None] * ROTATIONS + np.arange(ROTATIONS)).reshape(-1)
    before = call(loss, s, t, f_s, f_t, row_labels)
    after = call(loss, s[rows], t[rows], f_s[rows], f_t[rows], row_labels[torch.tensor(rows)])
    for k in before:
        assert after[k].item() == pytest.approx(before[k].item(), rel=1e-10)


# -- gradients -------------------------------------------------------------------------------


def test_gradients_reach_the_student_and_its_head_never_the_teacher():
    loss, s, t, f_s, f_t, labels, row_labels = setting(seed=6)
    student = [t64(s).requires_grad_(), t64(f_s).requires_grad_()]
    teacher = [t64(t).requires_grad_(), t64(f_t).requires_grad_()]
    parts = loss([student[1]], [teacher[1]], student[0], teacher[0], row_labels, torch.arange(4).repeat(5))
    sum(parts.values()).backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in student)
    assert all(x.grad is None for x in teacher)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.student_head.parameters())
    assert all(p.grad is None for p in loss.teacher_head.parameters())
    assert {id(p) for p in loss.trained_parameters()} == {id(p) for p in loss.student_head.parameters()}


def test_the_teacher_stage_trains_the_teacher_head_only():
    loss, s, t, f_s, f_t, labels, row_labels = setting(seed=7)
    f = t64(f_t).requires_grad_()
    loss.pretrain_loss([None], [f], None, t64(t), row_labels, torch.arange(4).repeat(5)).backward()
    assert f.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.teacher_head.parameters())
    assert all(p.grad is None for p in loss.student_head.parameters())
    assert {id(p) for p in loss.pretrain_parameters()} == {id(p) for p in loss.teacher_head.parameters()}


# -- the rotated copies --------------------------------------------------------------------


def test_rotated_copies_turn_the_image_counter_clockwise():
    x = torch.arange(2 * 3 * 3.0).reshape(2, 3, 3)
    out = rotated_copies(x)
    n = 3
    for c in range(2):
        for i in range(n):
            for j in range(n):
                assert out[0, c, i, j] == x[c, i, j]
                assert out[1, c, i, j] == x[c, j, n - 1 - i]
                assert out[2, c, i, j] == x[c, n - 1 - i, n - 1 - j]
                assert out[3, c, i, j] == x[c, n - 1 - j, i]


def images(n: int = 6, views: int | None = None) -> ArrayDataset:
    inputs = torch.arange(n * 16.0).reshape(n, 1, 4, 4)
    return ArrayDataset(inputs, torch.arange(n) % 3, RandomShift(1) if views else None, views=views)


def test_a_batch_holds_each_image_then_its_copies_labelled_once():
    data = RotatedCopies(images())
    x, y, extras = data.collate([data[i] for i in (4, 1)])
    assert x.shape == (8, 1, 4, 4)
    inputs = data.dataset.inputs
    assert torch.equal(x[0], inputs[4]) and torch.equal(x[5], torch.rot90(inputs[1], 1, (1, 2)))
    assert y.tolist() == [1, -100, -100, -100, 1, -100, -100, -100]
    assert extras["rotation"].tolist() == [0, 1, 2, 3] * 2
    assert len(data) == 6 and data.targets is data.dataset.targets


def test_extras_follow_their_rows_and_each_copy_is_its_own_view():
    data = with_index(RotatedCopies(images(views=2)))  # a teacher cache's wrapper goes around it
    assert data.replayable_views == 8 and data.views == 2  # the sampler still draws the wrapped set's items
    x, y, extras = collate_of(data)([data[i] for i in (3, 6 + 1)])  # view 0 of sample 3, view 1 of sample 1
    assert extras["index"].tolist() == [3] * 4 + [1] * 4
    assert extras["view"].tolist() == [0, 1, 2, 3, 4, 5, 6, 7]


def test_rotated_copies_are_added_once():
    loss = SSKDLoss()
    once = loss.prepare_data(images())
    assert loss.prepare_data(once) is once and loss.prepare_data(with_index(once)).dataset is once


def test_through_the_distiller_ce_learns_from_the_originals_only():
    torch.manual_seed(0)
    net = lambda w: torch.nn.Sequential(torch.nn.Conv2d(1, w, 3, padding=1), torch.nn.ReLU(),  # noqa: E731
                                        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(w, 3))
    teacher, student = net(6), net(4)
    distiller = Distiller(teacher, student, [Term("ce", 1.0), Term("sskd", student="3", teacher="3")],
                          example_input=torch.zeros(2, 1, 4, 4))
    data = distiller.prepare_data(images())
    x, y, extras = collate_of(data)([data[i] for i in range(4)])
    out = distiller(x, y, **extras)
    assert out.parts["ce"].item() == pytest.approx(F.cross_entropy(out.logits[0::4], y[0::4]).item(), rel=1e-6)
    assert set(out.parts) == {"ce", "sskd/kd", "sskd/tf", "sskd/ss"}


def test_a_teacher_output_cache_keeps_each_rotated_copy_apart():
    from featkd.teacher_cache import TeacherCacheSettings

    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    distiller = Distiller(teacher, torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)), ["kd"],
                          teacher_cache=TeacherCacheSettings("fp32"))
    data = distiller.prepare_data(RotatedCopies(images(views=2)))
    x, y, extras = collate_of(data)([data[i] for i in (0, 7)])
    with torch.no_grad():
        expected = teacher(x)
        first = distiller.teacher_pass(x, extras, {0: frozenset()})
        again = distiller.teacher_pass(x, extras, {0: frozenset()})  # read back from the cache
    assert torch.allclose(first.logits[0], expected) and torch.allclose(again.logits[0], expected)
    assert distiller.teacher_pass.cache.filled.sum() == 8  # 2 items x 4 copies, each under its own key


def test_the_cache_keeps_teacher_features_of_rotated_copies_too():
    """The rotated batches lay themselves out (`collate`) but are images of one shape: unlike
    padded text, their per-sample teacher features can be kept."""
    from featkd.teacher_cache import TeacherCacheSettings

    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    distiller = Distiller(teacher, torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)), ["kd"],
                          teacher_cache=TeacherCacheSettings("fp32", ["0"]))
    data = distiller.prepare_data(RotatedCopies(images(views=2)))
    x, y, extras = collate_of(data)([data[i] for i in (0, 7)])
    with torch.no_grad():
        distiller.teacher_pass(x, extras, {0: frozenset({"0"})})
        again = distiller.teacher_pass(x, extras, {0: frozenset({"0"})})
    assert torch.allclose(again.features[0]["0"], x.flatten(1))


# -- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize("params,match", [
    ({"kd_weight": -1.0}, "kd_weight must be >= 0"),
    ({"ss_weight": float("nan")}, "ss_weight must be >= 0"),
    ({"tf_temperature": 0.0}, "temperature must be > 0"),
    ({"ss_temperature": -0.5}, "temperature must be > 0"),
    ({"tf_ratio": 1.5}, r"tf_ratio .* in \[0, 1\]"),
    ({"ss_ratio": -0.1}, r"ss_ratio .* in \[0, 1\]"),
])
def test_bad_hyper_parameters_are_refused(params, match):
    with pytest.raises(ConfigError, match=match):
        SSKDLoss(**params)


def test_one_pair_of_embeddings_and_bound_heads_are_needed():
    with pytest.raises(ConfigError, match="one pair of embeddings"):
        SSKDLoss().bind([(4,), (4,)], [(4,), (4,)])
    with pytest.raises(ConfigError, match="example_input"):
        SSKDLoss()([torch.zeros(4, 3)], [torch.zeros(4, 3)], torch.zeros(4, 2), torch.zeros(4, 2),
                   torch.zeros(4).long(), torch.arange(4))


@pytest.mark.parametrize("rotation", [torch.tensor([0, 1, 2, 3, 1, 0, 2, 3]), torch.arange(4).repeat(3),
                                      torch.zeros(8).long()])
def test_a_batch_out_of_layout_is_refused(rotation):
    loss, s, t, f_s, f_t, labels, row_labels = setting(batch=2)
    with pytest.raises(ConfigError, match="prepare_data"):
        call(loss, s, t, f_s, f_t, row_labels, rotation)


def test_an_ensemble_of_teachers_is_refused():
    loss, s, t, f_s, f_t, labels, row_labels = setting(batch=2)
    with pytest.raises(ConfigError, match="one teacher"):
        loss([t64(f_s)], [t64(f_t)], t64(s), (t64(t), t64(t)), row_labels, torch.arange(4).repeat(2))


def test_images_that_cannot_turn_are_refused():
    wide = ArrayDataset(torch.zeros(2, 1, 4, 6), torch.zeros(2).long())
    with pytest.raises(ConfigError, match="square images"):
        RotatedCopies(wide)[0]
    signals = ArrayDataset(torch.zeros(2, 1, 8), torch.zeros(2).long())
    with pytest.raises(ConfigError, match="square images"):
        RotatedCopies(signals)[0]

    class Text(ArrayDataset):
        def collate(self, items):
            return items

    with pytest.raises(ConfigError, match="batches its items itself"):
        RotatedCopies(Text(torch.zeros(2, 3), torch.zeros(2).long()))
