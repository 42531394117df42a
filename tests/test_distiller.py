import copy

import pytest
import torch
from conftest import no_hooks
from torch import nn

import featkd
from featkd import Distiller, Term
from featkd.errors import ConfigError
from featkd.losses import DistillLoss, FeaturePairLoss, FeatureSetLoss
from featkd.models import build_model


@pytest.fixture
def pair():
    torch.manual_seed(0)
    teacher = build_model("cnn", 5, (1, 8, 8), {"widths": (8, 16, 32)})
    student = build_model("cnn", 5, (1, 8, 8), {"widths": (4, 8, 16)})
    x = torch.randn(6, 1, 8, 8)
    y = torch.randint(0, 5, (6,))
    return teacher, student, x, y


def full_terms():
    return [
        Term("ce", weight=0.1),
        Term("kd", weight=0.9, temperature=4),
        Term("fitnet", student="layer2", teacher="layer3", weight=100),
        Term("at", student="layer*", teacher="layer*", weight=1000),
        Term("rkd", student="fc:in", teacher="fc:in"),
    ]


def test_losses_are_named_weighted_and_sum_to_the_loss(pair):
    teacher, student, x, y = pair
    distiller = Distiller(teacher, student, full_terms(), example_input=x)
    out = distiller(x, y)
    assert list(out.losses) == ["ce", "kd", "fitnet", "at", "rkd"]
    torch.testing.assert_close(out.loss, sum(out.losses.values()))
    torch.testing.assert_close(out.losses["kd"], 0.9 * out.parts["kd"])
    torch.testing.assert_close(out.losses["at"], 1000 * sum(out.parts[f"at/layer{i}"] for i in (1, 2, 3)))
    torch.testing.assert_close(out.losses["rkd"], out.parts["rkd/distance"] + out.parts["rkd/angle"])
    assert out.logits.shape == (6, 5) and out.teacher_logits.shape == (6, 5)
    # the KD part is KD on the two models' outputs
    with torch.no_grad():
        expected = featkd.losses.KDLoss(4)(student(x), teacher(x))
    torch.testing.assert_close(out.parts["kd"], expected, rtol=1e-4, atol=1e-5)


def test_gradients_reach_student_and_adapter_never_the_teacher(pair):
    teacher, student, x, y = pair
    distiller = Distiller(teacher, student, full_terms(), example_input=x)
    distiller(x, y).loss.backward()
    assert all(p.grad is not None for p in student.parameters())
    adapter_params = list(distiller.adapters["fitnet"].parameters())
    assert adapter_params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter_params)
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_parameters_and_state_dict_hold_student_adapters_and_loss_state_not_the_teacher(pair):
    teacher, student, x, _ = pair
    distiller = Distiller(teacher, student, full_terms(), example_input=x)
    params = {id(p) for p in distiller.parameters()}
    assert {id(p) for p in student.parameters()} <= params
    assert {id(p) for p in distiller.adapters.parameters()} <= params
    assert not params & {id(p) for p in teacher.parameters()}
    assert all(k.split(".")[0] in ("student", "adapters", "losses") for k in distiller.state_dict())


def test_teacher_batchnorm_statistics_do_not_change_during_distillation(pair):
    teacher, student, x, y = pair
    teacher.train()  # even if handed over in train mode
    before = copy.deepcopy(teacher.state_dict())
    distiller = Distiller(teacher, student, full_terms(), example_input=x)
    optimizer = torch.optim.SGD(distiller.parameters(), lr=0.1)
    distiller.train()
    for _ in range(3):
        optimizer.zero_grad()
        distiller(x, y).loss.backward()
        optimizer.step()
    teacher.train()  # a careless call mid-run is undone at the next step
    distiller(x, y)
    assert not teacher.training
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_student_batchnorm_statistics_do_change(pair):
    teacher, student, x, y = pair
    before = student.layer1[0].bn.running_mean.clone()
    distiller = Distiller(teacher, student, full_terms(), example_input=x)
    distiller.train()
    distiller(x, y)
    assert not torch.equal(student.layer1[0].bn.running_mean, before)


