"""ReviewKD against a written-out version of its paper's fusion and hierarchical context loss,
with its minimum, invariances, warm-up, where its gradients go and how it refuses bad input."""

import numpy as np
import pytest
import torch

from featkd import Distiller, Term
from featkd.errors import ConfigError
from featkd.losses.base import LOSSES
from featkd.losses.review import AttentionBasedFusion, ReviewKD, hierarchical_context_loss
from featkd.models import build_model


def t64(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64)


# -- a written-out reference, in numpy ------------------------------------------------------


def adaptive_mean(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Average pooling to `size`: output cell i covers rows floor(i H / l) .. ceil((i + 1) H / l)."""
    b, c, h, w = x.shape
    out = np.zeros((b, c, *size))
    for i in range(size[0]):
        r0, r1 = (i * h) // size[0], -((-(i + 1) * h) // size[0])
        for j in range(size[1]):
            c0, c1 = (j * w) // size[1], -((-(j + 1) * w) // size[1])
            out[:, :, i, j] = x[:, :, r0:r1, c0:c1].mean(axis=(2, 3))
    return out


def hcl_reference(o: np.ndarray, t: np.ndarray, levels=(4, 2, 1)) -> float:
    """MSE plus halving weights for each pooled level smaller than the map, over the weights' sum."""
    h, w = o.shape[2:]
    terms, weights = [((o - t) ** 2).mean()], [1.0]
    for level in levels:
        if level < max(h, w):
            size = (min(level, h), min(level, w))
            terms.append(((adaptive_mean(o, size) - adaptive_mean(t, size)) ** 2).mean())
            weights.append(weights[-1] / 2)
    return sum(a * b for a, b in zip(weights, terms)) / sum(weights)


def conv1x1(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    out = np.einsum("oc,bchw->bohw", weight[:, :, 0, 0], x)
    return out if bias is None else out + bias[None, :, None, None]


def conv3x3(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    b, c, h, w = x.shape
    padded = np.zeros((b, c, h + 2, w + 2))
    padded[:, :, 1:-1, 1:-1] = x
    out = np.zeros((b, weight.shape[0], h, w))
    for dy in range(3):
        for dx in range(3):
            out += np.einsum("oc,bchw->bohw", weight[:, :, dy, dx], padded[:, :, dy:dy + h, dx:dx + w])
    return out


def batch_norm(x: np.ndarray, bn: torch.nn.BatchNorm2d) -> np.ndarray:
    """Training-mode batch norm: the batch's mean and (biased) variance per channel."""
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    var = x.var(axis=(0, 2, 3), keepdims=True)
    gamma, beta = (p.detach().numpy()[None, :, None, None] for p in (bn.weight, bn.bias))
    return (x - mean) / np.sqrt(var + bn.eps) * gamma + beta


def nearest(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = x.shape[2:]
    rows = [(i * h) // size[0] for i in range(size[0])]
    cols = [(j * w) // size[1] for j in range(size[1])]
    return x[:, :, rows][:, :, :, cols]


def abf_reference(abf: AttentionBasedFusion, x: np.ndarray, residual, out_size):
    weight = lambda m: m.weight.detach().numpy()  # noqa: E731
    x = batch_norm(conv1x1(x, weight(abf.reduce[0])), abf.reduce[1])
    if residual is not None:
        residual = nearest(residual, x.shape[2:])
        conv = abf.attention[0]
        z = 1 / (1 + np.exp(-conv1x1(np.concatenate([x, residual], axis=1), weight(conv), conv.bias.detach().numpy())))
        x = x * z[:, :1] + residual * z[:, 1:]
    x = nearest(x, out_size)
    return batch_norm(conv3x3(x, weight(abf.output[0])), abf.output[1]), x


def review_reference(loss: ReviewKD, students, teachers) -> list[float]:
    as_map = lambda f: f[:, :, None, None] if f.ndim == 2 else f  # noqa: E731
    students, teachers = [as_map(s) for s in students], [as_map(t) for t in teachers]
    outputs, residual = [None] * len(students), None
    for i in reversed(range(len(students))):
        outputs[i], residual = abf_reference(loss.fusions[i], students[i], residual, teachers[i].shape[2:])
    return [hcl_reference(o, t, loss.levels) for o, t in zip(outputs, teachers)]


def randomized(loss: ReviewKD, seed: int) -> ReviewKD:
    """Batch-norm affines and attention biases off their initial 1 and 0, so they count."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in loss.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=gen))
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen))
            elif isinstance(module, torch.nn.Conv2d) and module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen))
    return loss.double()


def bound(student_shapes, teacher_shapes, seed: int = 0, **kwargs) -> ReviewKD:
    torch.manual_seed(seed)
    loss = ReviewKD(**{"warmup": 0, **kwargs})
    loss.bind(student_shapes, teacher_shapes)
    return randomized(loss, seed)


CNN_STAGES = ([(3, 8, 8), (5, 4, 4), (6, 2, 2), (6,)], [(4, 8, 8), (7, 4, 4), (8, 2, 2), (8,)])


# -- the formula ---------------------------------------------------------------------------


def test_reviewkd_is_registered():
    assert LOSSES.get("reviewkd") is ReviewKD
    assert ReviewKD.default_weight == 5.0 and ReviewKD().warmup == 20 and ReviewKD().levels == (4, 2, 1)


def test_hcl_on_an_8x8_map_weights_the_pyramid_1_half_quarter_eighth():
    rng = np.random.default_rng(0)
    o, t = rng.normal(size=(2, 3, 2, 8, 8))
    mse = lambda a, b: ((a - b) ** 2).mean()  # noqa: E731
    blocks = lambda a, k: a.reshape(3, 2, k, 8 // k, k, 8 // k).mean(axis=(3, 5))  # noqa: E731
    expected = (mse(o, t) + mse(blocks(o, 4), blocks(t, 4)) / 2 + mse(blocks(o, 2), blocks(t, 2)) / 4
                + mse(blocks(o, 1), blocks(t, 1)) / 8) / 1.875
    assert hierarchical_context_loss(t64(o), t64(t)).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("size", [(8, 8), (4, 4), (2, 2), (1, 1), (5, 7), (1, 6)])
@pytest.mark.parametrize("levels", [(4, 2, 1), (2,), ()])
def test_hcl_matches_the_written_out_pyramid(size, levels):
    rng = np.random.default_rng(sum(size))
    o, t = rng.normal(size=(2, 2, 3, *size))
    got = hierarchical_context_loss(t64(o), t64(t), levels).item()
    assert got == pytest.approx(hcl_reference(o, t, levels), rel=1e-12)


@pytest.mark.parametrize("shapes", [
    CNN_STAGES,
    # the teacher's maps twice the student's: each fused map is resized to the teacher's size
    ([(3, 4, 4), (5, 2, 2)], [(2, 8, 8), (3, 4, 4)]),
    ([(2, 6, 6), (4, 3, 3), (4,)], [(3, 6, 6), (2, 3, 3), (5,)]),
], ids=["cnn-stages", "larger-teacher", "odd-sizes"])
def test_reviewkd_is_the_written_out_fusion_and_context_loss(shapes):
    loss = bound(*shapes)
    rng = np.random.default_rng(1)
    students = [rng.normal(size=(4, *s)) for s in shapes[0]]
    teachers = [rng.normal(size=(4, *t)) for t in shapes[1]]
    got = [v.item() for v in loss([t64(s) for s in students], [t64(t) for t in teachers])]
    np.testing.assert_allclose(got, review_reference(loss, students, teachers), rtol=1e-10)


def test_reviewkd_builds_the_papers_fusion_modules_from_the_shapes():
    loss = ReviewKD()
    loss.bind(*CNN_STAGES)
    assert [f.attention is not None for f in loss.fusions] == [True, True, True, False]  # the deepest fuses nothing
    assert [f.reduce[0].out_channels for f in loss.fusions] == [6] * 4  # min(512, deepest student channels)
    assert [f.output[0].out_channels for f in loss.fusions] == [4, 7, 8, 8]  # the teacher's channels
    assert [f.output[0].kernel_size for f in loss.fusions] == [(3, 3)] * 4
    assert loss.out_sizes == [(8, 8), (4, 4), (2, 2), (1, 1)]
    wide = ReviewKD(mid_channels=3)
    wide.bind([(2, 4, 4), (1024,)], [(2, 4, 4), (9,)])
    assert [f.reduce[0].out_channels for f in wide.fusions] == [3, 3]
    default = ReviewKD()
    default.bind([(2, 4, 4), (1024,)], [(2, 4, 4), (9,)])
    assert [f.reduce[0].out_channels for f in default.fusions] == [512, 512]
    assert "warmup=20" in repr(loss) and "levels=(4, 2, 1)" in repr(loss)


# -- minimum, invariances, warm-up ----------------------------------------------------------


def test_reviewkd_is_zero_exactly_when_the_fused_maps_equal_the_teachers():
    loss = bound(*CNN_STAGES)
    torch.manual_seed(2)
    students = [torch.randn(4, *s, dtype=torch.float64) for s in CNN_STAGES[0]]
    with torch.no_grad():
        outputs = loss.fused(students)
    teachers = [o if len(t) == 3 else o[:, :, 0, 0] for o, t in zip(outputs, CNN_STAGES[1])]
    assert all(v.item() == 0.0 for v in loss(students, teachers))
    moved = [t.clone() for t in teachers]
    moved[1][0, 0, 0, 0] += 0.1
    values = [v.item() for v in loss(students, moved)]
    assert values[1] > 0 and values[0] == values[2] == values[3] == 0.0  # each pair is its own value


def test_reviewkd_does_not_depend_on_the_order_of_the_samples():
    loss = bound(*CNN_STAGES)
    torch.manual_seed(3)
    students = [torch.randn(5, *s, dtype=torch.float64) for s in CNN_STAGES[0]]
    teachers = [torch.randn(5, *t, dtype=torch.float64) for t in CNN_STAGES[1]]
    order = torch.tensor([3, 0, 4, 2, 1])
    base = torch.stack(loss(students, teachers))
    permuted = torch.stack(loss([s[order] for s in students], [t[order] for t in teachers]))
    assert torch.allclose(base, permuted, rtol=1e-12)
    # but pairing a sample with another's teacher does change it
    assert not torch.allclose(base, torch.stack(loss(students, [t[order] for t in teachers])), rtol=1e-6)


def test_hcl_sees_detail_below_each_pooled_level_only_at_full_resolution():
    rng = np.random.default_rng(4)
    t = rng.normal(size=(2, 3, 8, 8))
    checker = np.indices((8, 8)).sum(0) % 2 * 2.0 - 1.0  # zero mean in every 2x2 block
    o = t + 0.3 * checker
    # every pooled level is matched exactly; only the full-resolution MSE, weight 1 / 1.875, remains
    assert hierarchical_context_loss(t64(o), t64(t)).item() == pytest.approx(0.09 / 1.875, rel=1e-12)
    assert hierarchical_context_loss(t64(t), t64(t)).item() == 0.0


def test_reviewkd_warm_up_needs_the_epoch_and_ramps_linearly():
    loss = bound(*CNN_STAGES, warmup=20)
    torch.manual_seed(5)
    students = [torch.randn(4, *s, dtype=torch.float64) for s in CNN_STAGES[0]]
    teachers = [torch.randn(4, *t, dtype=torch.float64) for t in CNN_STAGES[1]]
    with pytest.raises(ConfigError, match="set_epoch"):
        loss(students, teachers)
    loss.warmup = 0
    full = torch.stack(loss(students, teachers))
    loss.warmup = 20
    loss.set_epoch(5)
    assert torch.allclose(torch.stack(loss(students, teachers)), full / 4, rtol=1e-12)
    loss.set_epoch(21)
    assert torch.allclose(torch.stack(loss(students, teachers)), full, rtol=1e-12)


# -- gradients -----------------------------------------------------------------------------


def test_reviewkd_trains_the_student_and_every_fusion_module_never_the_teacher():
    loss = bound(*CNN_STAGES)
    torch.manual_seed(6)
    students = [torch.randn(4, *s, dtype=torch.float64, requires_grad=True) for s in CNN_STAGES[0]]
    teachers = [torch.randn(4, *t, dtype=torch.float64, requires_grad=True) for t in CNN_STAGES[1]]
    sum(loss(students, teachers)).backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in students)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.parameters())
    assert all(t.grad is None for t in teachers)


def test_reviewkd_residuals_carry_deeper_stages_to_shallower_outputs_only():
    loss = bound(*CNN_STAGES)
    torch.manual_seed(7)
    students = [torch.randn(4, *s, dtype=torch.float64, requires_grad=True) for s in CNN_STAGES[0]]
    teachers = [torch.randn(4, *t, dtype=torch.float64) for t in CNN_STAGES[1]]
    values = loss(students, teachers)
    # the shallowest pair's value depends on every stage (the review); the deepest's on itself only
    grads = torch.autograd.grad(values[0], students, retain_graph=True, allow_unused=True)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    grads = torch.autograd.grad(values[-1], students, allow_unused=True)
    assert [g is not None for g in grads] == [False, False, False, True]


def test_through_the_distiller_the_fusions_train_save_and_follow_the_epoch():
    torch.manual_seed(0)
    teacher = build_model("cnn", 10, (1, 8, 8), {"widths": (8, 16, 32)})
    student = build_model("cnn", 10, (1, 8, 8), {"widths": (4, 8, 16)})
    x, y = torch.randn(8, 1, 8, 8), torch.arange(8) % 10
    term = Term("reviewkd", student=["layer*", "fc:in"], teacher=["layer*.0.bn", "fc:in"], warmup=10)
    distiller = Distiller(teacher, student, [term], example_input=x)
    fusion_ids = {id(p) for p in distiller.losses["reviewkd"].parameters()}
    assert fusion_ids and fusion_ids <= {id(p) for p in distiller.trainable_parameters()}
    assert any(k.startswith("losses.reviewkd.fusions.") for k in distiller.state_dict())
    assert not any(id(p) in fusion_ids for p in teacher.parameters())
    distiller.set_epoch(5)
    half = distiller(x, y).losses["reviewkd"]
    distiller.set_epoch(10)
    out = distiller(x, y)
    assert half.item() == pytest.approx(out.losses["reviewkd"].item() / 2, rel=1e-5)
    assert out.losses["reviewkd"].item() == pytest.approx(5.0 * sum(out.parts[f"reviewkd/{n}"].item() for n in
                                                                    ("layer1", "layer2", "layer3", "fc:in")), rel=1e-5)


# -- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"warmup": -1}, "warmup is a number of epochs"),
    ({"warmup": 2.5}, "warmup is a number of epochs"),
    ({"levels": (4, 0)}, "integers >= 1"),
    ({"levels": (1, 2, 4)}, "from the largest pooled size"),
    ({"levels": (2, 2)}, "each once"),
    ({"mid_channels": 0}, "mid_channels is a channel count"),
])
def test_reviewkd_refuses_bad_hyper_parameters(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ReviewKD(**kwargs)


def test_reviewkd_refuses_bad_feature_shapes_and_unbound_use():
    with pytest.raises(ConfigError, match="two or more feature pairs"):
        ReviewKD().bind([(4, 8, 8)], [(4, 8, 8)])
    with pytest.raises(ConfigError, match=r"conv map \(C, H, W\) or a pooled embedding"):
        ReviewKD().bind([(4, 8), (4,)], [(4, 8), (4,)])
    with pytest.raises(ConfigError, match="from the shallowest stage to the deepest"):
        ReviewKD().bind([(4,), (4, 2, 2), (8, 4, 4)], [(4,), (4, 2, 2), (8, 4, 4)])
    students = [torch.randn(2, *s) for s in CNN_STAGES[0]]
    teachers = [torch.randn(2, *t) for t in CNN_STAGES[1]]
    with pytest.raises(ConfigError, match="example_input"):
        ReviewKD(warmup=0)(students, teachers)
    loss = ReviewKD(warmup=0)
    loss.bind(*CNN_STAGES)
    with pytest.raises(ConfigError, match="built for 4 pairs, called with 3"):
        loss(students[1:], teachers[1:])
    with pytest.raises(ConfigError, match="bind it again"):
        loss(students, [teachers[0][:, :, :4, :4], *teachers[1:]])


def test_a_stage_list_in_the_wrong_order_stops_at_set_up():
    torch.manual_seed(0)
    teacher = build_model("cnn", 10, (1, 8, 8), {"widths": (8, 16, 32)})
    student = build_model("cnn", 10, (1, 8, 8), {"widths": (4, 8, 16)})
    term = Term("reviewkd", student=["fc:in", "layer3", "layer2"], teacher=["fc:in", "layer3.0.bn", "layer2.0.bn"])
    with pytest.raises(ConfigError, match="shallowest stage to the deepest"):
        Distiller(teacher, student, [term], example_input=torch.randn(4, 1, 8, 8))


def test_hcl_of_constant_maps_is_their_squared_difference():
    # every level sees the same difference, so the weighted mean is that difference
    rng = np.random.default_rng(8)
    o, t = rng.normal(size=(2, 1, 1, 8, 8))
    o_const, t_const = np.full_like(o, o.mean()), np.full_like(t, t.mean())
    value = hierarchical_context_loss(t64(o_const), t64(t_const)).item()
    assert value == pytest.approx((o.mean() - t.mean()) ** 2, rel=1e-12)
