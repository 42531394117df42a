"""Text distillation through the trainer and the CLI: Hugging Face models and tokenizers from
local folders, text files, a DistilBERT-style student, and each bad input a clear exit 2."""

import json
import sys

import pytest
import torch
import yaml

from featkd.cli import main
from featkd.text import generate_sentiment

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """GLUE-style TSV files, a BERT tokenizer and a 2-layer BERT teacher, each saved locally."""
    root = tmp_path_factory.mktemp("nlp")
    splits = {"train.tsv": generate_sentiment(96, seed=0), "dev.tsv": generate_sentiment(32, seed=0, split="test")}
    for name, (sentences, labels) in splits.items():
        rows = ["sentence\tlabel"] + [f"{s}\t{label}" for s, label in zip(sentences, labels)]
        (root / name).write_text("\n".join(rows) + "\n")
    texts = splits["train.tsv"][0] + splits["dev.tsv"][0]
    words = sorted({w for s in texts for w in s.replace(",", " , ").replace(".", " . ").split()})
    vocab = root / "vocab"
    vocab.mkdir()
    (vocab / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = transformers.BertTokenizerFast.from_pretrained(str(vocab))
    tokenizer.save_pretrained(str(root / "tokenizer"))
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                                     num_labels=2)
    transformers.BertForSequenceClassification(config).save_pretrained(str(root / "teacher"))
    return root


def written(path, config, changes):
    """`config` with `changes` (dotted keys) applied, written to `path`."""
    for key, value in changes.items():
        node = config
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    path.write_text(yaml.safe_dump(config))
    return path


def write_config(tmp_path, folders, **changes):
    config = {
        "name": "hf-distil", "output_dir": str(tmp_path / "runs"), "logger": {"name": "none"}, "progress": False,
        "data": {"name": "text_files", "batch_size": 16,
                 "args": {"root": str(folders), "tokenizer": str(folders / "tokenizer"), "max_length": 32}},
        "teacher": {"model": f"hf:{folders / 'teacher'}", "train": {"epochs": 1}},
        "student": {"model": "hf:bert", "from_teacher": "every_other",
                    "args": {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 4,
                             "intermediate_size": 64, "max_position_embeddings": 64}},
        "loss": {"ce": {"weight": 1.0}, "kd": {"weight": 1.0, "temperature": 2.0},
                 "hidden_cosine": {"student": "bert.encoder.layer.0", "teacher": "bert.encoder.layer.1"},
                 "minilm": {"student": ["bert.encoder.layer.0.attention.self:attention",
                                        "bert.encoder.layer.0.attention.self.value"],
                            "teacher": ["bert.encoder.layer.1.attention.self:attention",
                                        "bert.encoder.layer.1.attention.self.value"]}},
        "train": {"epochs": 2, "optimizer": {"name": "adamw", "lr": 1e-3}},
    }
    return written(tmp_path / "config.yaml", config, changes)