def test_probing_at_construction_does_not_change_any_model(pair):
    teacher, student, x, _ = pair
    student.train()
    s_before, t_before = copy.deepcopy(student.state_dict()), copy.deepcopy(teacher.state_dict())
    Distiller(teacher, student, full_terms(), example_input=x).close()
    assert all(torch.equal(v, s_before[k]) for k, v in student.state_dict().items())
    assert all(torch.equal(v, t_before[k]) for k, v in teacher.state_dict().items())
    assert student.training


def test_close_leaves_no_hooks(pair):
    teacher, student, x, y = pair
    with Distiller(teacher, student, full_terms(), example_input=x) as distiller:
        distiller(x, y)
    assert no_hooks(student) and no_hooks(teacher)


def test_ensemble_teachers_average_softened_probabilities(pair):
    teacher, student, x, y = pair
    torch.manual_seed(5)
    other = build_model("cnn", 5, (1, 8, 8), {"widths": (8, 16, 32)}).eval()
    distiller = Distiller([teacher, other], student, [Term("kd", temperature=2)], example_input=x)
    out = distiller(x, y)
    assert isinstance(out.teacher_logits, tuple) and len(out.teacher_logits) == 2
    with torch.no_grad():
        expected = featkd.losses.KDLoss(2)(student(x), (teacher(x), other(x)))
    torch.testing.assert_close(out.parts["kd"], expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="teacher_index"):
        Distiller([teacher, other], student, [Term("at", student="layer1", teacher="layer1", teacher_index=2)])


def test_feature_terms_read_the_chosen_teacher_of_an_ensemble(pair):
    teacher, student, x, y = pair
    wide = build_model("cnn", 5, (1, 8, 8), {"widths": (12, 24, 48)})
    distiller = Distiller([teacher, wide], student,
                          [Term("fitnet", student="layer3", teacher="layer3", teacher_index=1)], example_input=x)
    assert distiller.adapters["fitnet"][0].conv.out_channels == 48
    distiller(x, y).loss.backward()


def test_plain_training_without_a_teacher(pair):
    _, student, x, y = pair
    distiller = Distiller(None, student, ["ce"])
    out = distiller(x, y)
    torch.testing.assert_close(out.loss, nn.functional.cross_entropy(student(x), y))
    assert out.teacher_logits is None


def test_zero_weight_terms_are_skipped(pair):
    teacher, student, x, y = pair
    out = Distiller(teacher, student, [Term("ce"), Term("kd", weight=0.0)])(x, y)
    assert list(out.losses) == ["ce"]


def test_to_moves_teachers_with_the_student(pair):
    teacher, student, x, _ = pair
    distiller = Distiller(teacher, student, full_terms(), example_input=x).double()
    assert next(teacher.parameters()).dtype == torch.float64
    assert next(student.parameters()).dtype == torch.float64
    out = distiller(x.double(), torch.zeros(6, dtype=torch.long))
    assert out.loss.dtype == torch.float64


def test_custom_loss_module_as_a_term(pair):
    teacher, student, x, y = pair

    class L1Logits(DistillLoss):
        """Mean absolute logit difference."""

        def forward(self, s, t, targets=None):
            return (s - t).abs().mean()

    out = Distiller(teacher, student, [Term(L1Logits(), weight=2.0, name="l1")])(x, y)
    with torch.no_grad():
        torch.testing.assert_close(out.losses["l1"], 2 * (student(x) - teacher(x)).abs().mean(), rtol=1e-4, atol=1e-6)


def test_learnable_loss_state_is_optimized(pair):
    teacher, student, x, y = pair

    class Scaled(FeaturePairLoss):
        """MSE after a learnable scale."""

        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(0.5))

        def forward(self, s, t):
            return ((self.scale * s - t) ** 2).mean()

    distiller = Distiller(teacher, student, [Term(Scaled(), student="fc:in", teacher="fc:in", adapter="auto")],
                          example_input=x)
    assert any(p is distiller.losses["Scaled"].scale for p in distiller.parameters())
    distiller(x, y).loss.backward()
    assert distiller.losses["Scaled"].scale.grad is not None


