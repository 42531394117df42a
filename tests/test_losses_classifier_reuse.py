"""SimKD and SRD: the written-out formulas, the teacher's classifier reused and frozen, and the
student that answers through SimKD's head everywhere after training (evaluation, summary,
checkpoints, the stage cache, export)."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from featkd import Distiller, Term
from featkd.config import load_config
from featkd.errors import ConfigError
from featkd.evaluation import evaluate
from featkd.heads import HeadedStudent, head_payload, with_head
from featkd.losses import LOSSES, ReusedTeacherClassifier, SoftmaxRegression
from featkd.models import build_model, model_from_checkpoint
from featkd.checkpoint import load_checkpoint
from featkd.trainer import train


def batch_norm(x: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """Training-mode batch norm written out: statistics over every axis but the channels."""
    axes = [0, *range(2, x.dim())]
    mean = x.mean(axes, keepdim=True)
    var = x.var(axes, keepdim=True, unbiased=False)
    shape = [1, -1] + [1] * (x.dim() - 2)
    return (x - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(shape) + bn.bias.view(shape)


def simkd_reference(loss: ReusedTeacherClassifier, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """SimKD's loss from the projector's weights: conv -> BN -> ReLU three times, then the MSE
    with the teacher's map, the larger map average-pooled to the smaller first."""
    if f_s.shape[-1] > f_t.shape[-1]:
        f_s = F.adaptive_avg_pool2d(f_s, f_t.shape[-2:])
    elif f_s.shape[-1] < f_t.shape[-1]:
        f_t = F.adaptive_avg_pool2d(f_t, f_s.shape[-2:])
    p = loss.head.projector
    h = F.relu(batch_norm(F.conv2d(f_s, p[0].weight), p[1]))
    h = F.relu(batch_norm(F.conv2d(h, p[3].weight, padding=1), p[4]))
    h = F.relu(batch_norm(F.conv2d(h, p[6].weight), p[7]))
    return ((h - f_t) ** 2).sum() / h.numel()


def bound_simkd(s_shape, t_shape, classes=5, **kwargs):
    torch.manual_seed(0)
    loss = ReusedTeacherClassifier(**kwargs)
    loss.bind([s_shape, (classes,)], [t_shape, (classes,)])
    teacher_fc = nn.Linear(t_shape[0], classes)
    loss.bind_classifier(teacher_fc)
    return loss, teacher_fc


@pytest.mark.parametrize("s_shape, t_shape", [((6, 4, 4), (8, 4, 4)), ((6, 8, 8), (8, 4, 4)),
                                              ((6, 2, 2), (8, 4, 4))])
def test_simkd_is_the_written_out_projection_error_with_the_larger_map_pooled(s_shape, t_shape):
    loss, _ = bound_simkd(s_shape, t_shape)
    f_s, f_t = torch.randn(5, *s_shape), torch.randn(5, *t_shape)
    assert loss([f_s, torch.randn(5, 5)], [f_t, torch.randn(5, 5)]).item() == pytest.approx(
        simkd_reference(loss, f_s, f_t).item(), rel=1e-5)


def test_the_projector_is_the_papers_bottleneck():
    loss, _ = bound_simkd((6, 4, 4), (8, 4, 4), factor=2)
    convs = [m for m in loss.head.projector if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(6, 4, (1, 1)), (4, 4, (3, 3)),
                                                                              (4, 8, (1, 1))]
    assert all(c.bias is None for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in loss.head.projector) == 3


def test_simkd_answers_with_the_teachers_classifier_on_the_pooled_projection():
    loss, teacher_fc = bound_simkd((6, 8, 8), (8, 4, 4))
    head = loss.inference_head().eval()
    f_s = torch.randn(3, 6, 8, 8)
    projected = head.projector(F.adaptive_avg_pool2d(f_s, (4, 4)))
    assert torch.allclose(head(f_s), teacher_fc(projected.mean((2, 3))), atol=1e-6)
    # a frozen copy: the teacher's own module is not shared, and the loss does not train it
    assert head.classifier is not teacher_fc and torch.equal(head.classifier.weight, teacher_fc.weight)
    assert not any(p.requires_grad for p in head.classifier.parameters())
    trained = {id(p) for p in loss.trained_parameters()}
    assert trained == {id(p) for p in head.projector.parameters()}


