"""DeiT (Touvron et al. 2021) and ViT <-> CNN distillation: the distilled DeiT's two heads,
the DeiT terms against independent implementations, and cross-architecture adapters."""

import copy

import numpy as np
import pytest
import torch

from featkd import Distiller, Term
from featkd.capture import logits_of
from featkd.errors import CaptureError, ConfigError, ModelError
from featkd.losses import LOSSES, DeiTHardDistillation, DeiTSoftDistillation
from featkd.models import build_model

VIT = {"img_size": 8, "patch_size": 2, "embed_dim": 32, "depth": 2, "num_heads": 4}
SHAPE = (1, 8, 8)


def np_log_softmax(z: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = z / temperature
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def t64(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64)


def deit(name: str = "timm:deit_tiny_distilled_patch16_224", **args) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(name, 10, SHAPE, {**VIT, **args})


def cnn_teacher() -> torch.nn.Module:
    torch.manual_seed(1)
    return build_model("cnn", 10, SHAPE, {"widths": (8, 16, 32)}).eval()


@pytest.fixture
def batch():
    torch.manual_seed(2)
    return torch.randn(8, *SHAPE), torch.randint(0, 10, (8,))


# -- models --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["timm:vit_tiny_patch16_224", "timm:deit_tiny_patch16_224",
                                  "timm:deit_tiny_distilled_patch16_224"])
def test_timm_vits_build_for_8x8_digits(name, batch):
    model = deit(name).eval()
    assert model.patch_embed.proj.in_channels == 1 and tuple(model.patch_embed.grid_size) == (4, 4)
    assert model(batch[0]).shape == (8, 10)


def test_distilled_deit_averages_its_heads_in_eval_and_trains_them_apart(batch):
    model = deit()
    x = batch[0]
    model.eval()
    with torch.no_grad():
        tokens = model.forward_features(x)
        cls_logits, dist_logits = model.head(tokens[:, 0]), model.head_dist(tokens[:, 1])
        assert not torch.allclose(cls_logits, dist_logits)
        torch.testing.assert_close(model(x), (cls_logits + dist_logits) / 2)
        model.train()  # no dropout in these models: the same tokens in train mode
        output = model(x)
    assert isinstance(output, tuple) and len(output) == 2
    torch.testing.assert_close(logits_of(output), cls_logits)  # the task loss reads the class head
    torch.testing.assert_close(output[1], dist_logits)


def test_distilled_training_can_be_turned_off_and_only_applies_to_distilled_models(batch):
    model = deit(distilled_training=False).train()
    assert isinstance(model(batch[0]), torch.Tensor)  # timm's default: the heads averaged
    with pytest.raises(ModelError, match="no distillation token"):
        deit("timm:vit_tiny_patch16_224", distilled_training=True)


def test_pretrained_weights_are_still_refused():
    with pytest.raises(ModelError, match="never downloads"):
        build_model("timm:deit_tiny_distilled_patch16_224", 10, SHAPE, {**VIT, "pretrained": True})


# -- the DeiT terms -------------------------------------------------------------------------


def test_registered_with_the_papers_defaults():
    hard, soft = LOSSES.get("deit_hard"), LOSSES.get("deit_soft")
    assert (hard, soft) == (DeiTHardDistillation, DeiTSoftDistillation)
    assert hard.default_weight == 0.5 and hard().label_smoothing == 0.0
    assert soft.default_weight == 0.1 and soft().temperature == 3.0
    assert Term("deit_hard", student="head_dist", teacher="fc").adapter is None


def test_hard_distillation_is_cross_entropy_with_the_teachers_argmax():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(2, 6, 5)) * 2
    y_t = t.argmax(1)
    expected = -np_log_softmax(s)[np.arange(6), y_t].mean()
    assert DeiTHardDistillation()(t64(s), t64(t)).item() == pytest.approx(expected)
    # with label smoothing eps: target (1 - eps) one-hot + eps / C everywhere
    eps, c = 0.2, s.shape[1]
    target = np.full_like(s, eps / c)
    target[np.arange(6), y_t] += 1 - eps
    expected = -(target * np_log_softmax(s)).sum(1).mean()
    assert DeiTHardDistillation(label_smoothing=eps)(t64(s), t64(t)).item() == pytest.approx(expected)
    # only the teacher's decision counts, not its confidence
    assert DeiTHardDistillation()(t64(s), t64(t * 10)).item() == pytest.approx(DeiTHardDistillation()(t64(s), t64(t)).item())


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_soft_distillation_is_tau_squared_kl_from_the_teacher(temperature):
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=(2, 6, 5)) * 2
    log_p_s, log_p_t = np_log_softmax(s, temperature), np_log_softmax(t, temperature)
    kl = (np.exp(log_p_t) * (log_p_t - log_p_s)).sum(1).mean()
    loss = DeiTSoftDistillation(temperature=temperature)
    assert loss(t64(s), t64(t)).item() == pytest.approx(temperature**2 * kl)
    assert loss(t64(t), t64(t)).item() == pytest.approx(0.0, abs=1e-12)


def test_bad_hyper_parameters_are_refused():
    with pytest.raises(ConfigError, match="temperature"):
        DeiTSoftDistillation(temperature=0)
    with pytest.raises(ConfigError, match="label_smoothing"):
        DeiTHardDistillation(label_smoothing=1.5)


