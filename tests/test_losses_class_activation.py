"""CAT-KD against a written-out version of its paper's class activation transfer, with its
minimum, invariances, where its gradients go and how it refuses bad input."""

import numpy as np
import pytest
import torch
from torch import nn

from featkd import Distiller, Term
from featkd.errors import ConfigError
from featkd.losses.base import LOSSES
from featkd.losses.class_activation import ClassAttentionTransfer, class_activation_maps
from featkd.models import build_model


def t64(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64)


def cams_reference(feature: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """CAM[b, k, h, w] = sum_c W[k, c] F[b, c, h, w], one entry at a time."""
    b, c, h, w = feature.shape
    out = np.zeros((b, weight.shape[0], h, w))
    for i in range(b):
        for k in range(weight.shape[0]):
            for y in range(h):
                for x in range(w):
                    out[i, k, y, x] = sum(weight[k, j] * feature[i, j, y, x] for j in range(c))
    return out


def pool_reference(cams: np.ndarray, size: int) -> np.ndarray:
    """Average pooling to size x size: cell i covers rows floor(i H / s) .. ceil((i + 1) H / s)."""
    b, k, h, w = cams.shape
    out = np.zeros((b, k, size, size))
    for i in range(size):
        r0, r1 = (i * h) // size, -((-(i + 1) * h) // size)
        for j in range(size):
            c0, c1 = (j * w) // size, -((-(j + 1) * w) // size)
            out[:, :, i, j] = cams[:, :, r0:r1, c0:c1].mean(axis=(2, 3))
    return out


def cat_reference(s_map, s_weight, t_map, t_weight, resolution, normalize) -> float:
    a_s = pool_reference(cams_reference(s_map, s_weight), resolution)
    a_t = pool_reference(cams_reference(t_map, t_weight), resolution)
    if normalize:
        a_s = a_s / np.sqrt((a_s**2).sum(axis=(2, 3), keepdims=True))
        a_t = a_t / np.sqrt((a_t**2).sum(axis=(2, 3), keepdims=True))
    return float(((a_s - a_t) ** 2).mean())


def linear(in_features: int, classes: int, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, classes).double()


def bound(s_shape, t_shape, classes, seed=0, **kwargs):
    """A two-pair CAT-KD bound to its shapes and to two linear classifiers."""
    loss = ClassAttentionTransfer(**kwargs)
    loss.bind([s_shape, (classes,)], [t_shape, (classes,)])
    s_fc, t_fc = linear(s_shape[0], classes, seed), linear(t_shape[0], classes, seed + 1)
    loss.bind_classifiers(s_fc, t_fc)
    return loss, s_fc, t_fc


def maps(rng, batch, *shapes):
    return [rng.normal(size=(batch, *s)) for s in shapes]


# -- the formula ---------------------------------------------------------------------------


def test_catkd_is_registered_with_the_authors_defaults():
    assert LOSSES.get("catkd") is ClassAttentionTransfer
    loss = ClassAttentionTransfer()
    assert (loss.resolution, loss.normalize, ClassAttentionTransfer.default_weight) == (2, True, 400.0)
    assert "resolution=2, normalize=True" in repr(loss)


def test_class_activation_maps_weigh_the_channels_at_every_position():
    rng = np.random.default_rng(0)
    feature, weight = rng.normal(size=(2, 3, 4, 5)), rng.normal(size=(6, 3))
    np.testing.assert_allclose(class_activation_maps(t64(feature), t64(weight)).numpy(),
                               cams_reference(feature, weight), rtol=1e-12)


def test_the_mean_of_a_cam_is_the_logit_without_the_bias():
    # the link to the classifier: a linear layer on the average-pooled map
    rng = np.random.default_rng(1)
    fc = linear(4, 5, 0)
    feature = t64(rng.normal(size=(3, 4, 3, 3)))
    logits = fc(feature.mean((2, 3)))
    assert torch.allclose(class_activation_maps(feature, fc.weight).mean((2, 3)), logits - fc.bias, rtol=1e-12)


@pytest.mark.parametrize("resolution", [1, 2, 3])
@pytest.mark.parametrize("normalize", [True, False])
def test_catkd_is_the_written_out_class_activation_transfer(resolution, normalize):
    rng = np.random.default_rng(2)
    # a larger student map than the teacher's, and a size that does not divide evenly
    s_map, t_map = maps(rng, 2, (3, 6, 5), (4, 4, 4))
    loss, s_fc, t_fc = bound((3, 6, 5), (4, 4, 4), 5, resolution=resolution, normalize=normalize)
    got = loss([t64(s_map), None], [t64(t_map), None]).item()
    expected = cat_reference(s_map, s_fc.weight.detach().numpy(), t_map, t_fc.weight.detach().numpy(),
                             resolution, normalize)
    assert got == pytest.approx(expected, rel=1e-10)


def test_one_pair_takes_the_maps_as_the_class_activation_maps():
    rng = np.random.default_rng(3)
    s_cams, t_cams = maps(rng, 3, (5, 4, 4), (5, 2, 2))
    loss = ClassAttentionTransfer()
    loss.bind([(5, 4, 4)], [(5, 2, 2)])
    got = loss([t64(s_cams)], [t64(t_cams)]).item()
    eye = np.eye(5)  # the identity classifier leaves CAMs as they are
    assert got == pytest.approx(cat_reference(s_cams, eye, t_cams, eye, 2, True), rel=1e-10)


# -- minimum and invariances ---------------------------------------------------------------


def test_catkd_is_zero_when_the_student_has_the_teachers_map_and_classifier():
    rng = np.random.default_rng(4)
    (m,) = maps(rng, 2, (3, 4, 4))
    loss, s_fc, t_fc = bound((3, 4, 4), (3, 4, 4), 6)
    s_fc.load_state_dict(t_fc.state_dict())
    assert loss([t64(m), None], [t64(m), None]).item() == 0.0
    with torch.no_grad():
        s_fc.weight[2, 0] += 0.5
    assert loss([t64(m), None], [t64(m), None]).item() > 0


def test_normalised_cat_ignores_the_scale_of_each_class_map_unnormalised_does_not():
    rng = np.random.default_rng(5)
    s_map, t_map = maps(rng, 2, (3, 4, 4), (4, 4, 4))
    for normalize in (True, False):
        loss, s_fc, t_fc = bound((3, 4, 4), (4, 4, 4), 5, normalize=normalize)
        base = loss([t64(s_map), None], [t64(t_map), None]).item()
        with torch.no_grad():  # each class's row scaled by its own positive factor, on both sides
            s_fc.weight.mul_(t64(np.array([[0.5], [2.0], [3.0], [1.5], [0.1]])))
            t_fc.weight.mul_(t64(np.array([[4.0], [0.2], [1.0], [7.0], [2.5]])))
        scaled = loss([t64(3.0 * s_map), None], [t64(t_map), None]).item()
        if normalize:
            assert scaled == pytest.approx(base, rel=1e-10)
        else:
            assert scaled != pytest.approx(base, rel=1e-3)


def test_catkd_ignores_the_classifier_bias_and_detail_finer_than_its_resolution():
    rng = np.random.default_rng(6)
    s_map, t_map = maps(rng, 2, (3, 4, 4), (4, 4, 4))
    loss, s_fc, t_fc = bound((3, 4, 4), (4, 4, 4), 5)
    base = loss([t64(s_map), None], [t64(t_map), None]).item()
    with torch.no_grad():
        s_fc.bias.add_(3.0)
        t_fc.bias.mul_(-2.0)
    assert loss([t64(s_map), None], [t64(t_map), None]).item() == base
    checker = np.indices((4, 4)).sum(0) % 2 * 2.0 - 1.0  # zero mean in every 2x2 cell
    assert loss([t64(s_map + checker), None], [t64(t_map), None]).item() == pytest.approx(base, rel=1e-12)
    two = ClassAttentionTransfer(resolution=4)
    two.bind([(3, 4, 4), (5,)], [(4, 4, 4), (5,)])
    two.bind_classifiers(s_fc, t_fc)  # at full resolution the same detail counts
    assert two([t64(s_map + checker), None], [t64(t_map), None]).item() != pytest.approx(
        two([t64(s_map), None], [t64(t_map), None]).item(), rel=1e-3)


# -- gradients -----------------------------------------------------------------------------


def test_catkd_trains_the_students_map_and_classifier_weight_never_the_teachers():
    rng = np.random.default_rng(7)
    loss, s_fc, t_fc = bound((3, 4, 4), (4, 2, 2), 5)
    s_map, t_map = (t64(m).requires_grad_() for m in maps(rng, 2, (3, 4, 4), (4, 2, 2)))
    loss([s_map, None], [t_map, None]).backward()
    assert s_map.grad.abs().sum() > 0 and s_fc.weight.grad.abs().sum() > 0
    assert s_fc.bias.grad is None  # the CAM has no bias
    assert t_map.grad is None and t_fc.weight.grad is None and t_fc.bias.grad is None
    assert list(loss.parameters()) == [] and list(loss.state_dict()) == []
    # the same with the CAMs given directly (one pair)
    one = ClassAttentionTransfer()
    one.bind([(5, 4, 4)], [(5, 2, 2)])
    s_cams, t_cams = (t64(m).requires_grad_() for m in maps(rng, 2, (5, 4, 4), (5, 2, 2)))
    one([s_cams], [t_cams]).backward()
    assert s_cams.grad.abs().sum() > 0 and t_cams.grad is None


def test_through_the_distiller_the_classifiers_come_from_the_pairs_and_the_teacher_stays_out():
    torch.manual_seed(0)
    teacher = build_model("cnn", 10, (1, 8, 8), {"widths": (8, 16, 32)})
    student = build_model("cnn", 10, (1, 8, 8), {"widths": (4, 8, 16)})
    x = torch.randn(8, 1, 8, 8)
    distiller = Distiller(teacher, student, [Term("catkd", student=["layer3", "fc"], teacher=["layer3", "fc"])],
                          example_input=x)
    loss = distiller.losses["catkd"]
    assert loss.classifiers == (student.fc, teacher.fc)
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for p in distiller.parameters()}
    assert not any(k.startswith("losses.") for k in distiller.state_dict())
    distiller.train()
    out = distiller(x, torch.arange(8) % 10)
    out.loss.backward()
    assert student.fc.weight.grad.abs().sum() > 0 and student.layer1[0].conv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    # the value is the written-out transfer of the two models' maps and classifier weights
    with torch.no_grad():
        captured = {}
        hooks = [m.layer3.register_forward_hook(lambda mod, i, o, key=key: captured.__setitem__(key, o))
                 for key, m in (("s", student), ("t", teacher))]
        teacher.eval()
        student(x)
        teacher(x)
        for h in hooks:
            h.remove()
    expected = cat_reference(captured["s"].double().numpy(), student.fc.weight.detach().double().numpy(),
                             captured["t"].double().numpy(), teacher.fc.weight.detach().double().numpy(), 2, True)
    assert out.losses["catkd"].item() == pytest.approx(400.0 * expected, rel=1e-4)


