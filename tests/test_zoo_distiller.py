"""Every registered loss wired through the Distiller on real models: gradients, stages, set-up errors."""

import copy

import pytest
import torch

from featkd import Distiller, Term
from featkd.data import build_data, collate_of
from featkd.errors import ConfigError, FeatkdError
from featkd.losses import LOSSES
from featkd.models import build_model


def builtin_losses() -> list[str]:
    return [n for n in LOSSES.names() if LOSSES.get(n).__module__.startswith("featkd.losses")]


BUILTIN = builtin_losses()
STAGED = [n for n in BUILTIN if LOSSES.get(n).pretrain is not None]


def test_every_registered_loss_has_an_example_on_builtin_models():
    """A loss is run by the tests below from its `example`; a feature loss without one could not be."""
    for name in BUILTIN:
        cls = LOSSES.get(name)
        assert not cls.reads_features or (cls.example.student and cls.example.teacher), name


@pytest.fixture(scope="module")
def data():
    bundle = build_data("digits", {"augment": False})
    return bundle


@pytest.fixture(scope="module")
def text():
    return build_data("generated_sentiment", {"train_size": 64, "test_size": 16, "max_length": 16})


def models(kind: str = "cnn", bundle=None):
    """The example pairs of `losses.base.Example`: CNNs on digits, transformers on text."""
    torch.manual_seed(0)
    if kind == "transformer":
        shape, text = bundle.input_shape, bundle.text
        teacher = build_model("transformer", 2, shape, {"layers": 4, "hidden": 32, "heads": 4}, text=text)
        student = build_model("transformer", 2, shape, {"layers": 2, "hidden": 16, "heads": 4}, text=text)
        return teacher, student
    teacher = build_model("cnn", 10, (1, 8, 8), {"widths": (8, 16, 32)})
    student = build_model("cnn", 10, (1, 8, 8), {"widths": (4, 8, 16)})
    return teacher, student


def example_setting(name: str, data, text):
    """(teacher, student, a batch of inputs to set up with, the dataset) of a loss's example."""
    kind = LOSSES.get(name).example.models
    bundle = text if kind == "transformer" else data
    teacher, student = models(kind, bundle)
    if kind == "transformer":
        x0 = next(iter(torch.utils.data.DataLoader(bundle.train, batch_size=16, collate_fn=bundle.train.collate)))[0]
    else:
        x0 = bundle.train.inputs[:16]
    return teacher, student, x0, bundle


def term_for(name: str) -> Term:
    example = LOSSES.get(name).example
    weight = 1.0  # weights of 0 (AB, FSP) would skip the term
    return Term(name, weight, student=example.student, teacher=example.teacher, adapter=example.adapter,
                **example.params)


def batch(data, distiller: Distiller, size: int = 16):
    train = distiller.prepare_data(data.train)
    loader = torch.utils.data.DataLoader(train, batch_size=size, collate_fn=collate_of(train))
    x, y, *rest = next(iter(loader))
    return x, y, (rest[0] if rest else {})


@pytest.mark.parametrize("name", BUILTIN)
def test_each_loss_trains_the_student_and_its_own_parts_never_the_teacher(name, data, text):
    teacher, student, x0, data = example_setting(name, data, text)
    teacher_state = copy.deepcopy(teacher.state_dict())
    distiller = Distiller(teacher, student, [term_for(name)], example_input=x0)
    x, y, extras = batch(data, distiller)
    distiller.train()
    out = distiller(x, y, **extras)
    assert torch.isfinite(out.loss) and out.loss.item() != 0.0
    out.loss.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    own = list(distiller.losses[name].trained_parameters()) + list(distiller.adapters.parameters())
    assert all(p.grad is not None for p in own)
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())


@pytest.mark.parametrize("name", STAGED)
def test_pretraining_stages_train_what_they_declare(name, data):
    teacher, student = models()
    x0 = data.train.inputs[:16]
    distiller = Distiller(teacher, student, [term_for(name)], example_input=x0)
    assert [n for n, _ in distiller.pretrain_stages()] == [name]
    stage = LOSSES.get(name).pretrain
    objective = distiller.pretraining(name)
    params = objective.trainable_parameters()
    ids = {id(p) for p in params}
    student_ids = {id(p) for p in student.parameters()}
    assert ("student" in stage.trains) == bool(ids & student_ids)
    if "adapters" in stage.trains and name in distiller.adapters:
        assert {id(p) for p in distiller.adapters[name].parameters()} <= ids
    x, y, extras = batch(data, distiller)
    bn_before = student.layer1[0].bn.running_mean.clone()
    distiller.train()
    out = objective(x, y, **extras)
    assert list(out.losses) == [f"{name}/pretrain"]
    out.loss.backward()
    non_student = [p for p in params if id(p) not in student_ids]
    assert all(p.grad is not None for p in non_student)  # adapters, paraphraser
    if not stage.uses_student:  # FT: the student does not even run
        assert torch.equal(student.layer1[0].bn.running_mean, bn_before)
        assert all(p.grad is None for p in student.parameters())
    else:  # the layers up to the matched ones learn; the classifier gets no gradient
        assert student.layer1[0].conv.weight.grad is not None
        assert student.fc.weight.grad is None
    # back to normal distillation outside the block
    assert list(distiller(x, y, **extras).losses) == [name]