def test_simkd_on_signals_projects_with_one_dimensional_convolutions():
    loss, teacher_fc = bound_simkd((6, 20), (8, 10))
    assert any(isinstance(m, nn.Conv1d) for m in loss.head.projector)
    f_s, f_t = torch.randn(4, 6, 20), torch.randn(4, 8, 10)
    value = loss([f_s, torch.randn(4, 5)], [f_t, torch.randn(4, 5)])
    assert value.item() > 0 and loss.inference_head()(f_s).shape == (4, 5)


def srd_reference(loss: SoftmaxRegression, h_s, h_t, z_t, teacher_fc):
    """SRD's two parts, from the connector's weights (linear, BN, ReLU on a pooled vector)."""
    layer, bn = loss.head.projector[0], loss.head.projector[1]
    h = F.relu(batch_norm(h_s @ layer.weight.T, bn))
    fm = ((h - h_t) ** 2).mean()
    sr = ((h @ teacher_fc.weight.T + teacher_fc.bias - z_t) ** 2).mean()
    return fm, sr


@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.5, 3.0)])
def test_srd_is_the_written_out_feature_and_softmax_regression_errors(weights):
    torch.manual_seed(0)
    loss = SoftmaxRegression(feature_weight=weights[0], regression_weight=weights[1])
    loss.bind([(6,), (5,)], [(8,), (5,)])
    teacher_fc = nn.Linear(8, 5)
    loss.bind_classifier(teacher_fc)
    h_s, h_t, z_t = torch.randn(7, 6), torch.randn(7, 8), torch.randn(7, 5)
    parts = loss([h_s, torch.randn(7, 5)], [h_t, z_t])
    fm, sr = srd_reference(loss, h_s, h_t, z_t, teacher_fc)
    assert parts["feature"].item() == pytest.approx(weights[0] * fm.item(), rel=1e-5)
    assert parts["regression"].item() == pytest.approx(weights[1] * sr.item(), rel=1e-5)


def test_srd_on_maps_connects_before_pooling():
    torch.manual_seed(0)
    loss = SoftmaxRegression()
    loss.bind([(6, 4, 4), (5,)], [(8, 2, 2), (5,)])
    loss.bind_classifier(nn.Linear(8, 5))
    f_s, f_t = torch.randn(4, 6, 4, 4), torch.randn(4, 8, 2, 2)
    conv, bn = loss.head.projector[0], loss.head.projector[1]
    pooled = F.relu(batch_norm(F.conv2d(f_s, conv.weight), bn)).mean((2, 3))
    parts = loss([f_s, torch.randn(4, 5)], [f_t, torch.randn(4, 5)])
    assert parts["feature"].item() == pytest.approx(((pooled - f_t.mean((2, 3))) ** 2).mean().item(), rel=1e-5)


def test_srd_is_zero_when_the_connected_student_is_the_teacher():
    loss = SoftmaxRegression()
    loss.bind([(4,), (3,)], [(4,), (3,)])
    teacher_fc = nn.Linear(4, 3)
    loss.bind_classifier(teacher_fc)
    loss.eval()  # the connector as identity: weight I, BN at its initial running statistics
    with torch.no_grad():
        loss.head.projector[0].weight.copy_(torch.eye(4))
    h = torch.rand(6, 4)  # BN in eval: x / sqrt(1 + eps); ReLU keeps the positives
    h_t = h / (1 + loss.head.projector[1].eps) ** 0.5
    parts = loss([h, torch.zeros(6, 3)], [h_t, teacher_fc(h_t)])
    assert parts["feature"].item() == pytest.approx(0, abs=1e-10)
    assert parts["regression"].item() == pytest.approx(0, abs=1e-10)


# -- through the Distiller ------------------------------------------------------------------