# -- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"resolution": 0}, "resolution is the size"),
    ({"resolution": 1.5}, "resolution is the size"),
    ({"resolution": True}, "resolution is the size"),
    ({"normalize": "yes"}, "normalize is true or false"),
    ({"eps": 0.0}, "eps must be > 0"),
])
def test_catkd_refuses_bad_hyper_parameters(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ClassAttentionTransfer(**kwargs)


def test_catkd_refuses_bad_feature_shapes():
    with pytest.raises(ConfigError, match="got 3 pairs"):
        ClassAttentionTransfer().bind([(3, 4, 4), (5,), (5,)], [(3, 4, 4), (5,), (5,)])
    with pytest.raises(ConfigError, match=r"conv maps \(C, H, W\)"):
        ClassAttentionTransfer().bind([(3,), (5,)], [(3, 4, 4), (5,)])
    with pytest.raises(ConfigError, match="one per class"):
        ClassAttentionTransfer().bind([(5, 4, 4)], [(6, 4, 4)])
    with pytest.raises(ConfigError, match="as many classes on both sides"):
        ClassAttentionTransfer().bind([(3, 4, 4), (5,)], [(3, 4, 4), (6,)])


def test_catkd_refuses_a_classifier_it_cannot_read_and_unbound_use():
    loss = ClassAttentionTransfer()
    loss.bind([(3, 4, 4), (5,)], [(4, 4, 4), (5,)])
    with pytest.raises(ConfigError, match="second student feature must be the output of the classifier"):
        loss.bind_modules([None, None], [None, nn.Linear(4, 5)])
    with pytest.raises(ConfigError, match="it is ReLU"):
        loss.bind_modules([None, nn.Linear(3, 5)], [None, nn.ReLU()])
    with pytest.raises(ConfigError, match="teacher classifier takes 8 features but the teacher map has 4"):
        loss.bind_modules([None, nn.Linear(3, 5)], [None, nn.Linear(8, 5)])
    rng = np.random.default_rng(8)
    s_map, t_map = (t64(m) for m in maps(rng, 2, (3, 4, 4), (4, 4, 4)))
    with pytest.raises(ConfigError, match="bind_classifiers"):
        loss([s_map, None], [t_map, None])
    with pytest.raises(ConfigError, match="not bound"):
        ClassAttentionTransfer()([s_map], [t_map])


def test_the_pooled_embedding_instead_of_the_classifier_stops_at_set_up():
    torch.manual_seed(0)
    teacher = build_model("cnn", 10, (1, 8, 8), {"widths": (8, 16, 32)})
    student = build_model("cnn", 10, (1, 8, 8), {"widths": (4, 8, 16)})
    term = Term("catkd", student=["layer3", "fc:in"], teacher=["layer3", "fc:in"])
    with pytest.raises(ConfigError, match="classifiers' outputs"):
        Distiller(teacher, student, [term], example_input=torch.randn(4, 1, 8, 8))
    term = Term("catkd", student=["layer2", "fc"], teacher=["layer2", "fc"])
    with pytest.raises(ConfigError, match="student classifier takes 16 features but the student map has 8"):
        Distiller(teacher, student, [term], example_input=torch.randn(4, 1, 8, 8))
