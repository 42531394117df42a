"""Text models: the built-in transformer, the `hf:` source and DistilBERT-style students."""

from __future__ import annotations

import sys

import pytest
import torch

from featkd import text_models
from featkd.data import TextInfo
from featkd.errors import ModelError
from featkd.models import build_model
from featkd.text_models import (
    choose_layers,
    example_text_input,
    hf_available,
    layer_stack,
    student_from_teacher,
)

VOCAB, LENGTH = 50, 12
TINY = {"layers": 2, "hidden": 32, "heads": 4, "dropout": 0.0}


def info(task: str = "classification", vocab: int = VOCAB, length: int = LENGTH) -> TextInfo:
    return TextInfo(vocab_size=vocab, max_length=length, pad_id=0, task=task)


def builtin(task: str = "classification", **args) -> torch.nn.Module:
    text = info(task)
    classes = 3 if task == "classification" else text.vocab_size
    torch.manual_seed(0)
    return build_model("transformer", classes, (LENGTH,), {**TINY, **args}, text=text).eval()


def batch(vocab: int = VOCAB, length: int = LENGTH) -> dict[str, torch.Tensor]:
    """Two sequences: the second padded after 7 tokens (right padding)."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (2, length), generator=generator)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, 7:] = 0
    ids[1, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}


# -- built-in transformer ----------------------------------------------------------------


@pytest.mark.parametrize(("task", "shape"), [("classification", (2, 3)), ("masked_lm", (2, LENGTH, VOCAB)),
                                             ("causal_lm", (2, LENGTH, VOCAB))])
def test_builtin_output_shapes(task: str, shape: tuple[int, ...]) -> None:
    model = builtin(task)
    assert model(**batch()).shape == shape
    assert model(batch()["input_ids"]).shape == shape  # no mask, positional ids


def test_builtin_shorter_batch_and_token_types() -> None:
    model = builtin()
    inputs = batch(length=5)
    out = model(**inputs, token_type_ids=torch.ones_like(inputs["input_ids"]))
    assert out.shape == (2, 3)


@pytest.mark.parametrize("task", ["classification", "masked_lm", "causal_lm"])
def test_builtin_padding_does_not_leak(task: str) -> None:
    model = builtin(task)
    inputs = batch()
    other = {k: v.clone() for k, v in inputs.items()}
    other["input_ids"][1, 7:] = torch.arange(7, LENGTH) % VOCAB + 3
    a, b = model(**inputs), model(**other)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    if task == "classification":
        torch.testing.assert_close(a, b)
    else:
        torch.testing.assert_close(a[1, :7], b[1, :7])
        torch.testing.assert_close(a[0], b[0])
        assert not torch.allclose(a[1, 7:], b[1, 7:])  # padded positions see their own ids


def test_builtin_left_padding_pools_first_real_token() -> None:
    model = builtin()
    ids = torch.randint(1, VOCAB, (1, LENGTH), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    other = ids.clone()
    other[0, :4] = 7
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask), model(input_ids=other, attention_mask=mask))


def test_builtin_causal_later_tokens_do_not_change_earlier_logits() -> None:
    model = builtin("causal_lm")
    inputs = batch()
    changed = {k: v.clone() for k, v in inputs.items()}
    changed["input_ids"][0, 6] = (changed["input_ids"][0, 6] + 1) % VOCAB
    for mask in (True, False):
        kwargs = {} if mask else {"attention_mask": None}
        a = model(**{**inputs, **kwargs})
        b = model(**{**changed, **kwargs})
        torch.testing.assert_close(a[0, :6], b[0, :6])
        assert not torch.allclose(a[0, 6:], b[0, 6:])


def test_builtin_masked_lm_is_bidirectional() -> None:
    model = builtin("masked_lm")
    inputs = batch()
    changed = {k: v.clone() for k, v in inputs.items()}
    changed["input_ids"][0, 6] = (changed["input_ids"][0, 6] + 1) % VOCAB
    assert not torch.allclose(model(**inputs)[0, :6], model(**changed)[0, :6])


def test_builtin_module_names_and_attributes() -> None:
    model = builtin("classification", layers=3)
    names = dict(model.named_modules())
    for name in ("embeddings", "embeddings.word_embeddings", "embeddings.position_embeddings",
                 "embeddings.token_type_embeddings", "embeddings.LayerNorm", "encoder.layer.2",
                 "encoder.layer.0.attention.self", "encoder.layer.0.attention.self.query",
                 "encoder.layer.0.attention.self.key", "encoder.layer.0.attention.self.value",
                 "encoder.layer.0.attention.output", "encoder.layer.0.intermediate", "encoder.layer.0.output",
                 "pooler", "classifier"):
        assert name in names, name
    attention = names["encoder.layer.1.attention.self"]
    assert (attention.num_attention_heads, attention.attention_head_size, attention.is_causal) == (4, 8, False)
    assert names["encoder.layer.0.attention.self.query"].in_features == 32
    lm = dict(builtin("causal_lm").named_modules())
    assert "lm_head.decoder" in lm and "pooler" not in lm and "classifier" not in lm
    assert lm["encoder.layer.0.attention.self"].is_causal is True


def test_builtin_blocks_give_plain_tensors() -> None:
    model = builtin()
    seen = {}
    handles = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, o))
               for n in ("embeddings", "encoder.layer.0", "encoder.layer.1")]
    model(**batch())
    for handle in handles:
        handle.remove()
    assert all(isinstance(v, torch.Tensor) and v.shape == (2, LENGTH, 32) for v in seen.values())


def test_builtin_init_and_tied_decoder() -> None:
    model = build_model("transformer", VOCAB, (LENGTH,), {"layers": 2, "hidden": 64}, text=info("masked_lm"))
    std = model.encoder.layer[0].intermediate.dense.weight.std().item()
    assert 0.015 < std < 0.025
    assert model.lm_head.decoder.weight is model.embeddings.word_embeddings.weight
    assert model.max_length == LENGTH and model.vocab_size == VOCAB


def test_builtin_without_text_needs_vocab_size() -> None:
    model = build_model("transformer", 4, (10,), {"vocab_size": 30, "hidden": 32})
    assert model(input_ids=torch.randint(0, 30, (2, 10))).shape == (2, 4)
    with pytest.raises(ModelError, match="needs text data"):
        build_model("transformer", 10, (1, 8, 8))


def test_builtin_errors() -> None:
    with pytest.raises(ModelError, match=r"up to 12 tokens.*at most 8.*max_length"):
        build_model("transformer", 3, (LENGTH,), {"max_length": 8}, text=info())
    with pytest.raises(ModelError, match="not divisible by 5 heads"):
        build_model("transformer", 3, (LENGTH,), {"hidden": 32, "heads": 5}, text=info())
    model = builtin()
    with pytest.raises(ModelError, match="positions for at most 12"):
        model(input_ids=torch.zeros(1, 20, dtype=torch.long))
    with pytest.raises(ModelError, match="smaller than the tokenizer"):
        build_model("transformer", 3, (LENGTH,), {"vocab_size": 10}, text=info())


def test_builtin_trains() -> None:
    model = builtin("causal_lm")
    model.train()
    logits = model(**batch())
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch()["input_ids"].flatten())
    loss.backward()
    assert model.encoder.layer[0].attention.self.query.weight.grad is not None


def test_example_text_input_builtin() -> None:
    model = builtin()
    example = example_text_input(model, length=40, batch=3)
    assert example["input_ids"].shape == (3, LENGTH)  # capped at the positions
    assert int(example["input_ids"].max()) < VOCAB and example["attention_mask"].all()
    assert model(**example).shape == (3, 3)


# -- students ----------------------------------------------------------------------------


def test_choose_layers() -> None:
    assert choose_layers("every_other", 6) == [0, 2, 4]
    assert choose_layers("every_other", 5) == [0, 2, 4]
    assert choose_layers(3, 6) == [0, 2, 4]
    assert choose_layers(4, 12) == [0, 3, 6, 9]
    assert choose_layers(6, 6) == list(range(6))
    assert choose_layers([1, 3], 4) == [1, 3]
    for bad, message in (([], "empty"), ([0, 4], "not a teacher layer"), ([-1], "not a teacher layer"),
                         ([2, 1], "increasing"), ([1, 1], "increasing"), (0, "keep 1 to 4"), (5, "keep 1 to 4"),
                         ("every-other", "every_other"), (True, "every_other"), ([0.5], "not a teacher layer")):
        with pytest.raises(ModelError, match=message):
            choose_layers(bad, 4)


def test_layer_stack_builtin() -> None:
    name, stack = layer_stack(builtin(layers=3))
    assert name == "encoder.layer" and len(stack) == 3


def test_student_from_builtin_teacher() -> None:
    teacher = builtin("masked_lm", layers=4)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = student_from_teacher(teacher)
    assert len(student.encoder.layer) == 2 and student.num_layers == 2 and teacher.num_layers == 4
    for new, old in ((0, 0), (1, 2)):
        for (k, a), (_, b) in zip(student.encoder.layer[new].state_dict().items(),
                                  teacher.encoder.layer[old].state_dict().items()):
            torch.testing.assert_close(a, b, msg=k)
    torch.testing.assert_close(student.embeddings.word_embeddings.weight, teacher.embeddings.word_embeddings.weight)
    assert student.lm_head.decoder.weight is student.embeddings.word_embeddings.weight
    assert student.embeddings.word_embeddings.weight is not teacher.embeddings.word_embeddings.weight
    with torch.no_grad():
        student.embeddings.word_embeddings.weight.add_(1.0)
    assert len(teacher.encoder.layer) == 4
    for key, value in teacher.state_dict().items():
        torch.testing.assert_close(value, before[key], msg=key)
    student.train()
    student(**batch()).sum().backward()


def test_student_identity_matches_builtin_teacher() -> None:
    teacher = builtin("classification", layers=3)
    teacher.requires_grad_(False)
    captured = []
    teacher.encoder.layer[0].register_forward_hook(lambda m, a, o: captured.append(o))
    student = student_from_teacher(teacher, [0, 1, 2])
    torch.testing.assert_close(student(**batch()), teacher(**batch()))
    assert len(captured) == 1  # the teacher's hooks stay on the teacher
    assert all(p.requires_grad for p in student.parameters())
    assert len(student_from_teacher(teacher, 1).encoder.layer) == 1


def test_student_rejects_bad_layers() -> None:
    teacher = builtin(layers=2)
    for bad in ([0, 2], [1, 0], [], 3):
        with pytest.raises(ModelError):
            student_from_teacher(teacher, bad)


# -- Hugging Face models -----------------------------------------------------------------

HF_BERT = {"num_hidden_layers": 4, "hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64}


def hf(name: str, task: str = "classification", args: dict | None = None, text: TextInfo | None = None,
       classes: int = 3):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    text = text or info(task)
    return build_model(f"hf:{name}", classes if task == "classification" else text.vocab_size, (text.max_length,),
                       args if args is not None else dict(HF_BERT), text=text).eval()


def logits(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


def test_hf_from_model_type() -> None:
    model = hf("bert")
    assert model.config.vocab_size == VOCAB and model.config.num_hidden_layers == 4
    assert model.config.num_labels == 3
    assert logits(model(**batch())).shape == (2, 3)
    assert model.training is False
    assert build_model("hf:bert", 3, (LENGTH,), dict(HF_BERT), text=info()).training  # like other builders


@pytest.mark.parametrize(("name", "task"), [("bert", "masked_lm"), ("bert", "causal_lm"), ("distilbert", "masked_lm"),
                                            ("roberta", "classification"), ("gpt2", "causal_lm"),
                                            ("gpt2", "classification")])
def test_hf_heads(name: str, task: str) -> None:
    args = {"n_layer": 2, "n_embd": 32, "n_head": 4} if name == "gpt2" else (
        {"n_layers": 2, "dim": 32, "n_heads": 4, "hidden_dim": 64} if name == "distilbert" else dict(HF_BERT))
    model = hf(name, task, args)
    out = logits(model(**batch()))
    assert out.shape == ((2, 3) if task == "classification" else (2, LENGTH, VOCAB))
    if task == "causal_lm":
        changed = batch()
        changed["input_ids"][0, 6] = (changed["input_ids"][0, 6] + 1) % VOCAB
        torch.testing.assert_close(out[0, :6], logits(model(**changed))[0, :6])


def test_hf_task_and_attn_implementation_args() -> None:
    model = hf("bert", "classification", {**HF_BERT, "task": "masked_lm", "attn_implementation": "eager"},
               text=info("classification"))
    assert logits(model(**batch())).shape == (2, LENGTH, VOCAB)
    assert model.config._attn_implementation == "eager"


def test_hf_save_and_load_folder(tmp_path) -> None:
    model = hf("bert", "masked_lm")
    model.save_pretrained(tmp_path / "mlm")
    loaded = hf(str(tmp_path / "mlm"), "masked_lm", args={})
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, msg=key)
    torch.testing.assert_close(logits(loaded(**batch())), logits(model(**batch())))


def test_hf_folder_with_another_head_gets_a_new_classifier(tmp_path, caplog, capsys) -> None:
    mlm = hf("bert", "masked_lm")
    mlm.save_pretrained(tmp_path / "mlm")
    capsys.readouterr()
    with caplog.at_level("WARNING", logger="featkd.text_models"):
        classifier = hf(str(tmp_path / "mlm"), "classification", args={}, classes=5)
    assert logits(classifier(**batch())).shape == (2, 5)
    torch.testing.assert_close(classifier.bert.embeddings.word_embeddings.weight,
                               mlm.bert.embeddings.word_embeddings.weight)
    lines = [r.getMessage() for r in caplog.records if r.name == "featkd.text_models"]
    assert len(lines) == 1 and "classifier.weight" in lines[0]
    captured = capsys.readouterr()
    assert "LOAD REPORT" not in captured.err + captured.out
    classifier.save_pretrained(tmp_path / "cls")
    assert logits(hf(str(tmp_path / "cls"), "classification", args={}, classes=7)(**batch())).shape == (2, 7)


def test_hf_folder_task_from_architecture_without_data(tmp_path) -> None:
    hf("bert", "masked_lm").save_pretrained(tmp_path / "mlm")
    model = build_model(f"hf:{tmp_path / 'mlm'}", 10, (LENGTH,))
    example = example_text_input(model, length=8)
    assert int(example["input_ids"].max()) < VOCAB
    assert logits(model(**example)).shape == (2, 8, VOCAB)


def test_hf_errors(tmp_path) -> None:
    pytest.importorskip("transformers")
    with pytest.raises(ModelError, match=r"save_pretrained.*never downloads"):
        build_model(f"hf:{tmp_path / 'nowhere'}", 3, (LENGTH,), text=info())
    with pytest.raises(ModelError, match="never downloads"):
        build_model("hf:bert-base-uncased", 3, (LENGTH,), text=info())
    with pytest.raises(ModelError, match=r"embeds 40 tokens but the tokenizer has 50.*data.args.tokenizer"):
        build_model("hf:bert", 3, (LENGTH,), {**HF_BERT, "vocab_size": 40}, text=info())
    with pytest.raises(ModelError, match=r"up to 12 tokens.*at most 8.*data.args.max_length"):
        build_model("hf:bert", 3, (LENGTH,), {**HF_BERT, "max_position_embeddings": 8}, text=info())
    with pytest.raises(ModelError, match=r"at most 10"):  # RoBERTa's positions start after the padding id
        build_model("hf:roberta", 3, (LENGTH,), {**HF_BERT, "max_position_embeddings": 12, "pad_token_id": 1},
                    text=info())
    with pytest.raises(ModelError, match=r"'num_hidden_layer' is not a field.*num_hidden_layers"):
        build_model("hf:bert", 3, (LENGTH,), {"num_hidden_layer": 2}, text=info())
    with pytest.raises(ModelError, match="no masked_lm model"):
        build_model("hf:gpt2", VOCAB, (LENGTH,), {"n_layer": 1, "n_embd": 32, "n_head": 4}, text=info("masked_lm"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        build_model(f"hf:{tmp_path / 'empty'}", 3, (LENGTH,), text=info())


def test_hf_folder_vocab_mismatch_and_shape_change(tmp_path) -> None:
    hf("bert").save_pretrained(tmp_path / "m")
    with pytest.raises(ModelError, match="embeds 50 tokens but the tokenizer has 60"):
        hf(str(tmp_path / "m"), args={}, text=info(vocab=60))
    with pytest.raises(ModelError, match="do not fit the config"):
        hf(str(tmp_path / "m"), args={"intermediate_size": 48})


def test_hf_without_transformers(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    assert hf_available() is False
    with pytest.raises(ModelError, match=r'pip install "featkd\[nlp\]"'):
        build_model("hf:bert", 3, (LENGTH,), text=info())


def test_hf_students() -> None:
    teacher = hf("bert", "masked_lm")
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    name, stack = layer_stack(teacher)
    assert name == "bert.encoder.layer" and len(stack) == 4
    student = student_from_teacher(teacher)
    assert len(student.bert.encoder.layer) == 2 and student.config.num_hidden_layers == 2
    assert teacher.config.num_hidden_layers == 4 and len(teacher.bert.encoder.layer) == 4
    for new, old in ((0, 0), (1, 2)):
        for (k, a), (_, b) in zip(student.bert.encoder.layer[new].state_dict().items(),
                                  teacher.bert.encoder.layer[old].state_dict().items()):
            torch.testing.assert_close(a, b, msg=k)
    assert student.bert.encoder.layer[1].attention.self.layer_idx == 1
    for key, value in teacher.state_dict().items():
        torch.testing.assert_close(value, before[key], msg=key)
    assert logits(student(**batch())).shape == (2, LENGTH, VOCAB)
    identity = student_from_teacher(teacher, [0, 1, 2, 3])
    torch.testing.assert_close(logits(identity(**batch())), logits(teacher(**batch())))
    with pytest.raises(ModelError):
        student_from_teacher(teacher, [0, 4])


@pytest.mark.parametrize(("name", "args", "stack", "count"), [
    ("distilbert", {"n_layers": 4, "dim": 32, "n_heads": 4, "hidden_dim": 64}, "distilbert.transformer.layer", "n_layers"),
    ("gpt2", {"n_layer": 4, "n_embd": 32, "n_head": 4}, "transformer.h", "n_layer"),
])
def test_hf_students_other_families(name: str, args: dict, stack: str, count: str, tmp_path) -> None:
    task = "causal_lm" if name == "gpt2" else "masked_lm"
    teacher = hf(name, task, args)
    assert layer_stack(teacher)[0] == stack
    student = student_from_teacher(teacher, [1, 3])
    assert getattr(student.config, count) == 2 and len(student.get_submodule(stack)) == 2
    out = logits(student(**batch(), use_cache=True) if name == "gpt2" else student(**batch()))
    assert out.shape == (2, LENGTH, VOCAB)
    torch.testing.assert_close(logits(student_from_teacher(teacher, 4)(**batch())), logits(teacher(**batch())))
    student.save_pretrained(tmp_path / "student")
    reloaded = hf(str(tmp_path / "student"), task, args={})
    torch.testing.assert_close(logits(reloaded(**batch())), logits(student(**batch())))


def test_text_models_module_registers_hf() -> None:
    from featkd.models import EXTERNAL, TEXT_SOURCES

    assert EXTERNAL["hf"] is text_models._hf and "hf" in TEXT_SOURCES