def cnn_pair():
    torch.manual_seed(0)
    return (build_model("cnn", 10, (1, 8, 8), {"widths": (8, 16, 32)}),
            build_model("cnn", 10, (1, 8, 8), {"widths": (4, 8, 16)}))


def test_simkd_trains_the_projector_and_the_network_not_its_classifier_nor_the_teachers():
    teacher, student = cnn_pair()
    teacher_state = copy.deepcopy(teacher.state_dict())
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    distiller = Distiller(teacher, student, [Term("simkd", student=["layer3", "fc"], teacher=["layer3", "fc"])],
                          example_input=x)
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.1)
    distiller.train()
    distiller(x, y).loss.backward()
    head = distiller.losses["simkd"].head
    assert all(p.grad is not None for p in head.projector.parameters())
    assert student.layer3[0].conv.weight.grad is not None and student.fc.weight.grad is None
    assert all(p.grad is None for p in head.classifier.parameters())
    optimizer.step()
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())
    assert torch.equal(head.classifier.weight, teacher.fc.weight)
    assert distiller.leaves_parameters_unused  # DDP must look for the unused classifier


def test_the_deployed_student_is_the_network_then_the_head_and_rebuilds_from_its_payload():
    teacher, student = cnn_pair()
    x = torch.randn(16, 1, 8, 8)
    distiller = Distiller(teacher, student, [Term("simkd", student=["layer3", "fc"], teacher=["layer3", "fc"])],
                          example_input=x)
    deployed = distiller.deployed.eval()
    assert isinstance(deployed, HeadedStudent) and deployed.network is student
    hooks = dict(student.layer3._forward_hooks)  # the Distiller's capture
    head = distiller.losses["simkd"].head
    with torch.no_grad():
        maps = student.layer3(student.layer2(student.layer1(x)))
        assert torch.allclose(deployed(x), head(maps), atol=1e-6)
        rebuilt = with_head(copy.deepcopy(student), head_payload(deployed)).eval()
        assert torch.allclose(rebuilt(x), deployed(x), atol=1e-6)
    # a hook only while it runs: the network is left as it was
    assert dict(student.layer3._forward_hooks) == hooks
    # SRD answers with the student's own classifier unless asked
    srd = Term("srd", student=["fc:in", "fc"], teacher=["fc:in", "fc"])
    assert Distiller(teacher, student, [srd], example_input=x).deployed is student
    asked = Term("srd", student=["fc:in", "fc"], teacher=["fc:in", "fc"], classify_with_teacher=True)
    assert isinstance(Distiller(teacher, student, [asked], example_input=x).deployed, HeadedStudent)


@pytest.mark.parametrize("terms, message", [
    ([Term("simkd", student="layer3", teacher="layer3")], "two pairs"),
    ([Term("simkd", student=["layer3", "fc"], teacher=["layer3", "fc:in"])], "classifiers' outputs"),
    ([Term("simkd", student=["layer2", "fc"], teacher=["layer2", "fc"])], "takes 32 features"),
    ([Term("simkd", student=["layer3", "fc"], teacher=["layer3", "fc"], adapter="auto")], "adapter unset"),
    ([Term("simkd", student=["layer3", "fc"], teacher=["layer3", "fc"]),
      Term("srd", student=["fc:in", "fc"], teacher=["fc:in", "fc"], classify_with_teacher=True)], "keep one"),
    ([Term("simkd", student=["fc:in", "fc"], teacher=["fc:in", "fc"])], "conv maps"),
])
def test_wrong_wiring_stops_at_set_up_with_what_to_name(terms, message):
    teacher, student = cnn_pair()
    with pytest.raises(ConfigError, match=message):
        Distiller(teacher, student, terms, example_input=torch.randn(4, 1, 8, 8))