def test_bad_terms_fail_at_construction_with_clear_messages(pair):
    teacher, student, x, _ = pair
    with pytest.raises(ConfigError, match="needs a teacher"):
        Distiller(None, student, ["kd"])
    with pytest.raises(ConfigError, match="give student= and teacher="):
        Distiller(teacher, student, [Term("at")])
    with pytest.raises(ConfigError, match="example_input"):
        Distiller(teacher, student, [Term("fitnet", student="layer2", teacher="layer2")])
    with pytest.raises(ConfigError, match="two terms are named 'kd'"):
        Distiller(teacher, student, ["kd", "kd"])
    with pytest.raises(ConfigError, match="differ in number"):
        Distiller(teacher, student, [Term("at", student="layer*", teacher="layer1")], example_input=x)
    with pytest.raises(featkd.errors.CaptureError, match="Did you mean 'layer3'"):
        Distiller(teacher, student, [Term("at", student="layer9", teacher="layer3")], example_input=x)
    with pytest.raises(featkd.errors.RegistryError, match="Did you mean 'kd'"):
        Term("kdd")
    with pytest.raises(ConfigError, match="unknown argument 'temprature'.*temperature"):
        Term("kd", temprature=2)
    with pytest.raises(featkd.errors.AdapterError, match="set adapter"):
        Distiller(teacher, student, [Term("fitnet", student="layer2", teacher="layer2", adapter=None)], example_input=x)
    with pytest.raises(featkd.errors.AdapterError, match="no adapter maps"):
        Distiller(teacher, student, [Term("fitnet", student="fc:in", teacher="layer3")], example_input=x)


def test_labels_are_required_by_cross_entropy(pair):
    teacher, student, x, _ = pair
    with pytest.raises(ConfigError, match="needs labels"):
        Distiller(teacher, student, ["ce"])(x)


def test_inplace_features_are_captured_before_the_relu(pair):
    teacher, student, x, y = pair
    # layer1.0.bn is followed by an in-place ReLU in the built-in models
    seen = []

    class Record(FeaturePairLoss):
        """Keeps what it was given."""

        def forward(self, s, t):
            seen.append((s.detach(), t))
            return (s - t).pow(2).mean()

    distiller = Distiller(teacher, student, [Term(Record(), student="layer1.0.bn", teacher="layer1.0.bn",
                                                  adapter="auto")], example_input=x)
    assert distiller.cloned_features == {"student": ["layer1.0.bn"], "teacher0": ["layer1.0.bn"]}
    distiller(x, y)
    student_bn, teacher_bn = seen[-1]
    assert (student_bn < 0).any() and (teacher_bn < 0).any()  # pre-ReLU values survived
    with torch.no_grad():
        expected = teacher.layer1[0].bn(teacher.layer1[0].conv(x))
    torch.testing.assert_close(teacher_bn, expected)


def test_a_loss_written_with_the_old_consumes_flags_still_works_and_is_told_its_kind(pair):
    teacher, student, x, y = pair
    with pytest.warns(DeprecationWarning, match="subclass featkd.losses.FeatureSetLoss"):
        class Layers(DistillLoss):
            """Sum over pairs of mean squared distance, given all pairs at once."""

            consumes = "features"
            pairwise = False

            def forward(self, students, teachers):
                return [(s - t).pow(2).mean() for s, t in zip(students, teachers)]

    out = Distiller(teacher, student, [Term(Layers(), student="layer3", teacher="layer3", adapter="auto")],
                    example_input=x)(x, y)
    assert list(out.losses) == ["Layers"] and torch.isfinite(out.loss)


def test_a_feature_set_loss_gets_every_pair_at_once(pair):
    teacher, student, x, y = pair
    calls = []

    class Count(FeatureSetLoss):
        """Records how many pairs it is given."""

        def forward(self, students, teachers):
            calls.append(len(students))
            return [(s.mean() - t.mean()).pow(2) for s, t in zip(students, teachers)]

    out = Distiller(teacher, student, [Term(Count(), student="layer*", teacher="layer*")], example_input=x)(x, y)
    assert calls == [3] and set(out.parts) == {"Count/layer1", "Count/layer2", "Count/layer3"}