def test_fsp_with_unequal_channels_and_no_adapter_stops_at_set_up(data):
    teacher, student = models()
    with pytest.raises(ConfigError, match="adapter: auto"):
        Distiller(teacher, student, [Term("fsp", 1.0, student="layer[12]", teacher="layer[12]")],
                  example_input=data.train.inputs[:4])


def test_crd_without_sample_indices_says_how_to_supply_them(data):
    teacher, student = models()
    distiller = Distiller(teacher, student, [Term("crd", student="fc:in", teacher="fc:in")],
                          example_input=data.train.inputs[:4])
    x, y = data.train.inputs[:8], data.train.targets[:8]
    with pytest.raises(ConfigError, match=r"needs 'index' in every batch.*prepare_data"):
        distiller(x, y)
    with pytest.raises(ConfigError, match="prepare_data"):
        distiller(x, y, index=torch.arange(8))


def test_learnable_parts_need_probed_shapes(data):
    teacher, student = models()
    with pytest.raises(ConfigError, match="example_input"):
        Distiller(teacher, student, [Term("vid", student="layer2", teacher="layer2")])


def test_epochs_reach_the_losses(data):
    teacher, student = models()
    distiller = Distiller(teacher, student, [Term("dkd", warmup=10)])
    distiller.set_epoch(5)
    x, y = data.train.inputs[:8], data.train.targets[:8]
    half = distiller(x, y).losses["dkd"]
    distiller.set_epoch(10)
    full = distiller(x, y).losses["dkd"]
    assert half.item() == pytest.approx(full.item() / 2, rel=1e-5)


def test_unused_features_are_not_kept(data):
    teacher, student = models()
    distiller = Distiller(teacher, student, [Term("ce"), Term("ab", student="layer1.0.bn", teacher="layer1.0.bn")],
                          example_input=data.train.inputs[:4])
    # AB has weight 0 in distillation: the teacher need not run and nothing is captured
    calls = []
    handle = teacher.register_forward_hook(lambda *a: calls.append(1))
    out = distiller(data.train.inputs[:8], data.train.targets[:8])
    handle.remove()
    assert list(out.losses) == ["ce"] and not calls


def test_pretraining_is_an_objective_not_a_mode(data):
    teacher, student = models()
    distiller = Distiller(teacher, student, [term_for("fitnet")], example_input=data.train.inputs[:4])
    with pytest.raises(FeatkdError, match="call it instead of the Distiller"):
        with distiller.pretraining("fitnet"):
            pass
    with pytest.raises(ConfigError, match="no pre-training stage"):
        Distiller(teacher, student, ["ce"]).pretraining("ce")


TOKEN_LEVEL = [n for n in BUILTIN if LOSSES.get(n).reads_mask]


@pytest.mark.parametrize("name", TOKEN_LEVEL)
def test_token_level_losses_ignore_padding_end_to_end(name, text):
    """Through the Distiller, on padded batches: what sits at padded positions changes nothing.
    Logit losses run on masked-LM models, whose logits exist at every position."""
    logit_loss = not LOSSES.get(name).reads_features
    bundle = build_data("generated_sentiment", {"train_size": 64, "test_size": 16, "max_length": 16,
                                                "task": "masked_lm"}) if logit_loss else text
    teacher, student = models("transformer", bundle)
    x, y, *_ = next(iter(torch.utils.data.DataLoader(bundle.train, batch_size=16, collate_fn=bundle.train.collate)))
    padded = x["attention_mask"] == 0
    assert padded.any()
    distiller = Distiller(teacher, student, [term_for(name)], example_input=x).eval()  # dropout off
    changed = {**x, "input_ids": x["input_ids"].masked_fill(padded, 7)}
    with torch.no_grad():
        value = distiller(x, y).losses[name]
        assert torch.allclose(distiller(changed, y).losses[name], value, rtol=1e-6, atol=1e-9)
        # the same change at a real token does change the value: the check can fail
        shifted = torch.where(padded, x["input_ids"], (x["input_ids"] + 3) % bundle.text.vocab_size)
        assert not torch.allclose(distiller({**x, "input_ids": shifted}, y).losses[name], value, rtol=1e-6, atol=1e-9)