@pytest.mark.parametrize("cls, kwargs, message", [
    (ReusedTeacherClassifier, {"factor": 0}, "factor"), (ReusedTeacherClassifier, {"factor": 1.5}, "factor"),
    (SoftmaxRegression, {"feature_weight": -1}, "feature_weight"),
    (SoftmaxRegression, {"classify_with_teacher": "yes"}, "true or false"),
])
def test_bad_hyper_parameters_are_refused(cls, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        cls(**kwargs)


def test_unbound_use_says_how_to_bind():
    with pytest.raises(ConfigError, match="bind"):
        ReusedTeacherClassifier()([torch.randn(2, 4, 2, 2)], [torch.randn(2, 4, 2, 2)])


def test_both_are_registered_with_the_authors_defaults():
    assert LOSSES.get("simkd") is ReusedTeacherClassifier and LOSSES.get("srd") is SoftmaxRegression
    assert ReusedTeacherClassifier().factor == 2 and ReusedTeacherClassifier.default_weight == 1.0
    srd = SoftmaxRegression()
    assert (srd.feature_weight, srd.regression_weight, srd.classify_with_teacher) == (1.0, 1.0, False)


# -- the trainer ----------------------------------------------------------------------------


def chain(tmp_path, student_stage: dict | None = None, extra: list | None = None) -> dict:
    student = {"name": "student", "model": "student", "teacher": "teacher", "cache": True,
               "loss": {"simkd": {"student": ["layer3", "fc"], "teacher": ["layer3", "fc"]}},
               "train": {"epochs": 1}, **(student_stage or {})}
    return {"name": "simkd", "output_dir": str(tmp_path), "logger": "none", "progress": False,
            "measure": {"latency": False},
            "data": {"name": "digits", "args": {"augment": False}},
            "models": {"teacher": {"model": "cnn_tiny"}, "student": {"model": "cnn", "args": {"widths": [4, 4, 8]}}},
            "stages": [{"name": "teacher", "model": "teacher", "cache": True, "train": {"epochs": 1}}, student,
                       *(extra or [])]}


def test_a_simkd_run_evaluates_records_caches_and_exports_the_student_with_its_head(tmp_path):
    pytest.importorskip("onnxruntime")
    from featkd.deploy.export import export

    config = chain(tmp_path)
    trained = train(load_config(data=config))
    assert "simkd's head on its feature 'layer3'" in trained.student_head
    # the footprint counts the head: network + projector + the teacher's classifier
    student = build_model("cnn", 10, (1, 8, 8), {"widths": [4, 4, 8]})
    own = sum(p.numel() for p in student.parameters())
    assert trained.student_params > own + 16 * 10
    payload = load_checkpoint(trained.run_dir / "checkpoints" / "last.pt")
    assert payload["head"]["loss"] == "simkd"
    model = model_from_checkpoint(payload).eval()
    assert isinstance(model, HeadedStudent)
    from featkd.data import build_data
    from torch.utils.data import DataLoader

    test = DataLoader(build_data("digits", {"augment": False}).test, batch_size=128)
    assert evaluate(model, test, torch.device("cpu"))["acc"] == pytest.approx(trained.student.last_acc)
    summary = json.loads((trained.run_dir / "summary.json").read_text())
    assert "simkd" in summary["run"]["student_head"]
    cached = train(load_config(data=config))  # both stages from the stage cache, the head with them
    assert json.loads((cached.run_dir / "state.json").read_text())["stages"]["student"]["status"] == "cached"
    assert cached.student_head == trained.student_head and cached.student_params == trained.student_params
    exported = export(cached.run_dir, "onnx", measure=False, out=tmp_path / "export")
    assert exported.passed and exported.parity["exported_top1"] == pytest.approx(trained.student.last_acc)
    assert "simkd's head" in (exported.folder / "model_card.md").read_text()


def test_a_headed_student_must_be_its_models_last_stage(tmp_path):
    later = [{"name": "again", "model": "student", "teacher": "teacher", "loss": {"kd": {"weight": 1.0}},
              "train": {"epochs": 1}}]
    with pytest.raises(ConfigError, match="trains it further"):
        train(load_config(data=chain(tmp_path, extra=later)))
    with pytest.raises(ConfigError, match="quantization-aware"):
        train(load_config(data=chain(tmp_path, {"train": {"epochs": 1, "quantization_aware": True}})))