def test_hf_teacher_and_student_from_local_folders_train_end_to_end(tmp_path, folders, capsys):
    assert main(["train", str(write_config(tmp_path, folders))]) == 0
    run = next((tmp_path / "runs").glob("hf-distil-*"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["distill"]["student/parameters"] < summary["distill"]["teacher/parameters"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    distill = [r for r in records if r["stage"] == "distill"]
    assert {"train/raw/minilm/attention", "train/raw/minilm/value_relation", "train/loss/hidden_cosine"} <= set(distill[-1])
    assert all(v == v for r in records for v in r.values() if isinstance(v, float))


def test_the_student_starts_from_every_other_teacher_layer(tmp_path, folders):
    """DistilBERT's initialisation, from config: the student's one layer is the teacher's first
    (as the teacher stands when the student's stage starts)."""
    from featkd.config import load_config
    from featkd.trainer import Run

    config = load_config(write_config(tmp_path, folders))
    run = Run(config, torch.device("cpu"), verbose=False)
    run.initialise_from_teacher(run.plan.final)
    teacher, student = run.models["teacher"], run.models["student"]
    for name, value in student.bert.encoder.layer[0].state_dict().items():
        assert torch.equal(value, teacher.bert.encoder.layer[0].state_dict()[name])
    assert torch.equal(student.bert.embeddings.word_embeddings.weight, teacher.bert.embeddings.word_embeddings.weight)


def bad(tmp_path, folders, capsys, **changes) -> str:
    assert main(["train", str(write_config(tmp_path, folders, **changes))]) == 2
    message = capsys.readouterr().err
    assert "Traceback" not in message and message.count("featkd: error:") == 1
    return message


def test_without_the_nlp_extra_a_text_config_says_what_to_install(tmp_path, folders, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    assert 'pip install "featkd[nlp]"' in bad(tmp_path, folders, capsys)


def test_missing_tokenizer_and_model_folders_say_what_to_put_there(tmp_path, folders, capsys):
    message = bad(tmp_path, folders, capsys, **{"data.args.tokenizer": str(tmp_path / "no-tokenizer")})
    assert "no-tokenizer" in message and "save_pretrained" in message
    message = bad(tmp_path, folders, capsys, **{"teacher.model": f"hf:{tmp_path / 'no-model'}"})
    assert "no-model" in message and "save_pretrained" in message


def text_config(tmp_path, **changes):
    config = {"name": "text", "output_dir": str(tmp_path / "runs"), "logger": {"name": "none"}, "progress": False,
              "data": {"name": "generated_sentiment", "batch_size": 16,
                       "args": {"train_size": 64, "test_size": 16, "max_length": 32, "task": "masked_lm"}},
              "teacher": {"model": "transformer", "args": {"layers": 2, "hidden": 32}, "train": {"epochs": 1}},
              "student": {"model": "transformer", "args": {"layers": 1, "hidden": 32}},
              "loss": {"token_kd": {}}, "train": {"epochs": 1}}
    return written(tmp_path / "text.yaml", config, changes)


def bad_text(tmp_path, capsys, **changes) -> str:
    assert main(["train", str(text_config(tmp_path, **changes))]) == 2
    message = capsys.readouterr().err
    assert "Traceback" not in message and message.count("featkd: error:") == 1
    return message


def test_token_level_distillation_needs_one_vocabulary(tmp_path, capsys):
    message = bad_text(tmp_path, capsys, **{"teacher.args": {"layers": 2, "hidden": 32, "vocab_size": 300}})
    assert "share one vocabulary" in message and "token_kd" in message


def test_a_hidden_size_mismatch_without_an_adapter_names_the_fix(tmp_path, capsys):
    message = bad_text(tmp_path, capsys, **{"loss": {"hidden_cosine": {
        "student": "encoder.layer.0", "teacher": "encoder.layer.1", "adapter": None}},
        "student.args": {"layers": 1, "hidden": 16}})
    assert "adapter" in message and "hidden_cosine" in message


def test_sequences_longer_than_the_model_takes(tmp_path, capsys):
    message = bad_text(tmp_path, capsys, **{"student.args": {"layers": 1, "hidden": 32, "max_length": 16}})
    assert "max_length" in message


def test_an_image_model_on_text_data(tmp_path, capsys):
    assert "tokenised text" in bad_text(tmp_path, capsys, **{"student.model": "cnn_small", "student.args": {}})


def test_the_teacher_cache_serves_a_classifiers_logits_and_refuses_per_token_outputs(tmp_path, capsys):
    from featkd.config import load_config
    from featkd.trainer import train

    tiny = [f"output_dir={tmp_path}", "logger=none", "progress=false", "data.args.train_size=64",
            "data.args.test_size=16", "data.args.validation_size=0", "teacher.train.epochs=1", "train.epochs=2"]
    cached = train(load_config("nlp/kd", [*tiny, "teacher_cache.enabled=true", "teacher_cache.dtype=fp32"]))
    plain = train(load_config("nlp/kd", tiny))
    assert cached.student.last_acc == plain.student.last_acc
    kd = [[json.loads(line).get("train/loss/kd") for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()
           if json.loads(line)["stage"] == "distill"] for run in (cached, plain)]
    assert len(kd[0]) == 2 and kd[0] == pytest.approx(kd[1], rel=1e-6)
    features = "teacher_cache.features=[encoder.layer.3.attention.self:attention,encoder.layer.3.attention.self.value]"
    assert main(["train", "nlp/minilm", *tiny, "teacher_cache.enabled=true", features]) == 2
    assert "padded to their own longest sequence" in capsys.readouterr().err


def test_inspect_lists_a_hf_folders_names_with_shapes(folders, capsys):
    assert main(["inspect", f"hf:{folders / 'teacher'}", "--input-shape", "12"]) == 0
    printed = capsys.readouterr().out
    assert "12 tokens" in printed and ":attention" in printed
    row = next(line for line in printed.splitlines() if line.startswith("bert.encoder.layer.1.attention.self.query "))
    assert "12x32" in row