@pytest.mark.parametrize("loss", ["deit_hard", "deit_soft"])
def test_gradients_reach_the_distillation_head_never_the_teacher(loss, batch):
    teacher, student = cnn_teacher(), deit()
    teacher_state = copy.deepcopy(teacher.state_dict())
    x, y = batch
    distiller = Distiller(teacher, student, [Term(loss, 1.0, student="head_dist", teacher="fc")], example_input=x)
    distiller.train()
    out = distiller(x, y)
    assert list(out.losses) == [loss] and out.loss.item() > 0
    out.loss.backward()
    assert student.head_dist.weight.grad.abs().sum() > 0
    assert student.dist_token.grad.abs().sum() > 0
    assert student.head.weight.grad is None  # the class head is the task loss's, not this term's
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())


def test_a_deit_distiller_step_with_a_cnn_teacher(batch):
    """The paper's hard-label objective, end to end: the class head learns the labels, the
    distillation head the teacher's decisions; eval predicts with the average of the heads."""
    teacher, student = cnn_teacher(), deit()
    x, y = batch
    terms = [Term("ce", 0.5), Term("deit_hard", student="head_dist", teacher="fc")]
    distiller = Distiller(teacher, student, terms, example_input=x)
    optimizer = torch.optim.AdamW(distiller.trainable_parameters(), lr=1e-3)
    distiller.train()
    out = distiller(x, y)
    with torch.no_grad():
        tokens = student.forward_features(x)
        cls_logits, dist_logits = student.head(tokens[:, 0]), student.head_dist(tokens[:, 1])
        teacher_logits = teacher(x)
    torch.testing.assert_close(out.logits, cls_logits)
    expected = 0.5 * torch.nn.functional.cross_entropy(cls_logits, y) \
        + 0.5 * torch.nn.functional.cross_entropy(dist_logits, teacher_logits.argmax(1))
    torch.testing.assert_close(out.loss.detach(), expected)
    out.loss.backward()
    assert student.head.weight.grad.abs().sum() > 0 and student.head_dist.weight.grad.abs().sum() > 0
    before = student.head_dist.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(student.head_dist.weight, before)
    student.eval()
    with torch.no_grad():
        tokens = student.forward_features(x)
        torch.testing.assert_close(student(x), (student.head(tokens[:, 0]) + student.head_dist(tokens[:, 1])) / 2)


@pytest.mark.parametrize("student_name", ["cnn", "timm:vit_tiny_patch16_224"])
def test_a_student_without_a_distillation_head_is_told_what_to_use(student_name, batch):
    teacher = cnn_teacher()
    student = build_model(student_name, 10, SHAPE, VIT if student_name.startswith("timm:") else None)
    with pytest.raises(CaptureError, match="student has no module 'head_dist'.*distilled DeiT student"):
        Distiller(teacher, student, [Term("deit_hard", student="head_dist", teacher="fc")], example_input=batch[0])
    # a feature that is no distillation head (tokens) says what a DeiT term needs
    with pytest.raises(ConfigError, match=r"distilled DeiT student.*timm:deit_tiny_distilled_patch16_224.*head_dist"):
        Distiller(teacher, deit(), [Term("deit_soft", student="blocks.1", teacher="fc")], example_input=batch[0])
    with pytest.raises(ConfigError, match="same classes"):
        Distiller(teacher, deit(), [Term("deit_soft", student="head_dist", teacher="fc:in")], example_input=batch[0])


# -- ViT <-> CNN through adapters -------------------------------------------------------------


def one_step(teacher, student, terms, x, y):
    distiller = Distiller(teacher, student, terms, example_input=x)
    optimizer = torch.optim.AdamW(distiller.trainable_parameters(), lr=1e-3)
    distiller.train()
    out = distiller(x, y)
    out.loss.backward()
    grads = {name: p.grad for name, p in student.named_parameters()}
    optimizer.step()
    return distiller, out, grads


@pytest.mark.parametrize("adapter", ["tokens_to_map", "auto"])
def test_vit_student_learns_a_cnn_teachers_map_through_tokens_to_map(adapter, batch):
    x, y = batch
    teacher, student = cnn_teacher(), deit("timm:vit_tiny_patch16_224")
    terms = [Term("ce", 0.1), Term("kd", 0.9),
             Term("fitnet", 1.0, student="blocks.1", teacher="layer2", adapter=adapter)]
    distiller, out, grads = one_step(teacher, student, terms, x, y)
    adapted = distiller.adapters["fitnet"][0]
    assert type(adapted).__name__ == "TokensToMap" and adapted.extra == 1  # the class token dropped
    assert adapted(torch.randn(2, 17, 32)).shape == (2, 16, 4, 4)  # the teacher's layer2
    assert set(out.losses) == {"ce", "kd", "fitnet"} and torch.isfinite(out.loss)
    assert grads["blocks.0.attn.qkv.weight"].abs().sum() > 0
    assert all(p.grad is not None for p in adapted.parameters())


@pytest.mark.parametrize("adapter", ["map_to_tokens", "auto"])
def test_cnn_student_learns_a_vit_teachers_tokens_through_map_to_tokens(adapter, batch):
    x, y = batch
    teacher = deit("timm:vit_tiny_patch16_224").eval()
    torch.manual_seed(3)
    student = build_model("cnn", 10, SHAPE, {"widths": (4, 8, 16)})
    teacher_state = copy.deepcopy(teacher.state_dict())
    terms = [Term("ce", 0.1), Term("kd", 0.9),
             Term("fitnet", 1.0, student="layer2", teacher="norm", adapter=adapter)]
    distiller, out, grads = one_step(teacher, student, terms, x, y)
    adapted = distiller.adapters["fitnet"][0]
    assert type(adapted).__name__ == "MapToTokens" and adapted.extra == 1
    assert adapted(torch.randn(2, 8, 4, 4)).shape == (2, 17, 32)  # class token + 16 patches
    assert torch.isfinite(out.loss)
    assert grads["layer1.0.conv.weight"].abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())
